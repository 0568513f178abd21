"""Tests for the Pallas GLA kernels (ops.gla impl="pallas_tpu" / "pallas_gpu") against the f32 reference.

No TPU or GPU is needed: "pallas_tpu" runs through `pltpu.InterpretParams()` (~50 ms per grid step on
CPU, so its default cases are tiny: B = 1, a few chunks of 16) and "pallas_gpu" through the generic
Pallas interpreter (cheap). Inputs and the comparison follow tests/ops/test_gla.py (spec §1.4, fla's
methodology, DESIGN.md §8 metric): o, the final state and the gradients of q, k, v, log_gate and
initial_state for the loss sum(o * do) + sum(S_T * dh). Shapes have T not a multiple of the chunk, at
least two sub-chunks per chunk (so the off-diagonal, anchored products run) and several chunks (so the
state passes between kernel steps). The broad matrix (fla's shapes) is @pytest.mark.slow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import testing
from ops.gla import BlockSizes
from ops.gla import gla
from ops.gla import pallas_gpu
from tests.ops.test_gla import Case
from tests.ops.test_gla import LABELS
from tests.ops.test_gla import _inputs


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "sub_chunk"))
def _fwd_bwd(impl, q, k, v, log_gate, h0, do, dh, *, chunk_size, sub_chunk=None):
  """(o, final_state, dq, dk, dv, dlog_gate, dh0) for the loss sum(o * do) + sum(S_T * dh)."""
  def fn(q, k, v, log_gate, h0):
    return gla(q, k, v, log_gate, initial_state=h0, impl=impl, chunk_size=chunk_size,
               sub_chunk=sub_chunk, interpret=True)
  (o, final_state), pullback = jax.vjp(fn, q, k, v, log_gate, h0)
  return (o, final_state) + tuple(pullback((do.astype(o.dtype), dh)))


def _check(name, impl, case, chunk_size, sub_chunk=None, dtype=jnp.float32, gate_dtype=None):
  q, k, v, g, h0, do, dh = _inputs(case, testing.rng(name), dtype, gate_dtype)
  f32 = lambda x: x.astype(jnp.float32)
  # The reference sees exactly the (possibly bf16-rounded) inputs, upcast to f32.
  ref = _fwd_bwd("reference", f32(q), f32(k), f32(v), f32(g), h0, do, dh, chunk_size=chunk_size)
  out = _fwd_bwd(impl, q, k, v, g, h0, do, dh, chunk_size=chunk_size, sub_chunk=sub_chunk)
  inputs = (q, k, v, g, h0)
  for i, (label, r, x) in enumerate(zip(LABELS, ref, out)):
    assert x.shape == r.shape, label
    expected_dtype = (q.dtype, jnp.float32)[i] if i < 2 else inputs[i - 2].dtype
    assert x.dtype == expected_dtype, (label, x.dtype)
    assert np.isfinite(np.asarray(x, np.float32)).all(), f"{name}/{label} is not finite"
    if dtype == jnp.float32:
      ratio = testing.F32_RATIO
    else:
      ratio = testing.BF16_FWD_RATIO if i < 2 else testing.BF16_GRAD_RATIO
    testing.assert_close(f"{name}/{label}", r, x, ratio)


# GPU kernel (cheap): chunk 32 = two sub-chunks of 16 (Triton's smallest tile), T = 70 = 3 chunks.
# K = V = 64 in f32 runs in test_pallas_gpu_strong_decay_is_finite_and_accurate and the bf16 test;
# K = 128 runs in test_pallas_tpu_matches_reference_f32 (same per-chunk maths) and, for this kernel,
# in the slow matrix (default tests must stay under ~60 s of CPU).
GPU_CASES = {
    "T70_K60_V48_n10": Case(batch=1, length=70, heads=2, key_dim=60, value_dim=48, normalizer=10.0),
}


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_pallas_gpu_matches_reference_f32(name):
  _check(name, "pallas_gpu", GPU_CASES[name], chunk_size=32)


def test_pallas_gpu_bf16_matches_f32_reference():
  _check("gpu_bf16", "pallas_gpu", Case(batch=2, length=70, heads=2, normalizer=0.1), chunk_size=32,
         dtype=jnp.bfloat16, gate_dtype=jnp.bfloat16)


# TPU kernel (interpreted, ~50 ms per grid step): chunks of 16 in sub-chunks of 8, T = 40 = 2.5 chunks.
def test_pallas_tpu_matches_reference_f32():
  _check("tpu_f32", "pallas_tpu", Case(batch=1, length=40, heads=2, key_dim=128, value_dim=64),
         chunk_size=16, sub_chunk=8)


def test_pallas_tpu_bf16_matches_f32_reference():
  # Sub-chunks of 16 rows, as a real TPU needs for bf16 (sublane packing).
  _check("tpu_bf16", "pallas_tpu", Case(batch=1, length=40, heads=1, normalizer=0.1), chunk_size=32,
         sub_chunk=16, dtype=jnp.bfloat16, gate_dtype=jnp.float32)


@pytest.mark.parametrize("impl,chunk_size,sub_chunk,length", [
    ("pallas_gpu", 32, 16, 70), ("pallas_tpu", 16, 8, 40)])
def test_two_halves_with_carried_state_equal_one_pass(impl, chunk_size, sub_chunk, length):
  case = Case(batch=1, length=length, heads=2)
  split = length // 2  # inside a chunk; equal halves share one compile
  q, k, v, g, h0, _, _ = _inputs(case, testing.rng(f"halves{impl}"))
  run = functools.partial(gla, impl=impl, chunk_size=chunk_size, sub_chunk=sub_chunk, interpret=True)
  o, state = run(q, k, v, g, initial_state=h0)
  o1, state1 = run(q[:, :split], k[:, :split], v[:, :split], g[:, :split], initial_state=h0)
  o2, state2 = run(q[:, split:], k[:, split:], v[:, split:], g[:, split:], initial_state=state1)
  testing.assert_close("o", o, jnp.concatenate([o1, o2], axis=1), testing.F32_RATIO)
  testing.assert_close("final_state", state, state2, testing.F32_RATIO)
  o_ref, state_ref = gla(q, k, v, g, initial_state=h0, impl="reference")
  testing.assert_close("o vs reference", o_ref, o, testing.F32_RATIO)
  testing.assert_close("final_state vs reference", state_ref, state, testing.F32_RATIO)


def test_pallas_gpu_strong_decay_is_finite_and_accurate():
  # log_gate in [-69, -31] per step, a huge constant gate, and a mix with alpha = 1 channels. The true
  # gate gradients are ~1e-15 here; the kernels' cancellation-free closed form (ops.gla.tile_math)
  # keeps them accurate relative to that scale, not just to the O(1) terms they are made of.
  case = Case(batch=1, length=70, heads=1, normalizer=0.01)
  q, k, v, g, h0, do, dh = _inputs(case, testing.rng("strong_decay"))
  for label, gate in (("n0.01", g), ("log_gate=-1e4", jnp.full_like(g, -1e4)),
                      ("mixed", jnp.where(jnp.arange(case.key_dim) % 2 == 0, g, 0.0))):
    args = (q, k, v, gate, h0, do, dh)
    ref = _fwd_bwd("reference", *args, chunk_size=32)
    out = _fwd_bwd("pallas_gpu", *args, chunk_size=32)
    for name, r, x in zip(LABELS, ref, out):
      assert np.isfinite(np.asarray(x)).all(), f"{label}/{name} is not finite"
      testing.assert_close(f"{label}/{name}", r, x, testing.F32_RATIO)


def test_pallas_gpu_causality():
  row = 41  # inside chunk 1 (of 32 positions) and inside its sub-chunk 0 (of 16)
  case = Case(batch=1, length=70, heads=1)
  gen = testing.rng("causality")
  q, k, v, g, h0, _, _ = _inputs(case, gen)
  cotangent = np.zeros((1, 70, 1, case.value_dim), np.float32)
  cotangent[:, row] = gen.standard_normal((1, 1, case.value_dim))
  grads = _fwd_bwd("pallas_gpu", q, k, v, g, h0, jnp.asarray(cotangent), jnp.zeros_like(h0),
                   chunk_size=32)[2:6]
  for label, grad in zip(LABELS[2:6], grads):
    per_position = np.abs(np.asarray(grad)).sum(axis=(0, 2, 3))
    assert (per_position[row + 1:] == 0).all(), f"{label}: future positions get gradient"
    visible = per_position[row:row + 1] if label == "dq" else per_position[:row + 1]
    assert (visible > 0).all(), f"{label}: visible positions get no gradient"


def test_dispatch_and_block_sizes():
  q, k, v, g, _, _, _ = _inputs(Case(batch=1, length=20, heads=1, key_dim=16, value_dim=16),
                                testing.rng("dispatch"))
  # impl=None is "xla" on CPU; "pallas" is the TPU kernel in interpret mode and needs interpret=True.
  np.testing.assert_array_equal(gla(q, k, v, g)[0], gla(q, k, v, g, impl="xla")[0])
  small = (q[:, :8], k[:, :8], v[:, :8], g[:, :8])  # one grid step, one sub-chunk: a cheap compile
  pallas = gla(*small, impl="pallas", interpret=True, chunk_size=8, sub_chunk=8)
  tpu = gla(*small, impl="pallas_tpu", interpret=True, chunk_size=8, sub_chunk=8)
  for x, y in zip(pallas, tpu):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU"):
    gla(q, k, v, g, impl="pallas")
  with pytest.raises(ValueError, match="needs chunk_size and sub_chunk multiples of 8"):
    gla(q, k, v, g, impl="pallas_tpu", chunk_size=12, sub_chunk=4)  # compiled, not interpreted
  # Kernel defaults: fla's BT = 64 / BC = 16; the GPU kernel rounds to powers of two >= 16.
  assert BlockSizes.get_default(1000, kernel=True) == BlockSizes(64, 16)
  assert BlockSizes.get_default(20, kernel=True) == BlockSizes(32, 16)
  assert BlockSizes.get_default(1000, 24, kernel=True) == BlockSizes(24, 4)
  assert pallas_gpu.tile_sizes(BlockSizes(64, 16)) == (64, 16)
  assert pallas_gpu.tile_sizes(BlockSizes(24, 4)) == (32, 16)
  assert pallas_gpu.tile_sizes(BlockSizes(8, 8)) == (16, 16)


# fla's shapes (spec §1.4) and a wider TPU matrix: minutes on 2 CPU cores.
SLOW_CASES = {
    "T63_K64_V64_n1": (Case(batch=1, length=63, heads=1), 64, None),
    "T63_K60_V128_n0.1": (Case(batch=1, length=63, heads=1, key_dim=60, value_dim=128,
                               normalizer=0.1), 16, 8),
    "T130_K128_V128_n10": (Case(batch=1, length=130, heads=1, key_dim=128, value_dim=128,
                                normalizer=10.0), 64, None),
    "T1000_K128_V128_n0.1": (Case(batch=1, length=1000, heads=1, key_dim=128, value_dim=128,
                                  normalizer=0.1), 64, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_pallas_matches_reference_f32_slow(impl, name):
  case, chunk_size, sub_chunk = SLOW_CASES[name]
  _check(f"slow_{name}", impl, case, chunk_size=chunk_size, sub_chunk=sub_chunk)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("normalizer", [0.1, 1.0, 10.0])
def test_pallas_bf16_matches_f32_reference_slow(impl, normalizer):
  case = Case(batch=1, length=63, heads=2, key_dim=128, value_dim=128, normalizer=normalizer)
  _check(f"slow_bf16_{normalizer}", impl, case, chunk_size=32, sub_chunk=16, dtype=jnp.bfloat16,
         gate_dtype=jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 1024, 4, 60, 60), (2, 1024, 8, 128, 128)])
def test_pallas_gpu_matches_reference_fla_shapes(shape):
  b, t, h, dk, dv = shape
  _check(f"fla_{shape}", "pallas_gpu", Case(b, t, h, dk, dv), chunk_size=64)
