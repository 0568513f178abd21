"""Tests for ops.attention: the XLA implementation against the f32 reference, and the reference's maths."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import testing
from ops.attention import BlockSizes
from ops.attention import attention

IMPLS = ("reference", "xla")
SMALL_BLOCKS = BlockSizes(block_q=16, block_kv=16)


def _attn_grads(impl, q, k, v, bias, cotangent, **kwargs):
  """o and (dq, dk, dv, dbias) of `attention` for one cotangent (dbias is None without bias)."""
  def fn(q, k, v, bias):
    return attention(q, k, v, key_bias=bias, impl=impl, **kwargs)
  o, grads = testing.vjp_outputs(fn, (q, k, v, bias), cotangent)
  return (o,) + tuple(grads)


def _f32(x):
  return None if x is None else x.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = 2
  q_len: int = 37
  kv_len: int | None = None  # None: self-attention (S == T)
  heads: int = 2
  kv_heads: int = 2
  head_dim: int = 16
  causal: bool = True
  signed: bool = False
  bias: str = "none"  # none | bs | bhs
  segments: bool = False
  blocks: BlockSizes | None = SMALL_BLOCKS


CASES = {
    "causal_mha_T37_D16": Case(),
    "bidir_gqa_T70_D33_bias": Case(batch=1, q_len=70, heads=4, kv_heads=2, head_dim=33, causal=False,
                                   bias="bs", blocks=BlockSizes(16, 32)),
    "causal_mqa_T130_D64_bias": Case(batch=1, q_len=130, heads=4, kv_heads=1, head_dim=64, bias="bhs",
                                     blocks=BlockSizes(32, 16)),
    "causal_gqa_segments_bias": Case(q_len=50, heads=4, kv_heads=2, bias="bhs", segments=True),
    "signed_causal_gqa_D33_bias": Case(q_len=45, heads=4, kv_heads=2, head_dim=33, signed=True,
                                       bias="bhs"),
    "signed_bidir_segments": Case(q_len=40, causal=False, signed=True, segments=True),
    "causal_T20_S53_end_aligned": Case(q_len=20, kv_len=53, heads=4, kv_heads=1),
    "causal_default_blocks_single": Case(q_len=24, heads=4, kv_heads=2, blocks=None),
}


def _make_inputs(case: Case, key, dtype=jnp.float32):
  kv_len = case.kv_len or case.q_len
  keys = jax.random.split(key, 4)
  q, k, v = testing.random_qkv(keys[0], case.batch, case.q_len, kv_len, case.heads, case.kv_heads,
                               case.head_dim, dtype)
  bias = None
  if case.bias == "bs":
    bias = testing.randn(keys[1], (case.batch, kv_len))
  elif case.bias == "bhs":
    bias = testing.randn(keys[1], (case.batch, case.kv_heads, kv_len))
  kwargs = dict(causal=case.causal, signed=case.signed, block_sizes=case.blocks)
  if case.segments:
    kwargs["segment_ids"] = testing.random_segment_ids(keys[2], case.batch, case.q_len, 3)
  cotangent = testing.randn(keys[3], (case.batch, case.q_len, case.heads, case.head_dim))
  return (q, k, v, bias), cotangent, kwargs


@pytest.mark.parametrize("name", list(CASES))
def test_xla_matches_reference_f32(name):
  case = CASES[name]
  (q, k, v, bias), cotangent, kwargs = _make_inputs(case, testing.prng_key(name))
  ref = _attn_grads("reference", q, k, v, bias, cotangent, **kwargs)
  out = _attn_grads("xla", q, k, v, bias, cotangent, **kwargs)
  for label, r, x in zip(("o", "dq", "dk", "dv", "dbias"), ref, out):
    if r is None:
      assert x is None
      continue
    assert x.shape == r.shape and x.dtype == r.dtype, label
    testing.assert_close(f"{name}/{label}", r, x, testing.F32_RATIO)


@pytest.mark.parametrize("signed", [False, True])
def test_xla_bf16_matches_f32_reference(signed):
  case = Case(q_len=48, heads=4, kv_heads=2, head_dim=64, signed=signed, bias="bhs", segments=True)
  inputs, cotangent, kwargs = _make_inputs(case, testing.prng_key(f"bf16{signed}"), jnp.bfloat16)
  q, k, v, bias = inputs
  bias = bias.astype(jnp.bfloat16)
  # The reference sees exactly the bf16-rounded values, upcast to f32.
  ref = _attn_grads("reference", _f32(q), _f32(k), _f32(v), _f32(bias), cotangent, **kwargs)
  out = _attn_grads("xla", q, k, v, bias, cotangent, **kwargs)
  assert out[0].dtype == jnp.bfloat16 and out[1].dtype == jnp.bfloat16
  testing.assert_close("o", ref[0], out[0], testing.BF16_FWD_RATIO)
  for label, r, x in zip(("dq", "dk", "dv", "dbias"), ref[1:], out[1:]):
    testing.assert_close(label, r, x, testing.BF16_GRAD_RATIO)


def test_reference_matches_jax_nn_dot_product_attention():
  q, k, v = testing.random_qkv(testing.prng_key("jaxnn"), 2, 33, 33, 4, 2, 16)
  for causal in (True, False):
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    got = attention(q, k, v, causal=causal, impl="reference")
    testing.assert_close(f"causal={causal}", expected, got, testing.F32_RATIO)


def _numpy_attention(q, k, v, bias, visible, scale, signed):
  """Closed form in float64 with explicit loops: returns o [B,T,H,D] and weights [B,H,T,S]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  group = h // hkv
  o = np.zeros_like(q)
  weights = np.zeros((b, h, t, s_len))
  for bi in range(b):
    for hi in range(h):
      kh = hi // group
      for i in range(t):
        vis = np.asarray(visible[bi, i], bool)
        if not vis.any():
          continue
        s = scale * k[bi, :, kh] @ q[bi, i, hi]
        if bias is not None:
          s = s + np.asarray(bias, np.float64)[bi, kh]
        a = np.abs(s) if signed else s
        e = np.where(vis, np.exp(a - a[vis].max()), 0.0)
        w = e / e.sum()
        if signed:
          w = np.sign(s) * w
        weights[bi, hi, i] = w
        o[bi, i, hi] = w @ v[bi, :, kh]
  return o, weights


