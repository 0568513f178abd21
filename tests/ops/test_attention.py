"""Tests for ops.attention: the XLA and Pallas implementations against the f32 reference, and the
reference's maths.

Both Pallas kernels run in interpret mode on CPU ("pallas_tpu" through `pltpu.InterpretParams()`,
"pallas_gpu" through the generic interpreter): every call here passes interpret=True, which the reference
and XLA implementations ignore. XLA compiles dominate the runtime on CPU, so inputs come from numpy,
forward+backward are jitted together, and most tests share one shape (B=2, T=37, H=4, Hkv=2, D=16) so
compiled executables are reused.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import testing
from ops.attention import BlockSizes
from ops.attention import attention as _attention

# Every call interprets Pallas kernels (the other implementations ignore the flag).
attention = functools.partial(_attention, interpret=True)
# The TPU kernel in `pltpu.InterpretParams()` mode simulates the TPU memory system and costs ~50 ms per grid
# step on CPU, so the full matrix runs it only with --runslow; `test_pallas_tpu_interpret` below covers
# every feature in the default suite at small grids.
_TPU_SLOW = pytest.param("pallas_tpu", marks=pytest.mark.slow)
KERNEL_IMPLS = ("xla", "pallas_gpu", _TPU_SLOW)  # the implementations under test
IMPLS = ("reference",) + KERNEL_IMPLS
SMALL_BLOCKS = BlockSizes(block_q=16, block_kv=16)
B, T, H, HKV, D = 2, 37, 4, 2, 16  # the shared shape: T is not a multiple of the blocks


@functools.partial(jax.jit, static_argnames=("impl", "causal", "signed", "block_sizes"))
def _attn_grads(impl, q, k, v, bias, cotangent, segment_ids=None, q_positions=None,
                kv_positions=None, kv_segment_ids=None, *, causal=True, signed=False,
                block_sizes=SMALL_BLOCKS):
  """o and (dq, dk, dv, dbias) of `attention` for one cotangent (dbias is None without bias)."""
  def fn(q, k, v, bias):
    return attention(q, k, v, key_bias=bias, segment_ids=segment_ids, q_positions=q_positions,
                     kv_positions=kv_positions, kv_segment_ids=kv_segment_ids, causal=causal,
                     signed=signed, impl=impl, block_sizes=block_sizes)
  o, grads = testing.vjp_outputs(fn, (q, k, v, bias), cotangent)
  return (o,) + tuple(grads)


def _f32(x):
  return None if x is None else x.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = B
  q_len: int = T
  kv_len: int | None = None  # None: self-attention (S == T)
  heads: int = H
  kv_heads: int = HKV
  head_dim: int = D
  causal: bool = True
  signed: bool = False
  bias: str = "none"  # none | bs ([B, S]) | bhs ([B, Hkv, S])
  segments: bool = False
  blocks: BlockSizes | None = SMALL_BLOCKS


CASES = {
    "causal_gqa_segments_bias": Case(bias="bhs", segments=True),
    "signed_causal_gqa_segments_bias": Case(signed=True, bias="bhs", segments=True),
    "bidir_mha_T70_D33_bias": Case(batch=1, q_len=70, heads=2, kv_heads=2, head_dim=33,
                                   causal=False, bias="bs", blocks=BlockSizes(16, 32)),
    "signed_bidir_mqa_segments": Case(q_len=40, kv_heads=1, causal=False, signed=True,
                                      segments=True, bias="bs"),
    "causal_mqa_T130_D64": Case(batch=1, q_len=130, kv_heads=1, head_dim=64,
                                blocks=BlockSizes(32, 16)),
    "bidir_signed_T40_D128_bias": Case(batch=1, q_len=40, heads=2, kv_heads=1, head_dim=128,
                                       causal=False, signed=True, bias="bs"),
    "causal_T20_S53_end_aligned_default_blocks": Case(q_len=20, kv_len=53, heads=2, kv_heads=1,
                                                      blocks=None),
}


def _make_inputs(case: Case, gen, dtype=jnp.float32):
  kv_len = case.kv_len or case.q_len
  q, k, v = testing.random_qkv(gen, case.batch, case.q_len, kv_len, case.heads, case.kv_heads,
                               case.head_dim, dtype)
  bias = None
  if case.bias == "bs":
    bias = testing.randn(gen, (case.batch, kv_len))
  elif case.bias == "bhs":
    bias = testing.randn(gen, (case.batch, case.kv_heads, kv_len))
  segment_ids = None
  if case.segments:
    segment_ids = testing.random_segment_ids(gen, case.batch, case.q_len, 3)
  cotangent = testing.randn(gen, (case.batch, case.q_len, case.heads, case.head_dim))
  kwargs = dict(causal=case.causal, signed=case.signed, block_sizes=case.blocks)
  return (q, k, v, bias, cotangent, segment_ids), kwargs


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_f32(name, impl):
  case = CASES[name]
  args, kwargs = _make_inputs(case, testing.rng(name))
  ref = _attn_grads("reference", *args, **kwargs)
  out = _attn_grads(impl, *args, **kwargs)
  for label, r, x in zip(("o", "dq", "dk", "dv", "dbias"), ref, out):
    if r is None:
      assert x is None
      continue
    assert x.shape == r.shape and x.dtype == r.dtype, label
    testing.assert_close(f"{name}/{label}", r, x, testing.F32_RATIO)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("signed", [False, True])
def test_bf16_matches_f32_reference(signed, impl):
  case = Case(head_dim=64, signed=signed, bias="bhs", segments=True)
  (q, k, v, bias, cotangent, seg), kwargs = _make_inputs(case, testing.rng(f"bf16{signed}"),
                                                         jnp.bfloat16)
  bias = bias.astype(jnp.bfloat16)
  # The reference sees exactly the bf16-rounded values, upcast to f32.
  ref = _attn_grads("reference", _f32(q), _f32(k), _f32(v), _f32(bias), cotangent, seg, **kwargs)
  out = _attn_grads(impl, q, k, v, bias, cotangent, seg, **kwargs)
  assert all(x.dtype == jnp.bfloat16 for x in out)
  testing.assert_close("o", ref[0], out[0], testing.BF16_FWD_RATIO)
  for label, r, x in zip(("dq", "dk", "dv", "dbias"), ref[1:], out[1:]):
    testing.assert_close(label, r, x, testing.BF16_GRAD_RATIO)


def test_reference_matches_jax_nn_dot_product_attention():
  q, k, v = testing.random_qkv(testing.rng("jax_nn"), B, T, T, H, HKV, D)
  for causal in (True, False):
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    got = attention(q, k, v, causal=causal, impl="reference")
    testing.assert_close(f"causal={causal}", expected, got, testing.F32_RATIO)


def _numpy_attention(q, k, v, bias, visible, scale, signed):
  """Closed form in float64 with explicit loops. bias [B, Hb, S] or None; visible [B, T, S].

  Returns o [B, T, H, D] and the weights [B, H, T, S].
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, _ = q.shape
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
          s = s + np.asarray(bias, np.float64)[bi, kh if bias.shape[1] > 1 else 0]
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
  gen = testing.rng("signed_closed_form")
  q, k, _ = testing.random_qkv(gen, b, t, t, h, hkv, d, scale=2.0)
  bias = testing.randn(gen, (b, hkv, t))
  # One-hot values (S <= D) make the output row equal to the weight row: o[b, i, h, :S] = w[b, h, i].
  v = jnp.asarray(np.broadcast_to(np.eye(t, d, dtype=np.float32)[None, :, None], (b, t, hkv, d)))
  o = attention(q, k, v, causal=True, signed=True, key_bias=bias, impl=impl,
                block_sizes=BlockSizes(8, 8))
  visible = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))
  o_np, w_np = _numpy_attention(q, k, v, bias, visible, d ** -0.5, signed=True)
  testing.assert_close("o", o_np, o, testing.F32_RATIO)
  w = np.moveaxis(np.asarray(o[..., :t]), 2, 1)  # [B, H, T, S]
  np.testing.assert_allclose(w, w_np, atol=1e-5)
  np.testing.assert_allclose(np.abs(w).sum(-1), 1.0, atol=1e-5)  # sum_j |w_ij| == 1
  assert (w < 0).any() and (w > 0).any()
  assert (w[..., ~np.tril(np.ones((t, t), bool))] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_softmax_matches_numpy_closed_form_with_positions(impl):
  # Arbitrary (non-monotonic, repeated) positions and a [B, S] bias against the explicit formula.
  b, t, s, h, d = 2, 9, 21, 2, 33
  gen = testing.rng("softmax_closed_form")
  q, k, v = testing.random_qkv(gen, b, t, s, h, h, d)
  bias = testing.randn(gen, (b, s))
  q_pos = gen.integers(0, 25, (b, t)).astype(np.int32)
  kv_pos = gen.integers(0, 25, (b, s)).astype(np.int32)
  o = attention(q, k, v, key_bias=bias, q_positions=q_pos, kv_positions=kv_pos, impl=impl,
                block_sizes=BlockSizes(4, 8))
  visible = kv_pos[:, None, :] <= q_pos[:, :, None]
  o_np, _ = _numpy_attention(q, k, v, np.asarray(bias)[:, None], visible, d ** -0.5, signed=False)
  testing.assert_close("o", o_np, o, testing.F32_RATIO)


@pytest.mark.parametrize("impl", IMPLS)
def test_segment_isolation(impl):
  gen = testing.rng(f"segments{impl}")
  q, k, v = testing.random_qkv(gen, B, T, T, H, HKV, D)
  seg = np.asarray([[1] * 15 + [2] * 12 + [3] * 10, [1] * 20 + [2] * 17], np.int32)
  in_seg2 = (seg == 2)[:, :, None, None]
  q2, k2, v2 = (jnp.where(in_seg2, x + testing.randn(gen, x.shape), x) for x in (q, k, v))
  for causal in (True, False):
    fn = functools.partial(attention, causal=causal, segment_ids=seg, impl=impl,
                           block_sizes=SMALL_BLOCKS)
    o1, o2 = np.asarray(fn(q, k, v)), np.asarray(fn(q2, k2, v2))
    others = seg != 2
    np.testing.assert_allclose(o1[others], o2[others], rtol=1e-6, atol=1e-6)
    assert not np.allclose(o1[~others], o2[~others])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("signed", [False, True])
def test_key_bias_mask_equals_dropping_keys(impl, signed):
  gen = testing.rng(f"bias_drop{impl}{signed}")
  q, k, v = testing.random_qkv(gen, B, T, T, H, HKV, D)
  cotangent = testing.randn(gen, q.shape)
  keep = np.ones(T, bool)
  keep[[3, 4, 11, 16, 17, 18, 19, 36]] = False
  kept = np.flatnonzero(keep)
  # Dropping keys: keep their original positions so the causal mask is unchanged.
  o_drop = attention(q, k[:, kept], v[:, kept], q_positions=np.arange(T),
                     kv_positions=kept, signed=signed, impl=impl, block_sizes=SMALL_BLOCKS)
  # A finite -1e9 deletes a key only for softmax; under Cog only -inf is a hard mask (documented).
  for value in (-np.inf,) if signed else (-1e9, -np.inf):
    bias = jnp.asarray(np.broadcast_to(np.where(keep, 0.0, value), (B, T)).astype(np.float32))
    o, *grads = _attn_grads(impl, q, k, v, bias, cotangent, signed=signed)
    testing.assert_close(f"o bias={value}", o_drop, o, testing.F32_RATIO)
    for label, grad in zip(("dq", "dk", "dv", "dbias"), grads):
      assert np.isfinite(np.asarray(grad)).all(), label
    np.testing.assert_array_equal(np.asarray(grads[1])[:, ~keep], 0.0)  # dropped keys: no gradient


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("signed", [False, True])
def test_fully_masked_rows_are_zero_with_finite_grads(impl, signed):
  gen = testing.rng(f"fully_masked{impl}{signed}")
  q, k, v = testing.random_qkv(gen, B, T, T, H, HKV, D)
  cotangent = testing.randn(gen, q.shape)
  # Batch 0: query 0 is in a segment no key has; queries 5..7 sit before every key position.
  # Batch 1: every key has a -inf bias.
  seg = np.ones((B, T), np.int32)
  seg[0, 0] = 7
  q_pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
  q_pos[0, 5:8] = -1
  bias = jnp.asarray(np.where(np.arange(B)[:, None, None] == 1, -np.inf, 0.0)
                     * np.ones((B, HKV, T), np.float32), jnp.float32)
  dead = np.zeros((B, T), bool)
  dead[0, [0, 5, 6, 7]] = True
  dead[1] = True
  o, *grads = _attn_grads(impl, q, k, v, bias, cotangent, seg, q_pos, None, np.ones((B, T), np.int32),
                          signed=signed)
  o = np.asarray(o)
  np.testing.assert_array_equal(o[dead], 0.0)
  assert np.abs(o[~dead]).min() > 0
  for label, grad in zip(("dq", "dk", "dv", "dbias"), grads):
    assert np.isfinite(np.asarray(grad)).all(), label
  np.testing.assert_array_equal(np.asarray(grads[0])[dead], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[3])[1], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_causality_via_gradients(impl):
  row = 20
  gen = testing.rng(f"causality{impl}")
  q, k, v = testing.random_qkv(gen, B, T, T, H, HKV, D)
  cotangent = np.zeros((B, T, H, D), np.float32)
  cotangent[:, row] = gen.standard_normal((B, H, D))
  _, dq, dk, dv, _ = _attn_grads(impl, q, k, v, None, jnp.asarray(cotangent))
  for label, grad in (("dk", dk), ("dv", dv)):
    grad = np.abs(np.asarray(grad)).sum(axis=(0, 2, 3))
    assert (grad[row + 1:] == 0).all(), f"{label}: future keys get gradient"
    assert (grad[:row + 1] > 0).all(), f"{label}: visible keys get no gradient"
  dq = np.abs(np.asarray(dq)).sum(axis=(0, 2, 3))
  assert (np.delete(dq, row) == 0).all() and dq[row] > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_step_equals_row_of_full_causal(impl):
  gen = testing.rng(f"decode{impl}")
  q, k, v = testing.random_qkv(gen, B, T, T, H, HKV, D)
  full = np.asarray(attention(q, k, v, causal=True, impl=impl, block_sizes=SMALL_BLOCKS))
  slots = np.arange(T, dtype=np.int32)
  garbage = 1e3 * gen.standard_normal(k.shape).astype(np.float32)
  for t in (0, 17, T - 1):
    unfilled = slots > t
    # Unfilled cache slots hold garbage that must not leak in.
    k_cache = jnp.asarray(np.where(unfilled[None, :, None, None], garbage, k))
    v_cache = jnp.asarray(np.where(unfilled[None, :, None, None], garbage, v))
    at_t = np.full((B, 1), t, np.int32)
    variants = {
        # Slot index as position: causal masking alone hides the unfilled slots.
        "positions": dict(q_positions=at_t, kv_positions=np.broadcast_to(slots, (B, T))),
        # Unfilled slots get a position larger than any query.
        "large_positions": dict(q_positions=at_t,
                                kv_positions=np.broadcast_to(np.where(unfilled, 2**30, slots),
                                                             (B, T))),
        # Default query position S - 1 sees every slot; a -inf bias removes the unfilled ones.
        "bias": dict(key_bias=np.broadcast_to(np.where(unfilled, -np.inf, 0.0),
                                              (B, T)).astype(np.float32)),
    }
    for name, kwargs in variants.items():
      o = attention(q[:, t:t + 1], k_cache, v_cache, causal=True, impl=impl,
                    block_sizes=SMALL_BLOCKS, **kwargs)
      testing.assert_close(f"t={t} {name}", full[:, t:t + 1], o, testing.F32_RATIO)


@pytest.mark.parametrize("signed", [False, True])
def test_chunked_prefill_default_positions_align_to_end(signed):
  # T < S with default positions: the queries are the last T of the S positions.
  chunk = 13
  q, k, v = testing.random_qkv(testing.rng(f"chunked{signed}"), B, T, T, H, HKV, D)
  full = attention(q, k, v, signed=signed, impl="xla", block_sizes=SMALL_BLOCKS)
  part = attention(q[:, T - chunk:], k, v, signed=signed, impl="xla", block_sizes=SMALL_BLOCKS)
  testing.assert_close("chunk", full[:, T - chunk:], part, testing.F32_RATIO)


def test_xla_block_size_invariance_under_jit_and_vmap():
  gen = testing.rng("blocks")
  q, k, v = testing.random_qkv(gen, B, T, T, H, HKV, D)
  seg = testing.random_segment_ids(gen, B, T, 3)
  ref = attention(q, k, v, segment_ids=seg, impl="reference")

  @functools.partial(jax.jit, static_argnames="blocks")
  def run(q, k, v, seg, blocks):
    return attention(q, k, v, segment_ids=seg, impl="xla", block_sizes=blocks)
  for blocks in (BlockSizes(5, 37), BlockSizes(64, 7)):
    testing.assert_close(str(blocks), ref, run(q, k, v, seg, blocks), testing.F32_RATIO)
  # vmap over the batch (lax.cond becomes select) still agrees.
  vmapped = jax.vmap(lambda q, k, v, seg: attention(q[None], k[None], v[None], segment_ids=seg[None],
                                                    impl="xla", block_sizes=SMALL_BLOCKS)[0])
  testing.assert_close("vmap", ref, vmapped(q, k, v, seg), testing.F32_RATIO)


def test_xla_never_materialises_full_logits():
  b, t, h, d = 1, 256, 2, 16
  q, k, v = testing.random_qkv(testing.rng("memory"), b, t, t, h, h, d)
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]

  def loss(impl, q, k, v):
    return jnp.sum(attention(q, k, v, signed=True, impl=impl, block_sizes=BlockSizes(32, 64)) ** 2)
  full_logits = b * h * t * t  # one tile is b * h * 32 * 64, 16x smaller
  xla_loss = functools.partial(loss, "xla")
  assert testing.largest_intermediate(jax.make_jaxpr(xla_loss)(*shapes).jaxpr) < full_logits // 8
  grad = jax.grad(xla_loss, argnums=(0, 1, 2))
  assert testing.largest_intermediate(jax.make_jaxpr(grad)(*shapes).jaxpr) < full_logits // 8
  ref_loss = functools.partial(loss, "reference")  # sanity check of the walker
  assert testing.largest_intermediate(jax.make_jaxpr(ref_loss)(*shapes).jaxpr) >= full_logits


