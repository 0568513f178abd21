"""ops.attention's ByT5 / MrT5 options (specs/token_free.md §2.3, §3.3): the T5 relative position bias
(`relative_bias` table, bucketed from q/kv positions), softmax1 (`exp(s) / (1 + sum exp(s))`) and T5's
scale=1, in every implementation, against an oracle written here from the formulas.

The oracle buckets with `_t5_bucket` below (plain Python, transcribed from T5's
`_relative_position_bucket`; it imports nothing from ops), materialises the [B, H, T, S] logits in jnp and
gets every gradient (q, k, v, table, key_bias) by autodiff. Both Pallas kernels run in interpret mode
("pallas_tpu" through `pltpu.InterpretParams()`, "pallas_gpu" through the generic interpreter) on tiny
shapes; comparisons use the DESIGN.md §8 metric (`ops.testing.assert_close`).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import testing
from ops.attention import BlockSizes
from ops.attention import attention as _attention
from ops.attention.relative_bias import relative_position_bucket

attention = functools.partial(_attention, interpret=True)  # ignored by "reference" and "xla"
IMPLS = ("reference", "xla", "pallas_tpu", "pallas_gpu")
BLOCKS = BlockSizes(block_q=8, block_kv=8)
# The TPU interpreter costs ~50 ms per grid step: fewer, larger tiles (T = 21 still spans two).
TPU_BLOCKS = BlockSizes(block_q=16, block_kv=16)
HIGHEST = jax.lax.Precision.HIGHEST


def _t5_bucket(relative_position: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
  """T5's `_relative_position_bucket` for one relative_position = memory_position - query_position
  (HF transformers `T5Attention`; mesh-tensorflow is the same with n = -relative_position), log in f32."""
  ret = 0
  if bidirectional:
    num_buckets //= 2
    ret += num_buckets if relative_position > 0 else 0
    n = abs(relative_position)
  else:
    n = -min(relative_position, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  f32 = np.float32
  large = max_exact + int(f32(np.log(f32(n) / f32(max_exact))) / f32(math.log(max_distance / max_exact))
                          * f32(num_buckets - max_exact))
  return ret + min(large, num_buckets - 1)


def _buckets(q_pos, kv_pos, bidirectional, num_buckets, max_distance) -> np.ndarray:
  """[B, T, S] buckets of kv_pos - q_pos."""
  rel = np.asarray(kv_pos)[:, None, :] - np.asarray(q_pos)[:, :, None]
  bucket = [_t5_bucket(int(r), bidirectional, num_buckets, max_distance) for r in rel.ravel()]
  return np.asarray(bucket, np.int32).reshape(rel.shape)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (10, 16)])
def test_bucket_matches_t5_formula(bidirectional, num_buckets, max_distance):
  if bidirectional and num_buckets % 2:
    pytest.skip("bidirectional tables have an even width")
  rel = np.arange(-300, 301)
  expected = [_t5_bucket(int(r), bidirectional, num_buckets, max_distance) for r in rel]
  got = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional, num_buckets=num_buckets,
                                 max_distance=max_distance)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), expected)
  assert np.asarray(got).min() == 0 and np.asarray(got).max() == num_buckets - 1


def test_bucket_anchor_values():
  """A few values of T5's 32-bucket, max-distance-128 tables worked out by hand from the formula."""
  enc = functools.partial(_t5_bucket, bidirectional=True, num_buckets=32, max_distance=128)
  dec = functools.partial(_t5_bucket, bidirectional=False, num_buckets=32, max_distance=128)
  # Encoder: keys before the query use buckets 0..15, after it 16..31; |rp| < 8 is exact.
  # 64: 8 + 8 * log(64 / 8) / log(128 / 8) = 8 + 6, plus 16 for rp > 0.
  assert [enc(r) for r in (0, -1, -7, 1, 7, -8, 8, 64, -128, 10**6)] == [0, 1, 7, 17, 23, 8, 24, 30, 15,
                                                                          31]
  # Decoder: future keys (rp > 0) share bucket 0; |rp| < 16 is exact; -64: 16 + int(16 * log(4) / log(8)).
  assert [dec(r) for r in (5, 0, -15, -16, -64, -128, -10**6)] == [0, 0, 15, 16, 26, 31, 31]


