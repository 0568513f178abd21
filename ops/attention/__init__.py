"""Softmax-family attention: causal/bidirectional, positions, segment ids, GQA, key bias, signed (Cog),
T5 relative position bias (`ops.attention.relative_bias`) and softmax1 ("attention is off by one").

Public entry: `attention`. Implementations (`impl`):
  "reference": `ops.attention.reference`, materialised f32 logits, the test oracle.
  "xla":       `ops.attention.xla`, blockwise flash-style forward and custom-VJP backward in pure JAX.
  "pallas":    the Pallas kernel of the current backend: `ops.attention.pallas_tpu` (Mosaic TPU) on TPU,
               `ops.attention.pallas_gpu` on GPU; on CPU it needs interpret=True and runs the TPU kernel
               in interpret mode. "pallas_tpu" / "pallas_gpu" force one kernel (e.g. to interpret the GPU
               kernel on CPU).
`impl=None` picks "pallas" on TPU and GPU and "xla" on CPU.
"""

import functools

import jax
import jax.numpy as jnp

from ops import dispatch
from ops import validation
from ops.attention import pallas_gpu
from ops.attention import pallas_tpu
from ops.attention import reference
from ops.attention import relative_bias as relative_bias_lib
from ops.attention import xla
from ops.attention.block_sizes import BlockSizes

__all__ = ["attention", "BlockSizes", "IMPLEMENTATIONS"]


def _pallas(*args, interpret: bool, **kwargs) -> jax.Array:
  """impl="pallas": the kernel of the current backend (the TPU kernel, interpreted, on CPU)."""
  backend = dispatch.pallas_backend("ops.attention", interpret)
  kernel = {"tpu": pallas_tpu.attention, "gpu": pallas_gpu.attention}[backend]
  return kernel(*args, interpret=interpret, **kwargs)


# impl name -> implementation. Each takes (q, k, v, *, q_positions, kv_positions, segment_ids,
# kv_segment_ids, key_bias, relative_bias, relative_bidirectional, relative_max_distance, causal, signed,
# softmax1, scale) in canonical form, plus the options of `dispatch.impl_options`: block_sizes ("xla",
# Pallas) and interpret (Pallas).
IMPLEMENTATIONS = {
    "reference": reference.attention,
    "xla": xla.attention,
    "pallas": _pallas,
    "pallas_tpu": pallas_tpu.attention,
    "pallas_gpu": pallas_gpu.attention,
}


@functools.partial(jax.jit, static_argnames=("impl", "causal", "signed", "softmax1", "scale",
                                             "relative_bidirectional", "relative_max_distance",
                                             "block_sizes", "interpret"))