TPU_INTERPRET_CASES = {
    # Small grids (<= 2 x 3 tiles per head) that still cross tile boundaries on both axes.
    "causal_signed_gqa_segments_bias_D64": Case(batch=1, q_len=21, heads=2, kv_heads=1, head_dim=64,
                                                signed=True, bias="bhs", segments=True,
                                                blocks=BlockSizes(16, 8)),
    "bidir_D128_bias": Case(batch=1, q_len=12, kv_len=20, heads=1, kv_heads=1, head_dim=128,
                            causal=False, bias="bs", blocks=BlockSizes(8, 8)),
}


@pytest.mark.parametrize("name", list(TPU_INTERPRET_CASES))
def test_pallas_tpu_interpret(name):
  case = TPU_INTERPRET_CASES[name]
  args, kwargs = _make_inputs(case, testing.rng(name))
  ref = _attn_grads("reference", *args, **kwargs)
  out = _attn_grads("pallas_tpu", *args, **kwargs)
  for label, r, x in zip(("o", "dq", "dk", "dv", "dbias"), ref, out):
    assert x.shape == r.shape and x.dtype == r.dtype, label
    testing.assert_close(f"{name}/{label}", r, x, testing.F32_RATIO)


def test_scale_argument():
  q, k, v = testing.random_qkv(testing.rng("scale"), B, T, T, H, HKV, D)
  for impl in ("reference", "xla", "pallas_gpu"):
    scaled = attention(q, k, v, scale=0.3, impl=impl, block_sizes=SMALL_BLOCKS)
    default = attention(q * (0.3 / D ** -0.5), k, v, impl=impl, block_sizes=SMALL_BLOCKS)
    testing.assert_close(impl, default, scaled, testing.F32_RATIO)