def _oracle(q, k, v, table, key_bias, *, buckets, visible, scale, softmax1, signed=False):
  """Materialised attention from the formulas. table [H, N] or None, key_bias [B, S] / [B, Hkv, S] or None,
  buckets [B, T, S] int, visible [B, T, S] bool. softmax1: one more key of logit 0 and value 0."""
  h, hkv = q.shape[2], k.shape[2]
  g = h // hkv
  kh, vh = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = scale * jnp.einsum("bthd,bshd->bhts", q, kh, precision=HIGHEST)
  mask = jnp.asarray(visible)[:, None]
  if key_bias is not None:
    kb = key_bias[:, None] if key_bias.ndim == 2 else jnp.repeat(key_bias, g, axis=1)
    s = s + kb[:, :, None, :]
    mask = mask & (kb[:, :, None, :] > -jnp.inf)
  if table is not None:
    s = s + jnp.moveaxis(table[:, buckets], 0, 1)
  s = jnp.where(mask, s, 0.0)
  a = jnp.abs(s) if signed else s
  cols = jnp.where(mask, a, -jnp.inf)
  if softmax1:
    cols = jnp.concatenate([cols, jnp.zeros(cols.shape[:-1] + (1,))], axis=-1)
  lse = jax.nn.logsumexp(cols, axis=-1, keepdims=True)
  w = jnp.where(mask, jnp.exp(a - lse), 0.0)
  if signed:
    w = jnp.sign(s) * w
  return jnp.einsum("bhts,bshd->bthd", w, vh, precision=HIGHEST)


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = 1
  q_len: int = 21  # not a multiple of the 8-wide blocks
  kv_len: int | None = None  # None: self-attention
  heads: int = 2
  kv_heads: int = 1  # GQA
  head_dim: int = 16
  causal: bool = False
  relative: str = "bidirectional"  # bidirectional | causal | none
  num_buckets: int = 32
  max_distance: int = 128
  softmax1: bool = False
  signed: bool = False
  key_bias: str = "none"  # none | gate ([B, S] MrT5 soft-deletion values in (-30, 0)) | bhs
  positions: str = "default"  # default | gathered (sorted with gaps, MrT5 hard deletion)
  scale: float | None = None


CASES = {
    "relative_bidirectional": Case(),
    "relative_causal_decoder_mha": Case(batch=2, causal=True, relative="causal", num_buckets=8,
                                        max_distance=20, kv_heads=2),
    "softmax1": Case(causal=True, relative="none", softmax1=True),
    "mrt5_gate_softmax1_scale1_relative_gathered_gqa4": Case(batch=2, heads=4, key_bias="gate",
                                                             softmax1=True, scale=1.0,
                                                             positions="gathered"),
    "mrt5_cross_softmax1_gate_T9_S21": Case(q_len=9, kv_len=21, relative="none", softmax1=True,
                                            key_bias="bhs", scale=1.0),
    "signed_softmax1_relative": Case(signed=True, softmax1=True, key_bias="bhs", positions="gathered"),
}