@pytest.mark.parametrize("impl", IMPLS)
def test_signed_matches_numpy_closed_form(impl):
  b, t, h, hkv, d = 2, 12, 4, 2, 16
  keys = jax.random.split(testing.prng_key("signed_closed_form"), 3)
  q, k, _ = testing.random_qkv(keys[0], b, t, t, h, hkv, d, scale=2.0)
  bias = testing.randn(keys[1], (b, hkv, t))
  # One-hot values (S <= D) make the output row equal to the weight row: o[b, i, h, :S] = w[b, h, i].
  v = jnp.broadcast_to(jnp.eye(t, d)[None, :, None, :], (b, t, hkv, d))
  o = attention(q, k, v, causal=True, signed=True, key_bias=bias, impl=impl,
                block_sizes=BlockSizes(8, 8))
  visible = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
  o_np, w_np = _numpy_attention(q, k, v, bias, visible, d ** -0.5, signed=True)
  testing.assert_close("o", o_np, o, testing.F32_RATIO)
  w = np.moveaxis(np.asarray(o[..., :t]), 2, 1)  # [B, H, T, S]
  np.testing.assert_allclose(w, w_np, atol=1e-5)
  np.testing.assert_allclose(np.abs(w).sum(-1), 1.0, atol=1e-5)
  assert (w < 0).any(), "signed weights should include negative entries"
  np.testing.assert_array_equal(w[..., np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_softmax_matches_numpy_closed_form_with_positions(impl):
  # Arbitrary (non-monotonic) positions and a [B, S] bias, checked against the explicit formula.
  b, t, s, h, d = 2, 9, 21, 2, 33
  keys = jax.random.split(testing.prng_key("softmax_closed_form"), 4)
  q, k, v = testing.random_qkv(keys[0], b, t, s, h, h, d)
  bias = testing.randn(keys[1], (b, s))
  q_pos = jax.random.randint(keys[2], (b, t), 0, 25)
  kv_pos = jax.random.randint(keys[3], (b, s), 0, 25)
  o = attention(q, k, v, key_bias=bias, q_positions=q_pos, kv_positions=kv_pos, impl=impl,
                block_sizes=BlockSizes(4, 8))
  visible = np.asarray(kv_pos)[:, None, :] <= np.asarray(q_pos)[:, :, None]
  o_np, _ = _numpy_attention(q, k, v, np.asarray(bias)[:, None], visible, d ** -0.5, signed=False)
  testing.assert_close("o", o_np, o, testing.F32_RATIO)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_segment_isolation(impl, causal):
  b, t, h, d = 2, 40, 2, 16
  keys = jax.random.split(testing.prng_key(f"segments{impl}{causal}"), 2)
  q, k, v = testing.random_qkv(keys[0], b, t, t, h, h, d)
  seg = jnp.asarray([[1] * 15 + [2] * 12 + [3] * 13, [1] * 20 + [2] * 20], jnp.int32)
  in_seg2 = (seg == 2)[:, :, None, None]
  q2, k2, v2 = (jnp.where(in_seg2, x + testing.randn(keys[1], x.shape), x) for x in (q, k, v))
  fn = functools.partial(attention, causal=causal, segment_ids=seg, impl=impl,
                         block_sizes=SMALL_BLOCKS)
  o1, o2 = fn(q, k, v), fn(q2, k2, v2)
  others = ~np.asarray(in_seg2[:, :, 0, 0])
  np.testing.assert_allclose(np.asarray(o1)[others], np.asarray(o2)[others], rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(o1)[~others], np.asarray(o2)[~others])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias_value,signed", [(-1e9, False), (-np.inf, False), (-np.inf, True)])
def test_key_bias_mask_equals_dropping_keys(impl, bias_value, signed):
  # A finite -1e9 deletes a key only for softmax; under Cog only -inf is a hard mask (documented).
  b, t, h, d = 2, 30, 4, 16
  keys = jax.random.split(testing.prng_key(f"bias_drop{impl}{bias_value}{signed}"), 2)
  q, k, v = testing.random_qkv(keys[0], b, t, t, h, 2, d)
  keep = np.ones(t, bool)
  keep[[3, 4, 11, 17, 18, 19, 29]] = False
  bias = jnp.broadcast_to(jnp.where(keep, 0.0, bias_value), (b, t)).astype(jnp.float32)
  kwargs = dict(causal=True, signed=signed, impl=impl, block_sizes=SMALL_BLOCKS)
  o_bias, vjp = jax.vjp(lambda q, k, v, bias: attention(q, k, v, key_bias=bias, **kwargs),
                        q, k, v, bias)
  # Dropping keys: keep their original positions so the causal mask is unchanged.
  kept = np.flatnonzero(keep)
  o_drop = attention(q, k[:, kept], v[:, kept], q_positions=jnp.arange(t),
                     kv_positions=jnp.asarray(kept), **kwargs)
  testing.assert_close("o", o_drop, o_bias, testing.F32_RATIO)
  grads = vjp(testing.randn(keys[1], o_bias.shape))
  for label, grad in zip(("dq", "dk", "dv", "dbias"), grads):
    assert np.isfinite(np.asarray(grad)).all(), label
  np.testing.assert_array_equal(np.asarray(grads[1])[:, ~keep], 0.0)  # masked keys get no gradient


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("signed", [False, True])
def test_fully_masked_rows_are_zero_with_finite_grads(impl, signed):
  b, t, h, d = 2, 20, 2, 16
  keys = jax.random.split(testing.prng_key(f"fully_masked{impl}{signed}"), 3)
  q, k, v = testing.random_qkv(keys[0], b, t, t, h, 1, d)
  # Row 0 of batch 0: a query segment with no key. Rows 5..7 of batch 0: positions before every key.
  # Batch 1: every key has a -inf bias.
  seg = jnp.ones((b, t), jnp.int32).at[0, 0].set(7)
  kv_seg = jnp.ones((b, t), jnp.int32)
  q_pos = jnp.broadcast_to(jnp.arange(t), (b, t)).at[0, 5:8].set(-1)
  bias = jnp.zeros((b, t)).at[1].set(-jnp.inf)
  dead = np.zeros((b, t), bool)
  dead[0, [0, 5, 6, 7]] = True
  dead[1] = True

  def fn(q, k, v, bias):
    return attention(q, k, v, segment_ids=seg, kv_segment_ids=kv_seg, q_positions=q_pos,
                     key_bias=bias, signed=signed, impl=impl, block_sizes=BlockSizes(8, 8))
  o, grads = testing.vjp_outputs(fn, (q, k, v, bias), testing.randn(keys[1], q.shape))
  o = np.asarray(o)
  np.testing.assert_array_equal(o[dead], 0.0)
  assert np.abs(o[~dead]).min() > 0
  for label, grad in zip(("dq", "dk", "dv", "dbias"), grads):
    assert np.isfinite(np.asarray(grad)).all(), label
  np.testing.assert_array_equal(np.asarray(grads[0])[dead], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[3])[1], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_causality_via_gradients(impl):
  b, t, h, d, row = 1, 37, 2, 16, 20
  keys = jax.random.split(testing.prng_key(f"causality{impl}"), 2)
  q, k, v = testing.random_qkv(keys[0], b, t, t, h, h, d)
  ct = jnp.zeros((b, t, h, d)).at[:, row].set(testing.randn(keys[1], (b, h, d)))
  _, (dq, dk, dv) = testing.vjp_outputs(
      functools.partial(attention, impl=impl, block_sizes=SMALL_BLOCKS), (q, k, v), ct)
  for label, grad in (("dk", dk), ("dv", dv)):
    grad = np.abs(np.asarray(grad)).sum(axis=(0, 2, 3))
    assert (grad[row + 1:] == 0).all(), f"{label}: future keys get gradient"
    assert (grad[:row + 1] > 0).all(), f"{label}: visible keys get no gradient"
  dq = np.abs(np.asarray(dq)).sum(axis=(0, 2, 3))
  assert (np.delete(dq, row) == 0).all() and dq[row] > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_via", ["positions", "large_positions", "bias"])
def test_decode_step_equals_row_of_full_causal(impl, mask_via):
  b, s, h, hkv, d = 2, 40, 4, 2, 16
  keys = jax.random.split(testing.prng_key(f"decode{impl}{mask_via}"), 2)
  q, k, v = testing.random_qkv(keys[0], b, s, s, h, hkv, d)
  full = attention(q, k, v, causal=True, impl=impl, block_sizes=SMALL_BLOCKS)
  slots = jnp.arange(s)
  for t in (0, 17, s - 1):
    unfilled = (slots > t)[None, :, None, None]
    # Unfilled cache slots hold garbage that must not leak in.
    k_cache = jnp.where(unfilled, 1e3 * testing.randn(keys[1], k.shape), k)
    v_cache = jnp.where(unfilled, 1e3, v)
    kwargs = dict(causal=True, impl=impl, block_sizes=SMALL_BLOCKS)
    if mask_via == "positions":
      kwargs.update(q_positions=jnp.full((b, 1), t), kv_positions=jnp.broadcast_to(slots, (b, s)))
    elif mask_via == "large_positions":
      kwargs.update(q_positions=jnp.full((b, 1), t),
                    kv_positions=jnp.broadcast_to(jnp.where(slots > t, 2**30, slots), (b, s)))
    else:  # default q position S - 1 sees every slot; the -inf bias removes the unfilled ones
      kwargs.update(key_bias=jnp.broadcast_to(jnp.where(slots > t, -jnp.inf, 0.0), (b, s)))
    o = attention(q[:, t:t + 1], k_cache, v_cache, **kwargs)
    testing.assert_close(f"t={t}", full[:, t:t + 1], o, testing.F32_RATIO)


@pytest.mark.parametrize("signed", [False, True])
def test_chunked_prefill_default_positions_align_to_end(signed):
  # T < S with default positions: the T queries are the last T positions of the S keys.
  b, s, t, h, d = 1, 48, 13, 2, 16
  q, k, v = testing.random_qkv(testing.prng_key(f"chunked{signed}"), b, s, s, h, h, d)
  full = attention(q, k, v, signed=signed, impl="xla", block_sizes=SMALL_BLOCKS)
  chunk = attention(q[:, s - t:], k, v, signed=signed, impl="xla", block_sizes=SMALL_BLOCKS)
  testing.assert_close("chunk", full[:, s - t:], chunk, testing.F32_RATIO)


def test_xla_under_jit_and_vmap_is_block_size_invariant():
  q, k, v = testing.random_qkv(testing.prng_key("jit_blocks"), 2, 29, 29, 2, 2, 16)
  seg = testing.random_segment_ids(testing.prng_key("jit_blocks_seg"), 2, 29, 3)
  ref = attention(q, k, v, segment_ids=seg, impl="reference")

  @functools.partial(jax.jit, static_argnames="blocks")
  def run(q, k, v, seg, blocks):
    return attention(q, k, v, segment_ids=seg, impl="xla", block_sizes=blocks)
  for blocks in (BlockSizes(8, 8), BlockSizes(5, 29), BlockSizes(64, 7)):
    testing.assert_close(str(blocks), ref, run(q, k, v, seg, blocks), testing.F32_RATIO)
  # vmap over an extra leading axis (lax.cond turns into select) still agrees.
  vmapped = jax.vmap(lambda q, k, v, seg: attention(q[None], k[None], v[None], segment_ids=seg[None],
                                                    impl="xla", block_sizes=SMALL_BLOCKS)[0])
  testing.assert_close("vmap", ref, vmapped(q, k, v, seg), testing.F32_RATIO)


def _largest_intermediate(jaxpr) -> int:
  """Largest number of elements of any value produced anywhere in a (closed) jaxpr, sub-jaxprs included."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          largest = max(largest, _largest_intermediate(getattr(inner, "jaxpr", inner)))
  return largest


def test_xla_never_materialises_full_logits():
  b, t, h, d = 1, 256, 2, 16
  q, k, v = testing.random_qkv(testing.prng_key("memory"), b, t, t, h, h, d)
  blocks = BlockSizes(32, 64)

  def loss(q, k, v):
    return jnp.sum(attention(q, k, v, signed=True, impl="xla", block_sizes=blocks) ** 2)
  fwd = jax.make_jaxpr(loss)(q, k, v)
  bwd = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  # A [B, H, T, S] logits tensor would be 131072 elements; one tile is 2 * 32 * 64 = 4096.
  full_logits = b * h * t * t
  assert _largest_intermediate(fwd.jaxpr) < full_logits // 8
  assert _largest_intermediate(bwd.jaxpr) < full_logits // 8
  ref = jax.make_jaxpr(lambda q, k, v: attention(q, k, v, impl="reference"))(q, k, v)
  assert _largest_intermediate(ref.jaxpr) >= full_logits  # sanity check of the walker


def test_scale_argument():
  q, k, v = testing.random_qkv(testing.prng_key("scale"), 1, 10, 10, 2, 2, 16)
  for impl in IMPLS:
    a = attention(q, k, v, scale=0.3, impl=impl)
    b = attention(q * (0.3 / 16 ** -0.5), k, v, impl=impl)
    testing.assert_close(impl, b, a, testing.F32_RATIO)


def test_impl_dispatch():
  q, k, v = testing.random_qkv(testing.prng_key("dispatch"), 1, 8, 8, 2, 2, 16)
  default = attention(q, k, v)
  np.testing.assert_array_equal(default, attention(q, k, v, impl="xla"))
  np.testing.assert_array_equal(default, attention(q, k, v, impl=""))
  with pytest.raises(NotImplementedError, match="impl='pallas' is not implemented yet"):
    attention(q, k, v, impl="pallas")
  with pytest.raises(ValueError, match="'reference', 'xla', 'pallas'"):
    attention(q, k, v, impl="cuda")


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=(2, 8, 4)), "q must have rank 4"),
    (dict(k=(2, 8, 3, 16), v=(2, 8, 3, 16)), "multiple of the number of kv heads"),
    (dict(k=(2, 8, 2, 8), v=(2, 8, 2, 8)), "same head_dim"),
    (dict(v=(2, 9, 2, 16)), "k and v must have the same shape"),
    (dict(k=(1, 8, 2, 16), v=(1, 8, 2, 16)), "same batch size"),
    (dict(segment_ids=np.zeros((2, 7), np.int32)), "segment_ids must be an integer array"),
    (dict(segment_ids=np.zeros((2, 8), np.float32)), "segment_ids must be an integer array"),
    (dict(k=(2, 9, 2, 16), v=(2, 9, 2, 16), segment_ids=np.zeros((2, 8), np.int32)),
     "needs as many keys as queries"),
    (dict(kv_segment_ids=np.zeros((2, 8), np.int32)), "requires segment_ids"),
    (dict(key_bias=np.zeros((2, 4, 8), np.float32)), "key_bias must be a float array"),
    (dict(key_bias=np.zeros((2, 9), np.float32)), "key_bias must be a float array"),
    (dict(q_positions=np.zeros((2, 3), np.int32)), "q_positions must be an integer array"),
    (dict(kv_positions=np.zeros((2, 8), np.float32)), "kv_positions must be an integer array"),
    (dict(block_sizes=(8, 8)), "block_sizes must be a BlockSizes"),
])
def test_validation_errors(kwargs, match):
  shapes = dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 8, 2, 16))
  for name in shapes:
    shapes[name] = kwargs.pop(name, shapes[name])
  q, k, v = (jnp.zeros(shapes[name]) for name in ("q", "k", "v"))
  with pytest.raises(ValueError, match=match):
    attention(q, k, v, **kwargs)


def test_block_sizes():
  assert BlockSizes() == BlockSizes(512, 512)
  for bad in (0, -1, 2.0, True, None):
    with pytest.raises(ValueError, match="positive int"):
      BlockSizes(block_q=bad)
  with pytest.raises(dataclasses.FrozenInstanceError):
    BlockSizes().block_q = 8  # type: ignore[misc]
  assert BlockSizes.get_default(5, 1000, 64, jnp.float32, "cpu") == BlockSizes(8, 512)
  assert BlockSizes.get_default(4096, 4096, 256, jnp.bfloat16, "tpu") == BlockSizes(256, 512)
  assert hash(BlockSizes(16, 16)) == hash(SMALL_BLOCKS)  # static-argument friendly


def test_assert_close_metric():
  ref = np.linspace(-1.0, 1.0, 101)
  testing.assert_close("same", ref, ref, testing.F32_RATIO)
  testing.assert_close("abs floor", ref * 1e-9, np.zeros_like(ref), 1e-12)
  testing.assert_close("small", ref, ref * (1 + 1e-3), testing.F32_RATIO)
  with pytest.raises(AssertionError, match="err ratio"):
    testing.assert_close("large", ref, ref * 1.1, testing.F32_RATIO)
  with pytest.raises(AssertionError, match="NaN"):
    testing.assert_close("nan", ref, np.where(ref > 0.5, np.nan, ref), 1.0)
  with pytest.raises(AssertionError, match="NaN"):
    testing.assert_close("nan ref", np.full(3, np.nan), np.zeros(3), 1.0)
  with pytest.raises(AssertionError, match="shape"):
    testing.assert_close("shape", ref, ref[:-1], 1.0)
  assert testing.error_ratio(ref, ref + 0.1) == pytest.approx(0.1 / testing.rms(ref), rel=1e-6)
