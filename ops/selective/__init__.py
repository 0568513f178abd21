"""Leviathan selective attention (specs/attention_variants.md §4B): selection-mask accumulation + softmax.

Public entry: `selective_attention`. Implementations (`impl`):
  "reference": `ops.selective.reference`, materialised f32 logits and selection matrix, the test oracle.
  "xla":       `ops.selective.xla`, a scan over query blocks carrying the selection column sums
               (O(block_q * S) memory per step); reverse-mode autodiff with a checkpointed block body.
  "pallas":    no kernel: raises NotImplementedError.

SSA (spec §4A) needs no op: it pre-scales q and v before `ops.attention.attention` (models/attention.py).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ops import dispatch
from ops import validation
from ops.selective import reference
from ops.selective import xla
from ops.selective.block_sizes import BlockSizes

__all__ = ["selective_attention", "BlockSizes", "IMPLEMENTATIONS"]


# impl name -> implementation. Each takes (q, k, v, *, q_positions, kv_positions, segment_ids,
# kv_segment_ids, bos_mask, initial_column_sums, scale, selection_head, prune_threshold, memory_tau) in
# canonical form, plus the options of `dispatch.impl_options` (block_sizes for "xla").
IMPLEMENTATIONS = {
    "reference": reference.selective_attention,
    "xla": xla.selective_attention,
    "pallas": dispatch.not_implemented("ops.selective", "pallas", "xla", "reference"),
}


def _check_shape(name: str, x: Any, shape: tuple[int, ...], kind: str) -> None:
  """Validates an integer / bool / float [B, L] array ([L] is also accepted and broadcast)."""
  x_shape, x_dtype = jnp.shape(x), jnp.result_type(x)
  dtype_ok = {"integer": jnp.issubdtype(x_dtype, jnp.integer), "bool": x_dtype == jnp.bool_,
              "float": jnp.issubdtype(x_dtype, jnp.floating)}[kind]
  if x_shape not in (shape, shape[1:]) or not dtype_ok:
    raise ValueError(f"{name} must be a {kind} array of shape {shape} (batch, length), "
                     f"got {x_dtype} {x_shape}.")


@functools.partial(jax.jit, static_argnames=("impl", "scale", "selection_head", "prune_threshold",
                                             "memory_tau", "block_sizes", "interpret"))
def _call(q, k, v, segment_ids, kv_segment_ids, q_positions, kv_positions, bos_mask, initial_column_sums,
          *, impl, scale, selection_head, prune_threshold, memory_tau, block_sizes, interpret):
  """The op's one jit: fills defaults, brings every argument to its canonical [B, L] form and runs
  IMPLEMENTATIONS[impl]."""
  b, t = q.shape[:2]
  s = k.shape[1]
  seq = validation.sequence_args(b, t, s, q_positions, kv_positions, segment_ids, kv_segment_ids)
  bos_mask = seq["kv_positions"] == 0 if bos_mask is None else jnp.broadcast_to(bos_mask, (b, s))
  if initial_column_sums is None:
    initial_column_sums = jnp.zeros((b, s), jnp.float32)
  initial_column_sums = jnp.broadcast_to(initial_column_sums, (b, s)).astype(jnp.float32)
  return IMPLEMENTATIONS[impl](
      q, k, v, **seq, bos_mask=bos_mask, initial_column_sums=initial_column_sums,
      scale=scale, selection_head=selection_head, prune_threshold=prune_threshold,
      memory_tau=memory_tau, **dispatch.impl_options(impl, block_sizes, interpret))


def selective_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                        segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                        q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
                        bos_mask: jax.Array | None = None,
                        initial_column_sums: jax.Array | None = None, selection_head: int = 0,
                        prune_threshold: float | None = None, memory_tau: float | None = None,
                        scale: float | None = None, impl: str | None = None, interpret: bool = False,
                        block_sizes: BlockSizes | None = None) -> tuple[jax.Array, ...]:
  """Causal softmax attention with Leviathan's selection mask (spec §4B; equations in `reference`).

  For batch b, query i, key j (visible iff kv_positions_j <= q_positions_i and same segment):
    S_ij = ReLU(scale * <q^sel_i, k_j>) for visible j other than the query's own position and BOS keys,
    F_ij = initial_column_sums_j + sum_{k < i} S_kj   (exclusive cumsum over the query rows, in order),
    o^h_i = sum_j softmax_j(scale * <q^h_i, k_j> - F_ij) v_j  over visible j (every head, one F).
  Context pruning: with `prune_threshold`, keys with F_ij > prune_threshold are also masked for query i
  (exactly zero weight). In decoding a query's own key has F = 0 and BOS keys are never selected, so no
  row empties; with arbitrary initial_column_sums a row can, and then o_i = 0 (finite gradients).
  Queries must be given in increasing position order (F accumulates over earlier rows of the call);
  decoding passes the cache's running column sums as `initial_column_sums` and stores the returned ones
  (F_{t+1, j} = F_{t, j} + S_{t, j}, spec §4B JAX notes).

  Args:
    q: [B, T, H, D] queries.
    k, v: [B, S, Hkv, D] keys and values, H % Hkv == 0 (GQA: S comes from query head
      `selection_head` and its kv head).
    causal: must be True (selective attention is defined for causal attention only).
    segment_ids: [B, T] int segment of each query (and of each key when kv_segment_ids is None, which
      then requires S == T).
    kv_segment_ids: [B, S] int segment of each key; requires segment_ids.
    q_positions: [B, T] (or [T]) int, default arange(T) + (S - T) (queries aligned to the key end).
    kv_positions: [B, S] (or [S]) int, default arange(S); unfilled cache slots get positions above every
      query position, which hides them.
    bos_mask: [B, S] bool, keys never selected (each document's first token); default
      kv_positions == 0.
    initial_column_sums: [B, S] float F0 (the decode cache's running column sums), default zeros.
    selection_head: query head whose pre-softmax logits give S (spec: head 0).
    prune_threshold: None (off) or a float >= 0.
    memory_tau: None, or tau > 0 to also return masked_i = sum_{visible j} min(F_ij, tau) / tau, the
      soft count of masked keys used by the memory loss (spec §4B, [VERIFY]).
    scale: logit scale (Python float), default D ** -0.5.
    impl: None or "" ("xla" on every backend), "reference", "xla" or "pallas".
    interpret: run Pallas kernels in interpret mode (ignored by "reference" and "xla").
    block_sizes: query block of the "xla" impl, default `BlockSizes.get_default(T)`.

  Returns:
    o: [B, T, H, D] in q.dtype (0 for a query that sees no key);
    final_column_sums: [B, S] float32, initial_column_sums + sum_i S_ij;
    masked: [B, T] float32, only when memory_tau is given.

  Raises:
    ValueError: on inconsistent shapes/dtypes, causal=False, a bad option or an unknown impl.
    NotImplementedError: for impl="pallas".
  """
  name = dispatch.resolve_impl("selective_attention", impl, IMPLEMENTATIONS)
  if not causal:
    raise ValueError("selective_attention is defined for causal attention only; got causal=False.")
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  for arg_name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{arg_name} must be a rank-4 float array ([batch, length, heads, head_dim]), "
                       f"got {x.dtype} {x.shape}.")
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  if v.shape != k.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k and v must both have shape [B, S, Hkv, D] = ({b}, S, Hkv, {d}), "
                     f"got {k.shape} and {v.shape}.")
  validation.check_heads(h, hkv)
  if not 0 <= selection_head < h:
    raise ValueError(f"selection_head must be in [0, {h}), got {selection_head}.")
  validation.check_segments(segment_ids, kv_segment_ids, b, t, s,
                            check=lambda name, x, shape: _check_shape(name, x, shape, "integer"))
  for arg_name, x, shape, kind in (("q_positions", q_positions, (b, t), "integer"),
                                   ("kv_positions", kv_positions, (b, s), "integer"),
                                   ("bos_mask", bos_mask, (b, s), "bool"),
                                   ("initial_column_sums", initial_column_sums, (b, s), "float")):
    if x is not None:
      _check_shape(arg_name, x, shape, kind)
  if prune_threshold is not None and not prune_threshold >= 0:
    raise ValueError(f"prune_threshold must be None or a float >= 0, got {prune_threshold}.")
  if memory_tau is not None and not memory_tau > 0:
    raise ValueError(f"memory_tau must be None or a float > 0, got {memory_tau}.")
  validation.check_block_sizes(block_sizes, BlockSizes)
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(t)
  if t == 0 or s == 0:  # no queries or no keys: zero outputs, column sums unchanged
    columns = (jnp.zeros((b, s), jnp.float32) if initial_column_sums is None else
               jnp.broadcast_to(initial_column_sums, (b, s)).astype(jnp.float32))
    outputs = (jnp.zeros(q.shape, q.dtype), columns)
    return outputs + ((jnp.zeros((b, t), jnp.float32),) if memory_tau is not None else ())
  return _call(
      q, k, v, segment_ids, kv_segment_ids, q_positions, kv_positions, bos_mask, initial_column_sums,
      impl=name, scale=d ** -0.5 if scale is None else float(scale), selection_head=int(selection_head),
      prune_threshold=None if prune_threshold is None else float(prune_threshold),
      memory_tau=None if memory_tau is None else float(memory_tau), block_sizes=block_sizes,
      interpret=bool(interpret))