def _call(q, k, v, segment_ids, kv_segment_ids, q_positions, kv_positions, key_bias, relative_bias, *,
          impl, causal, signed, softmax1, scale, relative_bidirectional, relative_max_distance,
          block_sizes, interpret):
  """The op's one jit: brings the arguments to canonical form and runs IMPLEMENTATIONS[impl]."""
  b, t = q.shape[:2]
  s = k.shape[1]
  seq = validation.sequence_args(b, t, s, q_positions, kv_positions, segment_ids, kv_segment_ids)
  if key_bias is not None:
    # Canonical [B, Hb, S] f32; autodiff maps the cotangent back to the caller's shape and dtype.
    key_bias = key_bias.astype(jnp.float32)
    if key_bias.ndim == 2:
      key_bias = key_bias[:, None, :]
  if relative_bias is not None:
    relative_bias = relative_bias.astype(jnp.float32)  # [H, num_buckets] f32, like key_bias
  return IMPLEMENTATIONS[impl](q, k, v, **seq, key_bias=key_bias, relative_bias=relative_bias,
                               relative_bidirectional=relative_bidirectional,
                               relative_max_distance=relative_max_distance, causal=causal, signed=signed,
                               softmax1=softmax1, scale=scale,
                               **dispatch.impl_options(impl, block_sizes, interpret))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              segment_ids: jax.Array | None = None, key_bias: jax.Array | None = None,
              signed: bool = False, scale: float | None = None, impl: str | None = None,
              interpret: bool = False, q_positions: jax.Array | None = None,
              kv_positions: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
              block_sizes: BlockSizes | None = None, relative_bias: jax.Array | None = None,
              relative_bidirectional: bool = True, relative_max_distance: int = 128,
              softmax1: bool = False) -> jax.Array:
  """Multi-head attention with the softmax (or Cog signed) weights of specs/attention_variants.md §3.

  For batch b, query head h (kv head h // (H // Hkv)), query i, key j:
    s_ij = scale * <q_i, k_j> + key_bias_j + relative_bias[h, bucket(kv_positions_j - q_positions_i)]
    key j is visible to query i iff (not causal or kv_positions_j <= q_positions_i)
                                   and segment_ids_i == kv_segment_ids_j and key_bias_j != -inf
    softmax: w_i = softmax(s_i) over visible keys; signed: w_ij = sign(s_ij) * softmax(|s_i|)_j
    softmax1: w_ij = exp(s_ij) / (1 + sum_k exp(s_ik)) over visible keys (one extra virtual key of logit
      0 and value 0; computed stably with the running max max(m, 0)); with signed, the same on |s|:
      w_ij = sign(s_ij) exp(|s_ij|) / (1 + sum_k exp(|s_ik|))
    o_i = sum_j w_ij v_j, and o_i = 0 (with zero, finite gradients) if query i sees no key.
  The relative term is T5's (specs/token_free.md §2.3), bucket = `relative_position_bucket` of
  `ops.attention.relative_bias` (its docstring has the formula) with num_buckets = relative_bias.shape[1]:
  exact buckets for short distances, log-spaced ones up to relative_max_distance, half per sign when
  relative_bidirectional, else only keys at or before the query get distinct buckets. It follows the
  given positions, so gathered positions (MrT5 hard deletion) and KV-cache slot positions keep their
  original distances. T5 uses scale=1.0 (no 1/sqrt(D)); MrT5 adds softmax1 and its gate as key_bias.

  Notes:
    * Segment id 0 (padding) is an ordinary id: padding tokens attend to each other, never to real
      tokens. Mask padding out of the loss, not here.
    * A key_bias of -inf is a hard mask in both modes (excluded from the normaliser and the output).
      A large finite negative bias (e.g. -1e9) removes a key only for softmax; with signed=True it makes
      |s| huge and the key dominates with a negative weight, so use -inf to delete keys under Cog.
    * Differentiable w.r.t. q, k, v, key_bias and relative_bias (reverse mode); the "xla" impl and the
      Pallas kernels have custom VJPs and never build a T x S bias (they bucket per tile). The kernels
      look the bias up with one select per bucket (Mosaic and Triton have no general gather) and sum the
      table gradient with one masked reduction per bucket: extra vector work proportional to num_buckets
      per logit (the matmuls are unchanged).
    * Every impl supports every combination (relative bias, softmax1, signed, key_bias, segments, GQA).

  Args:
    q: [B, T, H, D] queries.
    k: [B, S, Hkv, D] keys, H % Hkv == 0 (GQA / MQA).
    v: [B, S, Hkv, D] values.
    causal: apply the position rule above.
    segment_ids: [B, T] int segment of each query (and of each key when kv_segment_ids is None, which
      then requires S == T).
    key_bias: [B, S] or [B, Hkv, S] float added to the logits of every query for that key (MrT5 soft
      deletion); a [B, Hkv, S] bias applies to all query heads of that kv group.
    signed: Cog attention weights.
    scale: logit scale (Python float), default D ** -0.5.
    impl: None or "" (best for jax.default_backend(): "pallas" on TPU/GPU, "xla" on CPU), "reference",
      "xla", "pallas", "pallas_tpu" or "pallas_gpu".
    interpret: run Pallas kernels in interpret mode (ignored by "reference" and "xla").
    q_positions: [B, T] (or [T]) int positions of the queries, default arange(T) + (S - T), i.e. the
      query block is aligned to the end of the keys (decode / chunked prefill).
    kv_positions: [B, S] (or [S]) int positions of the keys, default arange(S). Unfilled KV-cache
      slots are masked by giving them positions above every query position (or a -inf key_bias).
    kv_segment_ids: [B, S] int segment of each key; requires segment_ids.
    block_sizes: tiles for the "xla" impl, default `BlockSizes.get_default(T, S, D, dtype, backend)`.
    relative_bias: [H, num_buckets] float T5 bias table, one row per query head (num_buckets 32 in T5;
      even and >= 4 when relative_bidirectional, >= 2 otherwise).
    relative_bidirectional: T5 encoder buckets (both signs of the distance) if True, decoder (causal) ones
      if False. Static; used only with relative_bias.
    relative_max_distance: static int > the number of exact buckets, num_buckets // 4 (bidirectional) or
      num_buckets // 2 (128 in T5); distances from it on share the last bucket.
    softmax1: add 1 to the softmax denominator (MrT5 `--use_softmax1`).

  Returns:
    o: [B, T, H, D] in q.dtype.

  Raises:
    ValueError: on inconsistent shapes/dtypes or an unknown impl.
    ValueError: also for impl="pallas" on CPU without interpret=True.
    ValueError: for a relative_bias table or bucket parameters the T5 formula cannot take.
  """
  name = dispatch.resolve_impl("attention", impl, IMPLEMENTATIONS, dispatch.PALLAS_ON_ACCELERATORS)
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  validation.check_rank4((("q", q), ("k", k), ("v", v)))
  validation.check_qkv(q, k, v)
  b, t, _, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  validation.check_segments(segment_ids, kv_segment_ids, b, t, s)
  validation.check_positions(q_positions, kv_positions, b, t, s)
  if key_bias is not None:
    bias_shape, bias_dtype = jnp.shape(key_bias), jnp.result_type(key_bias)
    if bias_shape not in ((b, s), (b, hkv, s)) or not jnp.issubdtype(bias_dtype, jnp.floating):
      raise ValueError(f"key_bias must be a float array of shape ({b}, {s}) or ({b}, {hkv}, {s}) "
                       f"([B, S] or [B, Hkv, S]), got {bias_dtype} {bias_shape}.")
  if relative_bias is not None:
    relative_bias_lib.check_table(relative_bias, q.shape[2], bool(relative_bidirectional),
                                  relative_max_distance)
  validation.check_block_sizes(block_sizes, BlockSizes)
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(t, s, d, q.dtype, jax.default_backend())
  if t == 0 or s == 0:  # no queries, or no keys (every row fully masked): exact zeros
    return jnp.zeros(q.shape, q.dtype)
  if relative_bias is None:  # the bucket parameters mean nothing then: one compiled program for all
    relative_bidirectional, relative_max_distance = True, 128
  return _call(q, k, v, segment_ids, kv_segment_ids, q_positions, kv_positions, key_bias, relative_bias,
               impl=name, causal=bool(causal), signed=bool(signed), softmax1=bool(softmax1),
               scale=d ** -0.5 if scale is None else float(scale),
               relative_bidirectional=bool(relative_bidirectional),
               relative_max_distance=int(relative_max_distance), block_sizes=block_sizes,
               interpret=bool(interpret))
