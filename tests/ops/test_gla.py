"""Tests for ops.gla: the chunked XLA form against the f32 recurrent reference, and the reference's maths.

Methodology of specs/attention_variants.md §1.4 (fla's tests/ops/test_gla.py): q, k, v ~ U[0, 1),
log_gate = logsigmoid(U[0, 1)) / normalizer (normalizer 0.1 is strong decay: down to -6.9 per step),
initial_state ~ U[0, 1), N(0, 1) cotangents for o and the final state; o, final state and the gradients
of q, k, v, log_gate and initial_state are compared with the DESIGN.md §8 metric (ops.testing).

XLA compiles dominate on CPU, so forward+backward are jitted together and cases share shapes (the
normalizer is traced, not static, so it costs no compile).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import testing
from ops.gla import BlockSizes
from ops.gla import gla
from ops.gla import gla_step

LABELS = ("o", "final_state", "dq", "dk", "dv", "dlog_gate", "dinitial_state")
B, T, H, K, V = 2, 63, 2, 64, 64  # the shared small shape: T is not a multiple of 8, 16, 32 or 64


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "sub_chunk"))
def _fwd_bwd(impl, q, k, v, log_gate, h0, do, dh, *, chunk_size=64, sub_chunk=None):
  """(o, final_state, dq, dk, dv, dlog_gate, dh0) for the loss sum(o * do) + sum(S_T * dh)."""
  def fn(q, k, v, log_gate, h0):
    return gla(q, k, v, log_gate, initial_state=h0, impl=impl, chunk_size=chunk_size,
               sub_chunk=sub_chunk)
  (o, final_state), pullback = jax.vjp(fn, q, k, v, log_gate, h0)
  return (o, final_state) + tuple(pullback((do.astype(o.dtype), dh)))


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = B
  length: int = T
  heads: int = H
  key_dim: int = K
  value_dim: int = V
  normalizer: float = 1.0


def _inputs(case: Case, gen: np.random.Generator, dtype=jnp.float32, gate_dtype=None):
  """q, k, v, log_gate, h0 (fla's distributions, spec §1.4) and the cotangents do, dh."""
  b, t, h, dk, dv = case.batch, case.length, case.heads, case.key_dim, case.value_dim
  uniform = lambda *shape: gen.random(shape, dtype=np.float32)
  q, k, v = uniform(b, t, h, dk), uniform(b, t, h, dk), uniform(b, t, h, dv)
  log_gate = -np.logaddexp(0.0, -uniform(b, t, h, dk)) / case.normalizer  # logsigmoid(u) / norm
  cast = lambda x, dt: jnp.asarray(x.astype(np.float32)).astype(dt)
  return (cast(q, dtype), cast(k, dtype), cast(v, dtype), cast(log_gate, gate_dtype or dtype),
          cast(uniform(b, h, dk, dv), jnp.float32), testing.randn(gen, (b, t, h, dv)),
          testing.randn(gen, (b, h, dk, dv)))


def _assert_all_close(prefix, ref, out, ratio, grad_ratio=None):
  for i, (label, r, x) in enumerate(zip(LABELS, ref, out)):
    testing.assert_close(f"{prefix}/{label}", r, x, ratio if i < 2 or grad_ratio is None
                         else grad_ratio)


def _assert_finite(prefix, arrays):
  for label, x in zip(LABELS, arrays):
    assert np.isfinite(np.asarray(x, np.float32)).all(), f"{prefix}/{label} is not finite"


CASES = {
    "T63_K64_V64_n1": Case(),
    "T63_K60_V128_n0.1": Case(key_dim=60, value_dim=128, normalizer=0.1),
    "T63_K128_V60_n10": Case(key_dim=128, value_dim=60, normalizer=10.0),
    "T1000_K128_V128_n0.1": Case(batch=1, length=1000, heads=1, key_dim=128, value_dim=128,
                                 normalizer=0.1),
    "T1000_K128_V128_n1": Case(batch=1, length=1000, heads=1, key_dim=128, value_dim=128),
    "T1000_K128_V128_n10": Case(batch=1, length=1000, heads=1, key_dim=128, value_dim=128,
                                normalizer=10.0),
}

# fla's own shapes (spec §1.4): minutes on 2 CPU cores.
SLOW_CASES = {
    "T1000_K60_V64_n1": Case(batch=1, length=1000, heads=1, key_dim=60, value_dim=64),
    "T1024_B2_H4_D60_n1": Case(2, 1024, 4, 60, 60),
    "T1024_B2_H8_D128_n0.1": Case(2, 1024, 8, 128, 128, 0.1),
    "T1024_B2_H8_D128_n1": Case(2, 1024, 8, 128, 128),
    "T1024_B2_H8_D128_n10": Case(2, 1024, 8, 128, 128, 10.0),
    "T2048_B4_H8_D64_n1": Case(4, 2048, 8, 64, 64),
}


def _check_against_reference(name, case):
  args = _inputs(case, testing.rng(name))
  ref = _fwd_bwd("reference", *args)
  out = _fwd_bwd("xla", *args)
  _assert_finite(name, out)
  for r, x in zip(ref, out):
    assert x.shape == r.shape and x.dtype == r.dtype
  _assert_all_close(name, ref, out, testing.F32_RATIO)


@pytest.mark.parametrize("name", list(CASES))
def test_xla_matches_reference_f32(name):
  _check_against_reference(name, CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_xla_matches_reference_f32_fla_shapes(name):
  _check_against_reference(name, SLOW_CASES[name])


@pytest.mark.parametrize("normalizer,gate_dtype", [(0.1, jnp.bfloat16), (10.0, jnp.float32)])
def test_xla_bf16_matches_f32_reference(normalizer, gate_dtype):
  name = f"bf16_{normalizer}"
  q, k, v, g, h0, do, dh = _inputs(Case(normalizer=normalizer), testing.rng(name), jnp.bfloat16,
                                   gate_dtype)
  # The reference sees exactly the bf16-rounded values, upcast to f32.
  f32 = lambda x: x.astype(jnp.float32)
  ref = _fwd_bwd("reference", f32(q), f32(k), f32(v), f32(g), h0, do, dh)
  out = _fwd_bwd("xla", q, k, v, g, h0, do, dh)
  assert out[0].dtype == jnp.bfloat16 and out[1].dtype == jnp.float32
  assert out[5].dtype == gate_dtype and out[6].dtype == jnp.float32
  _assert_all_close(name, ref, out, testing.BF16_FWD_RATIO, testing.BF16_GRAD_RATIO)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_two_halves_with_carried_state_equal_one_pass(impl):
  q, k, v, g, h0, _, _ = _inputs(Case(), testing.rng(f"halves{impl}"))
  run = functools.partial(gla, impl=impl, chunk_size=16)
  o, state = run(q, k, v, g, initial_state=h0)
  split = 40  # inside a chunk of 16
  o1, state1 = run(q[:, :split], k[:, :split], v[:, :split], g[:, :split], initial_state=h0)
  o2, state2 = run(q[:, split:], k[:, split:], v[:, split:], g[:, split:], initial_state=state1)
  testing.assert_close("o", o, jnp.concatenate([o1, o2], axis=1), testing.F32_RATIO)
  testing.assert_close("final_state", state, state2, testing.F32_RATIO)


def test_chunk_size_invariance():
  args = _inputs(Case(normalizer=0.1), testing.rng("chunk_sizes"))
  base = _fwd_bwd("xla", *args)  # default chunk 64 (sub-chunk 8)
  _assert_all_close("chunk16", base, _fwd_bwd("xla", *args, chunk_size=16), testing.F32_RATIO)
  # Forward only (a compile each): chunk 32, fla's sub-chunk 16, no secondary chunking, sub-chunks
  # of 1 in chunks of a prime length.
  q, k, v, g, h0 = args[:5]
  for chunk_size, sub_chunk in ((32, None), (64, 16), (64, 64), (7, 1)):
    o, state = gla(q, k, v, g, initial_state=h0, chunk_size=chunk_size, sub_chunk=sub_chunk)
    testing.assert_close(f"({chunk_size}, {sub_chunk})/o", base[0], o, testing.F32_RATIO)
    testing.assert_close(f"({chunk_size}, {sub_chunk})/state", base[1], state, testing.F32_RATIO)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gla_step_iterated_equals_parallel_forward(dtype):
  q, k, v, g, h0, _, _ = _inputs(Case(key_dim=60, value_dim=32), testing.rng(f"decode{dtype}"),
                                 dtype)

  @jax.jit
  def decode(q, k, v, g, h0):
    def body(state, xs):
      o, state = gla_step(*xs, state)
      return state, o
    final_state, o = jax.lax.scan(body, h0, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g)))
    return jnp.moveaxis(o, 0, 1), final_state

  o_step, state_step = decode(q, k, v, g, h0)
  o, state = gla(q, k, v, g, initial_state=h0, impl="xla")
  assert o_step.dtype == dtype and state_step.dtype == jnp.float32
  ratio = testing.F32_RATIO if dtype == jnp.float32 else testing.BF16_FWD_RATIO
  testing.assert_close("o", o, o_step, ratio)
  testing.assert_close("state", state, state_step, testing.F32_RATIO)
  # The step is exactly the reference's scan body.
  o_ref, state_ref = gla(q, k, v, g, initial_state=h0, impl="reference")
  np.testing.assert_allclose(np.asarray(o_step, np.float32), np.asarray(o_ref, np.float32),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(state_step, state_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_causality(impl):
  row = 42  # inside chunk 2 (of 16 positions) and inside sub-chunk 1 (of 8) of that chunk
  gen = testing.rng(f"causality{impl}")
  q, k, v, g, h0, _, _ = _inputs(Case(), gen)
  run = jax.jit(lambda *a: gla(*a, initial_state=h0, impl=impl, chunk_size=16, sub_chunk=8)[0])
  # Forward: changing every input after `row` leaves o[:, :row + 1] unchanged.
  future = (np.arange(T) > row)[None, :, None, None]
  changed = [jnp.where(future, x + 1.0, x) for x in (q, k, v)] + [jnp.where(future, 3.0 * g, g)]
  o1, o2 = np.asarray(run(q, k, v, g)), np.asarray(run(*changed))
  np.testing.assert_allclose(o1[:, :row + 1], o2[:, :row + 1], rtol=1e-6, atol=1e-6)
  assert not np.allclose(o1[:, row + 1:], o2[:, row + 1:])
  # Gradients of o[:, row] alone: exactly zero for every later position, non-zero up to `row`.
  cotangent = np.zeros((B, T, H, V), np.float32)
  cotangent[:, row] = gen.standard_normal((B, H, V))
  grads = _fwd_bwd(impl, q, k, v, g, h0, jnp.asarray(cotangent), jnp.zeros_like(h0),
                   chunk_size=16, sub_chunk=8)[2:6]
  for label, grad in zip(LABELS[2:6], grads):
    per_position = np.abs(np.asarray(grad)).sum(axis=(0, 2, 3))
    assert (per_position[row + 1:] == 0).all(), f"{label}: future positions get gradient"
    visible = per_position[row:row + 1] if label == "dq" else per_position[:row + 1]
    assert (visible > 0).all(), f"{label}: visible positions get no gradient"


def test_strong_decay_is_finite_and_accurate():
  # normalizer 0.01: log_gate in [-69, -31] per step, so any cumulative gate over a chunk is far below
  # the f32 exp range; a naive parallel form overflows (spec §1.1) and a masked exp gives inf * 0.
  case = Case(batch=1, length=1000, heads=1, key_dim=128, value_dim=128, normalizer=0.01)
  q, k, v, g, h0, do, dh = _inputs(case, testing.rng("strong_decay"))
  for label, gate in (("n0.01", g), ("log_gate=-1e4", jnp.full_like(g, -1e4)),
                      ("mixed", jnp.where(jnp.arange(128) % 2 == 0, g, 0.0))):
    args = (q, k, v, gate, h0, do, dh)
    out = _fwd_bwd("xla", *args)
    _assert_finite(label, out)
    _assert_all_close(label, _fwd_bwd("reference", *args), out, testing.F32_RATIO)


def test_reference_matches_numpy_loop():
  b, t, h, dk, dv, scale = 2, 6, 3, 4, 5, 0.7
  q, k, v, g, h0, _, _ = _inputs(Case(b, t, h, dk, dv, normalizer=0.5), testing.rng("numpy"))
  qn, kn, vn, gn, state = (np.asarray(x, np.float64) for x in (q, k, v, g, h0))
  o_np = np.zeros((b, t, h, dv))
  for bi in range(b):
    for hi in range(h):
      s = state[bi, hi].copy()
      for ti in range(t):
        s = np.exp(gn[bi, ti, hi])[:, None] * s + np.outer(kn[bi, ti, hi], vn[bi, ti, hi])
        o_np[bi, ti, hi] = scale * qn[bi, ti, hi] @ s
      state[bi, hi] = s
  for impl in ("reference", "xla"):
    o, final_state = gla(q, k, v, g, initial_state=h0, scale=scale, impl=impl, chunk_size=4,
                         sub_chunk=2)
    np.testing.assert_allclose(o, o_np, rtol=1e-5, atol=1e-6, err_msg=impl)
    np.testing.assert_allclose(final_state, state, rtol=1e-5, atol=1e-6, err_msg=impl)


def test_scale_argument():
  q, k, v, g, _, _, _ = _inputs(Case(), testing.rng("scale"))
  for impl in ("reference", "xla"):
    scaled, state = gla(q, k, v, g, scale=0.3, impl=impl)
    default, state_default = gla(q * (0.3 / K ** -0.5), k, v, g, impl=impl)
    testing.assert_close(f"{impl}/o", default, scaled, testing.F32_RATIO)
    np.testing.assert_array_equal(state_default, state)  # the state does not involve q


def test_constant_initial_state_under_jit():
  # Regression: a compile-time-constant S_0 with a single chunk (T = 63 <= 64) used to hit an XLA:CPU
  # YNN-fusion miscompile (garbage outputs); see the barrier in ops/gla/xla.py.
  q, k, v, g, _, _, _ = _inputs(Case(), testing.rng("const_state"))
  for value in (None, 1.0):  # None: zeros created inside the jit
    h0 = None if value is None else np.full((B, H, K, V), value, np.float32)
    ref = gla(q, k, v, g, initial_state=h0, impl="reference")
    out = jax.jit(lambda *a: gla(*a, initial_state=None if h0 is None else jnp.asarray(h0),
                                 impl="xla"))(q, k, v, g)
    for label, r, x in zip(LABELS, ref, out):
      testing.assert_close(f"S0={value}/{label}", r, x, testing.F32_RATIO)


def test_impl_dispatch_and_empty_sequence():
  q, k, v, g, h0, _, _ = _inputs(Case(), testing.rng("dispatch"))
  default = np.asarray(gla(q, k, v, g)[0])
  np.testing.assert_array_equal(default, gla(q, k, v, g, impl="xla")[0])
  np.testing.assert_array_equal(default, gla(q, k, v, g, impl="")[0])
  # The Pallas kernels are tested in test_gla_pallas.py; on CPU they need interpret=True.
  with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU"):
    gla(q, k, v, g, impl="pallas")
  with pytest.raises(ValueError, match="'reference', 'xla', 'pallas'"):
    gla(q, k, v, g, impl="cuda")
  o, state = gla(q[:, :0], k[:, :0], v[:, :0], g[:, :0], initial_state=h0.astype(jnp.bfloat16))
  assert o.shape == (B, 0, H, V) and state.dtype == jnp.float32
  np.testing.assert_array_equal(state, h0.astype(jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=(2, 8, 4)), "q must have rank 4"),
    (dict(log_gate=(2, 8, 4, 16, 1)), "log_gate must have rank 4"),
    (dict(k=(2, 8, 4, 8)), "k must have the shape of q"),
    (dict(log_gate=(2, 8, 1, 16)), "log_gate must have the shape of q"),
    (dict(v=(2, 9, 4, 16)), "v must have the batch, length and heads of q"),
    (dict(v=(1, 8, 4, 16)), "v must have the batch, length and heads of q"),
    (dict(k=np.int32), "k must be a float array"),
    (dict(initial_state=np.zeros((2, 4, 16, 8), np.float32)), "initial_state must be a float array"),
    (dict(initial_state=np.zeros((2, 4, 16, 32), np.int32)), "initial_state must be a float array"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(chunk_size=16.0), "chunk_size must be a positive int"),
    (dict(chunk_size=16, sub_chunk=5), r"sub_chunk \(5\) must divide chunk_size \(16\)"),
])
def test_validation_errors(kwargs, match):
  shapes = dict(q=(2, 8, 4, 16), k=(2, 8, 4, 16), v=(2, 8, 4, 32), log_gate=(2, 8, 4, 16))
  arrays = {}
  for name, shape in shapes.items():
    spec = kwargs.pop(name, shape)
    dtype = spec if not isinstance(spec, tuple) else np.float32
    arrays[name] = np.zeros(shape if not isinstance(spec, tuple) else spec, dtype)
  with pytest.raises(ValueError, match=match):
    gla(arrays["q"], arrays["k"], arrays["v"], arrays["log_gate"], **kwargs)


