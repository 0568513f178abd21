"""Landmark grouped-softmax attention, training form (specs/attention_variants.md §2.2, §2.5, §2.9).

Public entry: `landmark_attention`. Implementations (`impl`):
  "reference": `ops.landmark.reference`, materialised f32 weights, the test oracle (any key layout).
  "xla":       `ops.landmark.xla`, blockwise forward (online softmax over landmark scores, spec §2.5)
               and a blockwise custom-VJP backward in pure JAX; needs the slot layout described there.
  "pallas":    the fused kernel of spec §2.5 for the current backend, forward and backward Pallas kernels
               under a custom VJP: `ops.landmark.pallas_tpu` (Mosaic TPU) on TPU,
               `ops.landmark.pallas_gpu` (Triton lowering) on GPU; on CPU it needs interpret=True and
               runs the TPU kernel in interpret mode. "pallas_tpu" / "pallas_gpu" force one kernel (e.g.
               to interpret the GPU kernel on CPU). Same slot layout as "xla".
`impl=None` picks "pallas" on TPU and GPU and "xla" on CPU.
The inference top-k retrieval form lives in `ops.landmark.retrieval`.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ops import dispatch
from ops import validation
from ops.landmark import pallas_gpu
from ops.landmark import pallas_tpu
from ops.landmark import reference
from ops.landmark import xla
from ops.landmark.block_sizes import BlockSizes

__all__ = ["landmark_attention", "BlockSizes", "IMPLEMENTATIONS", "EMPTY_SLOT"]

EMPTY_SLOT = reference.EMPTY_SLOT  # kv position of an unfilled cache slot (never visible)


def _pallas(*args, interpret: bool, **kwargs) -> jax.Array:
  """impl="pallas": the kernel of the current backend (the TPU kernel, interpreted, on CPU)."""
  backend = dispatch.pallas_backend("ops.landmark", interpret)
  kernel = {"tpu": pallas_tpu.landmark_attention, "gpu": pallas_gpu.landmark_attention}[backend]
  return kernel(*args, interpret=interpret, **kwargs)


# impl name -> implementation. Each takes (q, k, v, *, q_positions, kv_positions, segment_ids,
# kv_segment_ids, block_size, scale) in canonical form, plus the options of `dispatch.impl_options`:
# block_sizes ("xla", Pallas) and interpret (Pallas).
IMPLEMENTATIONS = {
    "reference": reference.landmark_attention,
    "xla": xla.landmark_attention,
    "pallas": _pallas,
    "pallas_tpu": pallas_tpu.landmark_attention,
    "pallas_gpu": pallas_gpu.landmark_attention,
}
# Implementations that need the slot layout (slot j holds position j or EMPTY_SLOT).
_SLOT_LAYOUT_IMPLS = ("xla", "pallas", "pallas_tpu", "pallas_gpu")


def _check_slot_layout(kv_positions: Any, impl: str) -> None:
  """Raises if concrete kv_positions break the blockwise layout (slot j holds position j or is empty)."""
  if kv_positions is None or isinstance(kv_positions, jax.core.Tracer):
    return  # default layout, or traced (documented requirement, cannot be checked here)
  if not xla.layout_ok(np.asarray(kv_positions)):
    raise ValueError(f"impl={impl!r} needs key slot j to hold position j or EMPTY_SLOT (INT32_MAX) in "
                     "kv_positions; use impl='reference' for other layouts.")


@functools.partial(jax.jit, static_argnames=("impl", "block_size", "scale", "block_sizes",
                                             "interpret"))
def _call(q, k, v, segment_ids, kv_segment_ids, q_positions, kv_positions, *, impl, block_size, scale,
          block_sizes, interpret):
  """The op's one jit: brings the arguments to canonical form and runs IMPLEMENTATIONS[impl]."""
  b, t = q.shape[:2]
  s = k.shape[1]
  seq = validation.sequence_args(b, t, s, q_positions, kv_positions, segment_ids, kv_segment_ids)
  return IMPLEMENTATIONS[impl](q, k, v, **seq, block_size=block_size, scale=scale,
                               **dispatch.impl_options(impl, block_sizes, interpret))


def tpu_kernel_or_fallback(name: str, impl: str | None, block_size: int, interpret: bool,
                           backend: str) -> str:
  """The TPU kernel needs key tiles holding whole landmark blocks in lanes of 128 (`BlockSizes.tpu_kv_tile`).

  Without one (e.g. the paper's block of 51), impl=None on a TPU falls back to "xla"; asking for the kernel
  explicitly is an error naming the fix.
  """
  tpu_kernel = name == "pallas_tpu" or (name == "pallas" and backend == "tpu")
  if not tpu_kernel or interpret or block_size < 2 or BlockSizes.tpu_kv_tile(block_size) is not None:
    return name
  if not impl:
    return "xla"
  raise ValueError(f"the TPU landmark kernel needs key tiles that are multiples of both block_size and "
                   f"128, and block_size {block_size} has none up to {BlockSizes.TPU_MAX_KV_TILE}; use a "
                   f"block size dividing 128 (e.g. 64 = 63 regular + 1 landmark, the paper's llama setting) "
                   f"or impl='xla'.")