def _inputs(case: Case, gen):
  s_len = case.kv_len or case.q_len
  q, k, v = testing.random_qkv(gen, case.batch, case.q_len, s_len, case.heads, case.kv_heads,
                               case.head_dim, scale=0.5 if case.scale == 1.0 else 1.0)
  table = None
  if case.relative != "none":
    table = testing.randn(gen, (case.heads, case.num_buckets))
  key_bias = None
  if case.key_bias == "gate":
    key_bias = jnp.asarray(-30.0 * gen.uniform(size=(case.batch, s_len)) ** 3, jnp.float32)
  elif case.key_bias == "bhs":
    key_bias = testing.randn(gen, (case.batch, case.kv_heads, s_len))
  if case.positions == "gathered":
    q_pos = np.sort(np.stack([gen.choice(4 * s_len, s_len, replace=False) for _ in range(case.batch)]),
                    axis=1).astype(np.int32)
    kv_pos = q_pos
  else:
    q_pos = np.broadcast_to(np.arange(case.q_len, dtype=np.int32) + s_len - case.q_len,
                            (case.batch, case.q_len))
    kv_pos = np.broadcast_to(np.arange(s_len, dtype=np.int32), (case.batch, s_len))
  cotangent = testing.randn(gen, q.shape)
  return (q, k, v, table, key_bias), q_pos, kv_pos, cotangent


def _kwargs(case: Case, q_pos, kv_pos):
  explicit = case.positions != "default"
  return dict(causal=case.causal, softmax1=case.softmax1, signed=case.signed, scale=case.scale,
              relative_bidirectional=case.relative != "causal", relative_max_distance=case.max_distance,
              q_positions=q_pos if explicit else None, kv_positions=kv_pos if explicit else None)


def _oracle_kwargs(case: Case, q_pos, kv_pos):
  visible = np.ones((q_pos.shape[0], q_pos.shape[1], kv_pos.shape[1]), bool)
  if case.causal:
    visible = kv_pos[:, None, :] <= q_pos[:, :, None]
  return dict(buckets=_buckets(q_pos, kv_pos, case.relative != "causal", case.num_buckets,
                               case.max_distance),
              visible=visible, softmax1=case.softmax1, signed=case.signed,
              scale=case.head_dim ** -0.5 if case.scale is None else case.scale)


def _grads(fn, args, cotangent):
  """fn(*args) and its VJP for every non-None arg (None args stay None)."""
  present = [i for i, x in enumerate(args) if x is not None]

  def of_present(*xs):
    full = list(args)
    for i, x in zip(present, xs):
      full[i] = x
    return fn(*full)
  o, grads = testing.vjp_outputs(of_present, [args[i] for i in present], cotangent)
  full = [None] * len(args)
  for i, grad in zip(present, grads):
    full[i] = grad
  return o, full


