"""Tests for the Pallas landmark kernels (ops.landmark impl "pallas_tpu" / "pallas_gpu") in interpret mode.

No TPU or GPU is needed: "pallas_tpu" runs through `pltpu.InterpretParams()` and "pallas_gpu" through the
generic Pallas interpreter (every call passes interpret=True). Each case compares o, dq, dk, dv against
impl="reference" (f32, on the same input values) with the DESIGN.md §8 ratios. The TPU interpreter costs
about 50 ms per grid step on CPU, so its default cases are tiny (B = 1, H <= 2, 2-3 blocks per axis);
the GPU interpreter is cheaper and carries the wider default matrix; the rest is @pytest.mark.slow.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import testing
from ops.landmark import EMPTY_SLOT
from ops.landmark import BlockSizes
from ops.landmark import landmark_attention
from ops.landmark import pallas_gpu


@dataclasses.dataclass(frozen=True)
class Case:
  t: int = 21  # queries
  s: int | None = None  # key slots (default: t)
  heads: int = 2
  kv_heads: int = 1
  head_dim: int = 64
  block_size: int = 8  # landmark block (regular tokens + 1 landmark)
  blocks: BlockSizes = BlockSizes(16, 16)
  batch: int = 1
  segments: bool = False  # packed documents; segment 2 starts at a landmark (a fully masked row)
  filled: tuple[int, ...] | None = None  # decode: per-batch filled slots, the rest EMPTY_SLOT
  dtype: str = "float32"


CASES = {
    # T not a multiple of the landmark block nor of the tiles; GQA; the diagonal block plus 2 earlier;
    # two landmark blocks per key tile (grouped local softmax inside a tile), the last tile half padding.
    "gqa_d64_t21": Case(),
    "d128_mha_t19_bs5": Case(t=19, heads=2, kv_heads=2, head_dim=128, block_size=5,
                             blocks=BlockSizes(8, 10)),
    # one landmark block per key tile (the Triton design of spec §2.5; the GPU tile still holds 4)
    "one_block_per_tile_bs4": Case(t=29, block_size=4, blocks=BlockSizes(16, 4)),
    "segments": Case(t=22, segments=True, block_size=5, blocks=BlockSizes(8, 5)),
    # decode-like: 4 queries at the end of a partly filled cache, empty slots, batch rows differ
    "decode_empty_slots": Case(t=4, s=24, batch=2, filled=(19, 10), blocks=BlockSizes(8, 8)),
    "bf16_d64": Case(dtype="bfloat16"),
    "bf16_d128_bs5": Case(t=17, head_dim=128, block_size=5, blocks=BlockSizes(8, 5),
                          dtype="bfloat16"),
}
# The TPU interpreter is slow: its default cases are a subset, every case runs with --runslow.
TPU_DEFAULT = ("gqa_d64_t21", "decode_empty_slots", "bf16_d128_bs5")
GPU_DEFAULT = ("gqa_d64_t21", "d128_mha_t19_bs5", "one_block_per_tile_bs4", "segments",
               "decode_empty_slots", "bf16_d128_bs5")
PARAMS = ([pytest.param("pallas_gpu", name, marks=() if name in GPU_DEFAULT else pytest.mark.slow)
           for name in CASES]
          + [pytest.param("pallas_tpu", name, marks=() if name in TPU_DEFAULT else pytest.mark.slow)
             for name in CASES])


@functools.partial(jax.jit, static_argnames=("impl", "block_size", "block_sizes"))
def _grads(impl, q, k, v, cotangent, segment_ids, q_positions, kv_positions, *, block_size,
           block_sizes):
  """o, dq, dk, dv of `landmark_attention` (interpret mode) for one cotangent."""
  def fn(q, k, v):
    return landmark_attention(q, k, v, block_size=block_size, segment_ids=segment_ids,
                              q_positions=q_positions, kv_positions=kv_positions, impl=impl,
                              block_sizes=block_sizes, interpret=True)
  o, grads = testing.vjp_outputs(fn, (q, k, v), cotangent)
  return (o,) + tuple(grads)


def _inputs(case: Case, gen: np.random.Generator):
  """q, k, v (case dtype), f32 cotangent, segment ids, q/kv positions (None = defaults)."""
  s = case.t if case.s is None else case.s
  q, k, v = testing.random_qkv(gen, case.batch, case.t, s, case.heads, case.kv_heads, case.head_dim,
                               jnp.dtype(case.dtype))
  cotangent = testing.randn(gen, (case.batch, case.t, case.heads, case.head_dim))
  seg = q_pos = kv_pos = None
  if case.segments:
    seg = testing.random_segment_ids(gen, case.batch, case.t, 3)
    seg[0] = np.repeat([1, 2], [9, case.t - 9])  # position 9 is a landmark (block_size 5)
  if case.filled is not None:
    kv_pos = np.broadcast_to(np.arange(s, dtype=np.int32), (case.batch, s)).copy()
    q_pos = np.zeros((case.batch, case.t), np.int32)
    for b, n in enumerate(case.filled):
      kv_pos[b, n:] = EMPTY_SLOT
      q_pos[b] = np.arange(n - case.t, n)
  return q, k, v, cotangent, seg, q_pos, kv_pos


@pytest.mark.parametrize("impl,name", PARAMS)
def test_kernel_matches_reference(impl, name):
  case = CASES[name]
  q, k, v, cotangent, seg, q_pos, kv_pos = _inputs(case, testing.rng(f"{impl}/{name}"))
  static = dict(block_size=case.block_size, block_sizes=case.blocks)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref = _grads("reference", *f32, cotangent, seg, q_pos, kv_pos, **static)
  out = _grads(impl, q, k, v, cotangent, seg, q_pos, kv_pos, **static)
  bf16 = case.dtype == "bfloat16"
  for label, r, x in zip(("o", "dq", "dk", "dv"), ref, out):
    assert x.shape == r.shape and x.dtype == jnp.dtype(case.dtype), label
    ratio = testing.F32_RATIO
    if bf16:
      ratio = testing.BF16_FWD_RATIO if label == "o" else testing.BF16_GRAD_RATIO
    testing.assert_close(f"{impl}/{name}/{label}", r, x, ratio)


@pytest.mark.parametrize("impl", ["pallas_gpu", pytest.param("pallas_tpu", marks=pytest.mark.slow)])
def test_fully_masked_rows_are_zero_with_finite_grads(impl):
  # Batch row 1 has an empty cache (every key slot EMPTY_SLOT); in row 0 the segment of the last
  # queries starts at a landmark, whose own block holds no visible regular key: both rows see nothing.
  block_size, t = 4, 12
  gen = testing.rng(f"masked{impl}")
  q, k, v = testing.random_qkv(gen, 2, t, t, 2, 1, 16)
  cotangent = testing.randn(gen, q.shape)
  kv_pos = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t)).copy()
  kv_pos[1] = EMPTY_SLOT
  seg = np.ones((2, t), np.int32)
  seg[0, 7:] = 2  # position 7 is a landmark (block 1)
  o, dq, dk, dv = _grads(impl, q, k, v, cotangent, seg, None, kv_pos, block_size=block_size,
                         block_sizes=BlockSizes(8, 8))
  for x in (o, dq, dk, dv):
    assert np.isfinite(np.asarray(x)).all()
  assert not np.asarray(o[1]).any() and not np.asarray(dq[1]).any()
  assert not np.asarray(o[0, 7]).any() and not np.asarray(dq[0, 7]).any()
  assert np.asarray(o[0, 8]).any()  # the next query sees its own (regular) key


def test_dispatch_and_layout_check():
  q, k, v = testing.random_qkv(testing.rng("pallas_dispatch"), 1, 10, 10, 1, 1, 16)
  # On CPU "pallas" is the TPU kernel in interpret mode.
  np.testing.assert_array_equal(
      landmark_attention(q, k, v, block_size=5, impl="pallas_tpu", interpret=True),
      landmark_attention(q, k, v, block_size=5, impl="pallas", interpret=True))
  with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU"):
    landmark_attention(q, k, v, block_size=5, impl="pallas")
  shuffled = np.arange(10, dtype=np.int32)[::-1].copy()
  for impl in ("pallas", "pallas_tpu", "pallas_gpu"):
    with pytest.raises(ValueError, match=f"impl='{impl}' needs key slot j to hold position j"):
      landmark_attention(q, k, v, block_size=5, kv_positions=shuffled, impl=impl, interpret=True)


def test_gpu_tile_sizes_are_powers_of_two():
  # Landmark blocks of 5 slots are spread over 8; tiles are powers of two of at least 16.
  bq, bk, width = pallas_gpu.tile_sizes(BlockSizes(24, 10), 21, 23, 5)
  assert (bq, bk, width) == (32, 16, 8)
  bq, bk, width = pallas_gpu.tile_sizes(BlockSizes(256, 256), 300, 1000, 64)
  assert (bq, bk, width) == (256, 256, 64)
  with pytest.raises(ValueError, match="must be a multiple of block_size"):
    pallas_gpu.tile_sizes(BlockSizes(8, 12), 8, 8, 5)