def landmark_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int,
                       scale: float | None = None, segment_ids: jax.Array | None = None,
                       kv_segment_ids: jax.Array | None = None,
                       q_positions: jax.Array | None = None,
                       kv_positions: jax.Array | None = None, impl: str | None = None,
                       interpret: bool = False,
                       block_sizes: BlockSizes | None = None) -> jax.Array:
  """Causal landmark attention with the grouped softmax of specs/attention_variants.md §2.2.

  Positions are positions in the landmark-expanded token stream: position p is a landmark iff
  p % block_size == block_size - 1 (block_size counts the landmark), and belongs to block p // block_size.
  Key j is visible to query i iff kv_positions_j <= q_positions_i, kv_positions_j != EMPTY_SLOT
  (INT32_MAX, an unfilled cache slot) and, with segment ids, the segments match. With s_ij the scaled
  score, Z_i = sum over visible regular keys of the query's block of e^{s_ij} + sum over visible landmarks
  l_b of earlier blocks of e^{s_{i,l_b}}; a current-block regular key gets e^{s_ij} / Z_i, a regular key
  of earlier block b gets (e^{s_{i,l_b}} / Z_i) * softmax over b's visible regular keys, landmarks get 0
  (the current block's own landmark is masked even for the landmark query itself). In the first block
  this is plain causal softmax. Fully masked rows give o = 0 (never NaN). Full equations:
  `ops.landmark.reference`.

  Args:
    q: [B, T, H, D] queries.
    k: [B, S, Hkv, D] keys, H % Hkv == 0 (GQA / MQA).
    v: [B, S, Hkv, D] values.
    block_size: landmark block size (block_size - 1 regular tokens + 1 landmark), an int >= 2.
    scale: logit scale (Python float), default D ** -0.5.
    segment_ids: [B, T] int segment of each query (and of each key when kv_segment_ids is None, which
      then requires S == T).
    kv_segment_ids: [B, S] int segment of each key; requires segment_ids.
    q_positions: [B, T] (or [T]) int, default arange(T) + (S - T) (queries at the end of the keys).
    kv_positions: [B, S] (or [S]) int, default arange(S); EMPTY_SLOT marks an unfilled slot. impl="xla"
      and the Pallas impls need slot j to hold position j or EMPTY_SLOT (true for training and for a
      decode cache filled from 0); concrete arrays are checked, traced ones are trusted. "reference"
      takes any layout.
    impl: None or "" (best for jax.default_backend(): "pallas" on TPU/GPU, "xla" on CPU), "reference",
      "xla", "pallas", "pallas_tpu" or "pallas_gpu".
    interpret: run Pallas kernels in interpret mode (ignored by "reference" and "xla"); on CPU
      impl="pallas" needs it.
    block_sizes: tiles for "xla" and the Pallas kernels, default `BlockSizes.get_default(T, S, D,
      block_size)`; block_kv must be a multiple of block_size (the GPU kernel rounds tiles to powers
      of two, see `ops.landmark.pallas_gpu`).

  Returns:
    o: [B, T, H, D] in q.dtype (computed in f32).

  Raises:
    ValueError: on inconsistent shapes/dtypes, a bad block_size or block_sizes, or an unknown impl.
    ValueError: also for impl="pallas" on CPU without interpret=True.
  """
  name = dispatch.resolve_impl("landmark_attention", impl, IMPLEMENTATIONS,
                              dispatch.PALLAS_ON_ACCELERATORS)
  name = tpu_kernel_or_fallback(name, impl, int(block_size) if isinstance(block_size, int) else 0,
                                interpret, jax.default_backend())
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 2:
    raise ValueError(f"block_size must be an int >= 2 (regular tokens + 1 landmark), got "
                     f"{block_size!r}.")
  block_size = int(block_size)
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  validation.check_rank4((("q", q), ("k", k), ("v", v)), float_word="floating-point")
  validation.check_qkv(q, k, v)
  b, t, _, d = q.shape
  s = k.shape[1]
  validation.check_segments(segment_ids, kv_segment_ids, b, t, s)
  validation.check_positions(q_positions, kv_positions, b, t, s)
  validation.check_block_sizes(block_sizes, BlockSizes)
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(t, s, d, block_size)
  elif block_sizes.block_kv % block_size:
    raise ValueError(f"block_sizes.block_kv ({block_sizes.block_kv}) must be a multiple of "
                     f"block_size ({block_size}).")
  if name in _SLOT_LAYOUT_IMPLS:
    _check_slot_layout(kv_positions, name)
  if t == 0 or s == 0:  # no queries, or no keys (every row fully masked): exact zeros
    return jnp.zeros(q.shape, q.dtype)
  return _call(q, k, v, segment_ids, kv_segment_ids, q_positions, kv_positions, impl=name,
               block_size=block_size, scale=d ** -0.5 if scale is None else float(scale),
               block_sizes=block_sizes, interpret=bool(interpret))