LABELS = ("dq", "dk", "dv", "dtable", "dkey_bias")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_oracle(name, impl):
  case = CASES[name]
  args, q_pos, kv_pos, cotangent = _inputs(case, testing.rng(name))
  oracle = functools.partial(_oracle, **_oracle_kwargs(case, q_pos, kv_pos))

  @jax.jit
  def run(*args):
    def fn(q, k, v, table, key_bias):
      return attention(q, k, v, relative_bias=table, key_bias=key_bias, impl=impl,
                       block_sizes=TPU_BLOCKS if impl == "pallas_tpu" else BLOCKS,
                       **_kwargs(case, q_pos, kv_pos))
    return _grads(fn, args, cotangent)
  ref_o, ref_grads = jax.jit(lambda *a: _grads(oracle, a, cotangent))(*args)
  o, grads = run(*args)
  assert o.shape == ref_o.shape and o.dtype == ref_o.dtype
  testing.assert_close(f"{name}/o", ref_o, o, testing.F32_RATIO)
  for label, r, x in zip(LABELS, ref_grads, grads):
    if r is None:
      continue
    assert x.shape == r.shape and x.dtype == r.dtype, label
    testing.assert_close(f"{name}/{label}", r, x, testing.F32_RATIO)
  if args[3] is not None:  # the table gradient is not trivially zero, nor the same in every bucket
    assert np.abs(np.asarray(grads[3])).max() > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_softmax1_rows_without_keys_are_zero_with_finite_grads(impl):
  # Batch 0: query 3 is in a segment no key has; batch 1: every key has a -inf bias. With the relative
  # bias and softmax1 those rows still return exact zeros and zero, finite gradients.
  b, t, h, d = 2, 12, 2, 16
  gen = testing.rng(f"softmax1_dead{impl}")
  q, k, v = testing.random_qkv(gen, b, t, t, h, h, d)
  table = testing.randn(gen, (h, 8))
  key_bias = jnp.asarray(np.where(np.arange(b)[:, None] == 1, -np.inf, 0.0) * np.ones((b, t)), jnp.float32)
  seg = np.ones((b, t), np.int32)
  seg[0, 3] = 5
  dead = np.zeros((b, t), bool)
  dead[0, 3] = dead[1] = True
  cotangent = testing.randn(gen, q.shape)

  def fn(q, k, v, table, key_bias):
    return attention(q, k, v, relative_bias=table, key_bias=key_bias, segment_ids=seg,
                     kv_segment_ids=np.ones((b, t), np.int32), softmax1=True, causal=False, impl=impl,
                     block_sizes=TPU_BLOCKS if impl == "pallas_tpu" else BLOCKS)
  o, grads = jax.jit(lambda *a: testing.vjp_outputs(fn, a, cotangent))(q, k, v, table, key_bias)
  o = np.asarray(o)
  np.testing.assert_array_equal(o[dead], 0.0)
  assert np.abs(o[~dead]).min() > 0
  for label, grad in zip(LABELS, grads):
    assert np.isfinite(np.asarray(grad)).all(), label
  np.testing.assert_array_equal(np.asarray(grads[0])[dead], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[4])[1], 0.0)


@pytest.mark.parametrize("impl", ("reference", "xla", "pallas_gpu"))
def test_t5_scale_one_matches_oracle(impl):
  # T5 does not divide the logits by sqrt(D): scale=1.0 is the oracle with scale 1, not D ** -0.5.
  case = Case(relative="none", head_dim=32)
  (q, k, v, _, _), q_pos, kv_pos, _ = _inputs(case, testing.rng("t5_scale"))
  q = 0.3 * q
  kwargs = _oracle_kwargs(case, q_pos, kv_pos)
  kwargs["scale"] = 1.0
  expected = _oracle(q, k, v, None, None, **kwargs)
  got = attention(q, k, v, scale=1.0, causal=False, impl=impl, block_sizes=BLOCKS)
  testing.assert_close("scale=1", expected, got, testing.F32_RATIO)
  default = attention(q, k, v, causal=False, impl=impl, block_sizes=BLOCKS)
  assert testing.error_ratio(expected, default) > 0.05  # the default 1/sqrt(D) is a different op


@pytest.mark.parametrize("impl", ("reference", "xla", "pallas_gpu"))
def test_decode_with_cache_slot_positions_equals_row_of_full(impl):
  # T5 decoder self-attention: causal buckets follow the cache slot positions, so one query at position
  # t over a cache whose unfilled slots hold garbage equals row t of the full causal pass.
  b, t_len, h, d = 1, 19, 2, 16
  gen = testing.rng(f"t5_decode{impl}")
  q, k, v = testing.random_qkv(gen, b, t_len, t_len, h, h, d)
  table = testing.randn(gen, (h, 32), scale=2.0)
  run = functools.partial(attention, relative_bias=table, relative_bidirectional=False, softmax1=True,
                          causal=True, impl=impl, block_sizes=BLOCKS)
  full = run(q, k, v)
  slots = np.arange(t_len, dtype=np.int32)
  garbage = 1e3 * gen.standard_normal(k.shape).astype(np.float32)
  for t in (0, 11, t_len - 1):
    unfilled = (slots > t)[None, :, None, None]
    cache_k, cache_v = (jnp.asarray(np.where(unfilled, garbage, x)) for x in (k, v))
    o = run(q[:, t:t + 1], cache_k, cache_v, q_positions=np.full((b, 1), t, np.int32),
            kv_positions=slots[None])
    testing.assert_close(f"t={t}", full[:, t:t + 1], o, testing.F32_RATIO)


