"""Tests for ops.landmark: the reference against a float64 numpy form of spec §2.2, and xla against it.

XLA compiles dominate the runtime on CPU, so inputs come from numpy, forward+backward are jitted together
and shapes are tiny (T in {23, 71}, H = 4, D in {8, 12}, landmark block_size in {4, 5}).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import testing
from ops.attention import attention
from ops.landmark import EMPTY_SLOT
from ops.landmark import BlockSizes
from ops.landmark import landmark_attention
from ops.landmark import reference

IMPLS = ("reference", "xla")


@functools.partial(jax.jit, static_argnames=("impl", "block_size", "block_sizes"))
def _grads(impl, q, k, v, cotangent, segment_ids=None, kv_segment_ids=None, q_positions=None,
           kv_positions=None, *, block_size, block_sizes=None):
  """o, dq, dk, dv of `landmark_attention` for one cotangent."""
  def fn(q, k, v):
    return landmark_attention(q, k, v, block_size=block_size, segment_ids=segment_ids,
                              kv_segment_ids=kv_segment_ids, q_positions=q_positions,
                              kv_positions=kv_positions, impl=impl, block_sizes=block_sizes)
  o, grads = testing.vjp_outputs(fn, (q, k, v), cotangent)
  return (o,) + tuple(grads)


def _numpy_weights(q, k, q_pos, kv_pos, seg, kv_seg, block_size, scale):
  """w [B, H, T, S] in float64 straight from spec §2.2 eqs. 2-4 (GroupedSoftmax, then eq. 4).

  Groups for query i over its visible keys: a regular key -> its own block; the landmark of the query's
  block -> ignored; any other (earlier) landmark -> the query's block group. S = sigma_G(scores); w = S
  on the query's block regular keys, S_ij * S_{i, landmark of j's block} on earlier regular keys
  (0 if that landmark is not visible), 0 on landmarks.
  """
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b_size, t, h, _ = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  w = np.zeros((b_size, h, t, s_len))
  for b in range(b_size):
    for head in range(h):
      kv_head = head // (h // hkv)
      for i in range(t):
        qp = int(q_pos[b, i])
        q_block = qp // block_size
        groups = {}  # key slot -> group id
        for j in range(s_len):
          kp = int(kv_pos[b, j])
          if kp == EMPTY_SLOT or kp > qp:
            continue
          if seg is not None and seg[b, i] != kv_seg[b, j]:
            continue
          landmark = kp % block_size == block_size - 1
          if landmark and kp // block_size == q_block:
            continue  # the current block's own landmark is masked (also for the landmark query)
          groups[j] = q_block if landmark else kp // block_size
        scores = {j: scale * float(q[b, i, head] @ k[b, j, kv_head]) for j in groups}
        sigma = {}
        for j, grp in groups.items():
          members = [jj for jj, gg in groups.items() if gg == grp]
          top = max(scores[jj] for jj in members)
          sigma[j] = np.exp(scores[j] - top) / sum(np.exp(scores[jj] - top) for jj in members)
        landmark_slot = {int(kv_pos[b, j]) // block_size: j for j in groups
                         if int(kv_pos[b, j]) % block_size == block_size - 1}
        for j in groups:
          kp = int(kv_pos[b, j])
          if kp % block_size == block_size - 1:
            continue  # landmarks carry no value
          if kp // block_size == q_block:
            w[b, head, i, j] = sigma[j]
          elif kp // block_size in landmark_slot:
            w[b, head, i, j] = sigma[j] * sigma[landmark_slot[kp // block_size]]
  return w


def _canonical(x, shape):
  return None if x is None else np.broadcast_to(np.asarray(x, np.int32), shape)


def _decode_positions(batch, q_len, slots, filled):
  """kv positions arange(slots) with slots >= filled[b] empty; the q_len queries end at filled[b] - 1."""
  kv_pos = np.broadcast_to(np.arange(slots, dtype=np.int32), (batch, slots)).copy()
  q_pos = np.zeros((batch, q_len), np.int32)
  for b, n in enumerate(filled):
    kv_pos[b, n:] = EMPTY_SLOT
    q_pos[b] = np.arange(n - q_len, n)
  return q_pos, kv_pos


@pytest.mark.parametrize("setting", ["self_gqa_bs4", "segments_bs5_d12", "decode_empty_slots"])
def test_reference_matches_numpy_spec(setting):
  gen = testing.rng(setting)
  b, t, h = 2, 23, 4
  seg = q_pos = kv_pos = None
  if setting == "self_gqa_bs4":
    block_size, hkv, d, s = 4, 2, 8, t
  elif setting == "segments_bs5_d12":
    block_size, hkv, d, s = 5, 4, 12, t
    seg = testing.random_segment_ids(gen, b, t, 3)
    seg[0] = np.repeat([1, 2], [9, t - 9])  # segment 2 starts at a landmark (position 9)
  else:
    block_size, hkv, d, s = 4, 2, 8, 29
    t = 6
    q_pos, kv_pos = _decode_positions(b, t, s, filled=(21, 16))
  q, k, v = testing.random_qkv(gen, b, t, s, h, hkv, d)
  scale = d ** -0.5
  q_pos_c = _canonical(q_pos if q_pos is not None else np.arange(t) + s - t, (b, t))
  kv_pos_c = _canonical(kv_pos if kv_pos is not None else np.arange(s), (b, s))
  assert (q_pos_c % block_size == block_size - 1).any()  # landmark query rows are covered
  expected = _numpy_weights(q, k, q_pos_c, kv_pos_c, seg, seg, block_size, scale)
  w = reference.weights(q, k, q_positions=jnp.asarray(q_pos_c), kv_positions=jnp.asarray(kv_pos_c),
                        segment_ids=None if seg is None else jnp.asarray(seg),
                        kv_segment_ids=None if seg is None else jnp.asarray(seg),
                        block_size=block_size, scale=scale)
  np.testing.assert_allclose(np.asarray(w), expected, atol=1e-6, rtol=1e-5)
  vf = np.asarray(v, np.float64)
  expected_o = np.einsum("bhts,bshd->bthd", expected, np.repeat(vf, h // hkv, axis=2))
  o = landmark_attention(q, k, v, block_size=block_size, segment_ids=seg, q_positions=q_pos,
                         kv_positions=kv_pos, impl="reference")  # xla == reference: tested below
  np.testing.assert_allclose(np.asarray(o), expected_o, atol=1e-5, rtol=1e-4)


def test_rows_sum_to_one_and_landmarks_carry_no_value():
  block_size = 5
  gen = testing.rng("rowsum")
  b, t, h, hkv, d = 2, 23, 4, 2, 8
  q, k, v = testing.random_qkv(gen, b, t, t, h, hkv, d, scale=2.0)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  w = np.asarray(reference.weights(q, k, q_positions=pos, kv_positions=pos, segment_ids=None,
                                   kv_segment_ids=None, block_size=block_size, scale=d ** -0.5))
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  landmark_cols = np.arange(t) % block_size == block_size - 1
  assert (w[..., landmark_cols] == 0.0).all()
  assert (w[..., ~landmark_cols].max(axis=-2) > 0).all()  # every regular key is used by some row
  v_changed = v.at[:, landmark_cols].set(testing.randn(gen, v[:, landmark_cols].shape, scale=10.0))
  for impl in IMPLS:
    blocks = BlockSizes(8, 2 * block_size)
    o = landmark_attention(q, k, v, block_size=block_size, impl=impl, block_sizes=blocks)
    o_changed = landmark_attention(q, k, v_changed, block_size=block_size, impl=impl,
                                   block_sizes=blocks)
    np.testing.assert_allclose(np.asarray(o_changed), np.asarray(o), atol=1e-6, err_msg=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_first_block_is_plain_causal_softmax(impl):
  block_size, t = 8, 23
  q, k, v = testing.random_qkv(testing.rng(f"first{impl}"), 2, t, t, 4, 2, 8)
  o = landmark_attention(q, k, v, block_size=block_size, impl=impl, block_sizes=BlockSizes(8, 16))
  plain = attention(q, k, v, impl="reference")
  # Rows of the first block's regular tokens see no landmark: exactly causal softmax.
  testing.assert_close("first block", plain[:, :block_size - 1], o[:, :block_size - 1], 1e-6)
  assert testing.error_ratio(plain[:, block_size:], o[:, block_size:]) > 1e-2  # later rows differ


@dataclasses.dataclass(frozen=True)
class Case:
  q_len: int = 23
  kv_len: int | None = None  # None: self-attention
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 8
  block_size: int = 4
  segments: bool = False
  decode_fill: tuple[int, ...] | None = None  # per-batch filled slots; the rest are EMPTY_SLOT
  blocks: BlockSizes | None = BlockSizes(8, 8)


CASES = {
    "gqa_T23_bs4": Case(),
    "mha_T71_bs5_D12": Case(q_len=71, kv_heads=4, head_dim=12, block_size=5,
                            blocks=BlockSizes(16, 10)),
    "segments_bs5_gqa": Case(block_size=5, segments=True, blocks=BlockSizes(8, 15)),
    "decode_empty_slots_bs4": Case(q_len=5, kv_len=29, decode_fill=(21, 14), blocks=BlockSizes(4, 8)),
    "q_offset_T7_S23_default_blocks": Case(q_len=7, kv_len=23, kv_heads=1, block_size=5, blocks=None),
}


def _make_inputs(case: Case, gen, dtype=jnp.float32):
  b = 2
  kv_len = case.kv_len or case.q_len
  q, k, v = testing.random_qkv(gen, b, case.q_len, kv_len, case.heads, case.kv_heads, case.head_dim,
                               dtype)
  seg = testing.random_segment_ids(gen, b, case.q_len, 3) if case.segments else None
  q_pos = kv_pos = None
  if case.decode_fill is not None:
    q_pos, kv_pos = _decode_positions(b, case.q_len, kv_len, case.decode_fill)
  cotangent = testing.randn(gen, q.shape)
  return (q, k, v, cotangent, seg, None, q_pos, kv_pos)


@pytest.mark.parametrize("name", list(CASES))
def test_xla_matches_reference_f32(name):
  case = CASES[name]
  args = _make_inputs(case, testing.rng(name))
  kwargs = dict(block_size=case.block_size, block_sizes=case.blocks)
  ref = _grads("reference", *args, **kwargs)
  out = _grads("xla", *args, **kwargs)
  for label, r, x in zip(("o", "dq", "dk", "dv"), ref, out):
    assert x.shape == r.shape and x.dtype == r.dtype, label
    assert np.isfinite(np.asarray(x)).all(), label
    testing.assert_close(f"{name}/{label}", r, x, testing.F32_RATIO)


@pytest.mark.slow
def test_xla_matches_reference_paper_block_size():
  # lm_benchmark's block (50 regular + 1 landmark), several blocks per key tile, segments.
  case = Case(q_len=300, heads=2, kv_heads=1, head_dim=16, block_size=51, segments=True,
              blocks=BlockSizes(64, 102))
  args = _make_inputs(case, testing.rng("paper"))
  ref = _grads("reference", *args, block_size=51, block_sizes=case.blocks)
  out = _grads("xla", *args, block_size=51, block_sizes=case.blocks)
  for label, r, x in zip(("o", "dq", "dk", "dv"), ref, out):
    testing.assert_close(label, r, x, testing.F32_RATIO)


def test_xla_bf16_matches_f32_reference():
  case = Case(q_len=40, head_dim=16, segments=True, blocks=BlockSizes(16, 8))
  q, k, v, cotangent, seg, _, _, _ = _make_inputs(case, testing.rng("bf16"), jnp.bfloat16)
  f32 = lambda x: x.astype(jnp.float32)
  ref = _grads("reference", f32(q), f32(k), f32(v), cotangent, seg, block_size=case.block_size)
  out = _grads("xla", q, k, v, cotangent, seg, block_size=case.block_size, block_sizes=case.blocks)
  assert all(x.dtype == jnp.bfloat16 for x in out)
  testing.assert_close("o", ref[0], out[0], testing.BF16_FWD_RATIO)
  for label, r, x in zip(("dq", "dk", "dv"), ref[1:], out[1:]):
    testing.assert_close(label, r, x, testing.BF16_GRAD_RATIO)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_are_zero_with_finite_grads(impl):
  b, t, h, hkv, d, block_size = 2, 23, 4, 2, 8, 4
  gen = testing.rng(f"masked{impl}")
  q, k, v = testing.random_qkv(gen, b, t, t, h, hkv, d)
  cotangent = testing.randn(gen, q.shape)
  # Batch 0: a segment starting at the landmark position 7 -- that landmark query sees nothing (its
  # block's regular keys are in another segment, its own landmark is masked). Batch 1: queries 0..2
  # are in a segment no key has.
  seg = np.ones((b, t), np.int32)
  seg[0, 7:] = 2
  kv_seg = seg.copy()
  seg[1, :3] = 9
  dead = np.zeros((b, t), bool)
  dead[0, 7] = True
  dead[1, :3] = True
  o, dq, dk, dv = _grads(impl, q, k, v, cotangent, seg, kv_seg, block_size=block_size,
                         block_sizes=BlockSizes(8, 8))
  o = np.asarray(o)
  np.testing.assert_array_equal(o[dead], 0.0)
  assert np.abs(o[~dead]).min() > 0
  for label, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
    assert np.isfinite(np.asarray(grad)).all(), label
  np.testing.assert_array_equal(np.asarray(dq)[dead], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_causality_via_gradients(impl):
  row, t, block_size = 13, 23, 4
  gen = testing.rng(f"causal{impl}")
  q, k, v = testing.random_qkv(gen, 1, t, t, 2, 2, 8)
  def out_row(k, v):
    o = landmark_attention(q, k, v, block_size=block_size, impl=impl, block_sizes=BlockSizes(8, 8))
    return jnp.sum(o[:, row])
  dk, dv = jax.grad(out_row, argnums=(0, 1))(k, v)
  assert not np.asarray(dk)[:, row + 1:].any() and not np.asarray(dv)[:, row + 1:].any()
  landmarks = np.arange(t) % block_size == block_size - 1
  assert not np.asarray(dv)[:, landmarks].any()  # landmarks carry no value
  assert np.asarray(dk)[:, landmarks & (np.arange(t) < 12)].any()  # but earlier ones steer weights


def test_xla_never_materialises_full_weights():
  b, t, h, d, block_size = 1, 240, 2, 16, 5
  shapes = [jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)] * 3

  def loss(impl, q, k, v):
    o = landmark_attention(q, k, v, block_size=block_size, impl=impl, block_sizes=BlockSizes(32, 60))
    return jnp.sum(o ** 2)
  full = b * h * t * t  # one tile is b * h * 32 * 60, 30x smaller
  xla_loss = functools.partial(loss, "xla")
  assert testing.largest_intermediate(jax.make_jaxpr(xla_loss)(*shapes).jaxpr) < full // 8
  grad = jax.grad(xla_loss, argnums=(0, 1, 2))
  assert testing.largest_intermediate(jax.make_jaxpr(grad)(*shapes).jaxpr) < full // 8
  ref_loss = functools.partial(loss, "reference")  # sanity check of the walker
  assert testing.largest_intermediate(jax.make_jaxpr(ref_loss)(*shapes).jaxpr) >= full


def test_scale_and_dispatch():
  q, k, v = testing.random_qkv(testing.rng("dispatch"), 2, 23, 23, 4, 2, 8)
  default = np.asarray(landmark_attention(q, k, v, block_size=4))
  np.testing.assert_array_equal(default, landmark_attention(q, k, v, block_size=4, impl="xla"))
  np.testing.assert_array_equal(default, landmark_attention(q, k, v, block_size=4, impl=""))
  scaled = landmark_attention(q, k, v, block_size=4, scale=0.3, impl="reference")
  rescaled = landmark_attention(q * (0.3 / 8 ** -0.5), k, v, block_size=4, impl="reference")
  testing.assert_close("scale", rescaled, scaled, testing.F32_RATIO)
  kv_pos = np.where(np.arange(23) < 20, np.arange(23), EMPTY_SLOT).astype(np.int32)  # concrete: checked
  testing.assert_close("empty slots", landmark_attention(q, k, v, block_size=4, kv_positions=kv_pos,
                                                         impl="reference"),
                       landmark_attention(q, k, v, block_size=4, kv_positions=kv_pos, impl="xla"),
                       testing.F32_RATIO)
  empty = landmark_attention(q, k[:, :0], v[:, :0], block_size=4)
  assert empty.shape == q.shape and not np.asarray(empty).any()
  with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU"):  # CPU without interpret
    landmark_attention(q, k, v, block_size=4, impl="pallas")
  with pytest.raises(ValueError, match="'reference', 'xla', 'pallas'"):
    landmark_attention(q, k, v, block_size=4, impl="cuda")


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=1), "block_size must be an int >= 2"),
    (dict(block_size=4.0), "block_size must be an int >= 2"),
    (dict(q=(2, 8, 4)), "q must have rank 4"),
    (dict(q=np.zeros((2, 8, 4, 16), np.int32)), "q must be a floating-point array"),
    (dict(k=(2, 8, 3, 16), v=(2, 8, 3, 16)), "multiple of the number of kv heads"),
    (dict(k=(2, 8, 2, 8), v=(2, 8, 2, 8)), "same head_dim"),
    (dict(v=(2, 9, 2, 16)), "k and v must have the same shape"),
    (dict(k=(1, 8, 2, 16), v=(1, 8, 2, 16)), "same batch size"),
    (dict(segment_ids=np.zeros((2, 7), np.int32)), "segment_ids must be an integer array"),
    (dict(k=(2, 9, 2, 16), v=(2, 9, 2, 16), segment_ids=np.zeros((2, 8), np.int32)),
     "needs as many keys as queries"),
    (dict(kv_segment_ids=np.zeros((2, 8), np.int32)), "requires segment_ids"),
    (dict(q_positions=np.zeros((2, 3), np.int32)), "q_positions must be an integer array"),
    (dict(kv_positions=np.zeros((2, 8), np.float32)), "kv_positions must be an integer array"),
    (dict(block_sizes=(8, 8)), "block_sizes must be a BlockSizes"),
    (dict(block_sizes=BlockSizes(8, 6)), "must be a multiple of block_size"),
    (dict(kv_positions=np.arange(8)[::-1].astype(np.int32), impl="xla"),
     "needs key slot j to hold position j"),
])
def test_validation_errors(kwargs, match):
  shapes = dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 8, 2, 16))
  arrays = {}
  for name in shapes:
    value = kwargs.pop(name, shapes[name])
    arrays[name] = value if isinstance(value, np.ndarray) else np.zeros(value, np.float32)
  kwargs.setdefault("block_size", 4)
  with pytest.raises(ValueError, match=match):
    landmark_attention(arrays["q"], arrays["k"], arrays["v"], **kwargs)


def test_block_sizes():
  for bad in (0, -1, 2.0, True, None):
    with pytest.raises(ValueError, match="positive int"):
      BlockSizes(block_q=bad)
  with pytest.raises(dataclasses.FrozenInstanceError):
    BlockSizes().block_q = 8  # type: ignore[misc]
  for block_size in (2, 5, 51, 64, 300):
    blocks = BlockSizes.get_default(4096, 4096, 64, block_size)
    assert blocks.block_kv % block_size == 0 and blocks.block_kv >= block_size
  assert BlockSizes.get_default(5, 23, 64, 5) == BlockSizes(8, 25)  # short: one tile each
  assert hash(BlockSizes(8, 8)) == hash(BlockSizes(8, 8))  # usable as a static argument