@pytest.mark.parametrize("shapes,match", [
    (dict(q=(2, 4, 16, 1)), "q must have rank 3"),
    (dict(v=(2, 4)), "v must have rank 3"),
    (dict(k=(2, 4, 8)), r"k must be a float array of shape \(2, 4, 16\)"),
    (dict(log_gate=(2, 3, 16)), r"log_gate must be a float array of shape \(2, 4, 16\)"),
    (dict(v=(1, 4, 32)), r"v must be a float array of shape \(2, 4, 32\)"),
    (dict(state=(2, 4, 32, 16)), r"state must be a float array of shape \(2, 4, 16, 32\)"),
])
def test_gla_step_validation_errors(shapes, match):
  full = dict(q=(2, 4, 16), k=(2, 4, 16), v=(2, 4, 32), log_gate=(2, 4, 16), state=(2, 4, 16, 32))
  full.update(shapes)
  arrays = {name: np.zeros(shape, np.float32) for name, shape in full.items()}
  with pytest.raises(ValueError, match=match):
    gla_step(**arrays)


def test_block_sizes():
  assert BlockSizes() == BlockSizes(64, 8)
  for bad in (0, -1, 2.0, True, None):
    with pytest.raises(ValueError, match="positive int"):
      BlockSizes(chunk_size=bad)
  with pytest.raises(ValueError, match="must divide"):
    BlockSizes(64, 24)
  with pytest.raises(dataclasses.FrozenInstanceError):
    BlockSizes().chunk_size = 8  # type: ignore[misc]
  assert BlockSizes.get_default(1000) == BlockSizes(64, 8)
  assert BlockSizes.get_default(63) == BlockSizes(64, 8)
  assert BlockSizes.get_default(5) == BlockSizes(8, 8)  # short: one chunk, not 64
  assert BlockSizes.get_default(5, 64, 4) == BlockSizes(8, 4)
  assert BlockSizes.get_default(1000, 64, 16) == BlockSizes(64, 16)  # fla's sub-chunk
  assert BlockSizes.get_default(1000, 20) == BlockSizes(20, 4)
  assert BlockSizes.get_default(1000, 7) == BlockSizes(7, 1)
  assert hash(BlockSizes(16, 8)) == hash(BlockSizes(16, 8))  # usable as a static argument