def test_hard_deletion_equals_gathering_the_materialised_bias():
  # MrT5 hard deletion gathers the full-length bias on both axes; passing the kept tokens' original
  # positions must give the same attention as the full sequence with the deleted keys masked out.
  b, t, h, d = 1, 24, 2, 16
  gen = testing.rng("hard_deletion")
  q, k, v = testing.random_qkv(gen, b, t, t, h, h, d)
  table = testing.randn(gen, (h, 32), scale=2.0)
  keep = gen.uniform(size=t) < 0.6
  kept = np.flatnonzero(keep).astype(np.int32)
  run = functools.partial(attention, relative_bias=table, softmax1=True, causal=False, scale=1.0,
                          impl="xla", block_sizes=BLOCKS)
  masked = run(q, k, v, key_bias=jnp.asarray(np.where(keep, 0.0, -np.inf)[None], jnp.float32))
  gathered = run(q[:, kept], k[:, kept], v[:, kept], q_positions=kept[None], kv_positions=kept[None])
  testing.assert_close("gathered", masked[:, kept], gathered, testing.F32_RATIO)


def test_xla_never_materialises_a_t_by_s_bias():
  b, t, h, d = 1, 256, 2, 16
  gen = testing.rng("t5_memory")
  q, k, v = testing.random_qkv(gen, b, t, t, h, h, d)
  table = testing.randn(gen, (h, 32))
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, table)]

  def loss(impl, q, k, v, table):
    o = attention(q, k, v, relative_bias=table, softmax1=True, causal=False, scale=1.0, impl=impl,
                  block_sizes=BlockSizes(32, 64))
    return jnp.sum(o ** 2)
  full = b * h * t * t  # a tile is b * h * 32 * 64, 32x smaller
  xla_loss = functools.partial(loss, "xla")
  assert testing.largest_intermediate(jax.make_jaxpr(xla_loss)(*shapes).jaxpr) < full // 8
  grad = jax.grad(xla_loss, argnums=(0, 1, 2, 3))
  assert testing.largest_intermediate(jax.make_jaxpr(grad)(*shapes).jaxpr) < full // 8
  ref_loss = functools.partial(loss, "reference")  # the walker does see a materialised bias
  assert testing.largest_intermediate(jax.make_jaxpr(ref_loss)(*shapes).jaxpr) >= full


@pytest.mark.parametrize("kwargs,match", [
    (dict(relative_bias=np.zeros((2, 32), np.float32)), r"shape \(4, num_buckets\)"),
    (dict(relative_bias=np.zeros((4, 32), np.int32)), "float table"),
    (dict(relative_bias=np.zeros((4,), np.float32)), "float table"),
    (dict(relative_bias=np.zeros((4, 31), np.float32)), "even and >= 4"),
    (dict(relative_bias=np.zeros((4, 2), np.float32)), "even and >= 4"),
    (dict(relative_bias=np.zeros((4, 1), np.float32), relative_bidirectional=False), ">= 2"),
    (dict(relative_bias=np.zeros((4, 32), np.float32), relative_max_distance=8), "relative_max_distance"),
    (dict(relative_bias=np.zeros((4, 32), np.float32), relative_max_distance=128.0),
     "relative_max_distance"),
])
def test_validation_errors(kwargs, match):
  q = np.zeros((2, 8, 4, 16), np.float32)
  k = np.zeros((2, 8, 2, 16), np.float32)
  with pytest.raises(ValueError, match=match):
    attention(q, k, k, **kwargs)
  # The same tables pass with parameters that fit them.
  attention(q, k, k, relative_bias=np.zeros((4, 9), np.float32), relative_bidirectional=False,
            relative_max_distance=5)