def test_impl_dispatch():
  q, k, v = testing.random_qkv(testing.rng("dispatch"), B, T, T, H, HKV, D)
  default = np.asarray(attention(q, k, v))
  np.testing.assert_array_equal(default, attention(q, k, v, impl="xla"))
  np.testing.assert_array_equal(default, attention(q, k, v, impl=""))
  empty = attention(q, k[:, :0], v[:, :0], impl="xla")  # no keys: every row is fully masked
  assert empty.shape == q.shape and not np.asarray(empty).any()
  # On CPU "pallas" is the TPU kernel in interpret mode, and needs interpret=True.
  small = (q[:1, :8, :1], k[:1, :8, :1], v[:1, :8, :1])
  np.testing.assert_array_equal(attention(*small, impl="pallas_tpu"), attention(*small, impl="pallas"))
  with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU"):
    _attention(q, k, v, impl="pallas")
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
    (dict(key_bias=np.zeros((2, 8), np.int32)), "key_bias must be a float array"),
    (dict(q_positions=np.zeros((2, 3), np.int32)), "q_positions must be an integer array"),
    (dict(kv_positions=np.zeros((2, 8), np.float32)), "kv_positions must be an integer array"),
    (dict(block_sizes=(8, 8)), "block_sizes must be a BlockSizes"),
])
def test_validation_errors(kwargs, match):
  shapes = dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 8, 2, 16))
  for name in shapes:
    shapes[name] = kwargs.pop(name, shapes[name])
  q, k, v = (np.zeros(shapes[name], np.float32) for name in ("q", "k", "v"))
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
  assert hash(BlockSizes(16, 16)) == hash(SMALL_BLOCKS)  # usable as a static argument


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
