"""Tests for ops.landmark.retrieval, landmark attention's inference form (spec §2.4).

Oracle: `ops.landmark.landmark_attention(impl="reference")`, the §2.2 closed form over explicit key
positions. Retrieving every memory block must reproduce it on the whole cache; retrieving fewer must
reproduce it on the cache with the unchosen memory blocks removed (empty slots), one (token, head) per
oracle row. Which blocks are chosen is checked against a float64 numpy argsort of the landmark scores,
per granularity. RoPE uses `models.layers.rope`, the layout the module's private copy must match.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers
from ops import testing
from ops.landmark import EMPTY_SLOT
from ops.landmark import landmark_attention
from ops.landmark.retrieval import GRANULARITIES
from ops.landmark.retrieval import retrieval_attention
from ops.landmark.retrieval import select_blocks
from ops.landmark.retrieval import stingy_block_starts
from ops.landmark.retrieval import stingy_landmark_positions

B, H, D = 2, 4, 8
THETA = 10_000.0
rope = jax.jit(layers.rope, static_argnums=2)  # one compile per shape rather than per eager op


def _inputs(name, *, t, hkv, s, dtype=jnp.float32):
  gen = testing.rng(name)
  return testing.random_qkv(gen, B, t, s, H, hkv, D, dtype)


def _positions(first, t):
  """[B, T] int32 contiguous positions, row b starting at first[b]."""
  return (np.asarray(first)[:, None] + np.arange(t)[None]).astype(np.int32)


def _first(p0):
  """Row starts p0 and p0 + 3: the two batch rows sit at different offsets within their blocks."""
  return np.array([p0, p0 + 3])


def _memory_counts(qp, block_size, local_blocks):
  return np.maximum(qp // block_size - local_blocks, 0)


def _full_form(q, k, v, qp, block_size, scale=None):
  """The §2.2 closed form over all filled slots (slot s holds position s)."""
  s = k.shape[1]
  slots = np.arange(s)[None]
  kvp = np.where(slots <= qp.max(axis=1, keepdims=True), slots, EMPTY_SLOT).astype(np.int32)
  return landmark_attention(q, k, v, block_size=block_size, scale=scale, q_positions=qp,
                            kv_positions=kvp, impl="reference")


def _restricted_form(q, k, v, qp, allowed, *, block_size, local_blocks, key_positions=None):
  """The closed form per (token, head) over its local window plus its `allowed` memory blocks.

  allowed: bool [B, T, H, S // block_size] (True = retrieved). Each (b, t, h) is one oracle row with one
  query and one kv head; unselected memory slots get EMPTY_SLOT. key_positions: None, or int
  [B, T, H, S] RoPE positions of each row's keys (the query is rotated at its true position); the
  grouping always uses the true slot positions.
  """
  b, t, h, d = q.shape
  s, hkv = k.shape[1:3]
  group = h // hkv
  m = _memory_counts(qp, block_size, local_blocks)  # [B, T]
  slots = np.arange(s)
  blk = slots // block_size
  allowed_slot = np.zeros((b, t, h, s), bool)
  nb = allowed.shape[-1]
  allowed_slot[..., :nb * block_size] = np.repeat(allowed, block_size, axis=-1)
  keep = ((blk[None, None, None] >= m[:, :, None, None]) | allowed_slot) & (
      slots[None, None, None] <= qp[:, :, None, None])
  kvp = np.where(keep, slots, EMPTY_SLOT).reshape(-1, s).astype(np.int32)
  heads = np.arange(h) // group
  k_rows = np.asarray(k)[:, :, heads].transpose(0, 2, 1, 3)  # [B, H, S, D]
  v_rows = np.asarray(v)[:, :, heads].transpose(0, 2, 1, 3)
  k_rows = np.broadcast_to(k_rows[:, None], (b, t, h, s, d)).reshape(-1, s, 1, d)
  v_rows = np.broadcast_to(v_rows[:, None], (b, t, h, s, d)).reshape(-1, s, 1, d)
  q_rows = np.asarray(q).reshape(-1, 1, 1, d)
  if key_positions is not None:
    q_rows = np.asarray(rope(q, qp, THETA)).reshape(-1, 1, 1, d)
    k_rows = rope(jnp.asarray(k_rows).reshape(-1, s, 1, d), jnp.asarray(key_positions.reshape(-1, s)),
                  THETA)
  qp_rows = np.broadcast_to(qp[:, :, None], (b, t, h)).reshape(-1, 1).astype(np.int32)
  o = landmark_attention(jnp.asarray(q_rows), jnp.asarray(k_rows), jnp.asarray(v_rows),
                         block_size=block_size, q_positions=qp_rows, kv_positions=kvp,
                         impl="reference")
  return o.reshape(b, t, h, d)


def _expected_selection(q, k, qp, *, block_size, top_k, local_blocks, granularity):
  """float64 numpy selection (no RoPE): bool [B, T, H, S // block_size] of retrieved blocks."""
  q64, k64 = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, h, d = q64.shape
  nb = k64.shape[1] // block_size
  heads = np.arange(h) // (h // k64.shape[2])
  landmarks = k64[:, block_size - 1:nb * block_size:block_size][:, :, heads]
  logits = np.einsum("bthd,bnhd->bthn", q64, landmarks) * d ** -0.5
  m = _memory_counts(qp, block_size, local_blocks)
  is_mem = (np.arange(nb)[None, None] < m[:, :, None])[:, :, None]  # [B, T, 1, N]
  probs = np.where(is_mem, np.exp(logits - np.where(is_mem, logits, -np.inf).max(-1, keepdims=True,
                                                                               initial=-1e300)), 0.0)
  probs = probs / np.maximum(probs.sum(-1, keepdims=True), 1e-300)
  if granularity == "per_token_and_head":
    key = np.where(is_mem, logits, -np.inf)
  elif granularity == "max_over_heads":
    key = np.broadcast_to(np.where(is_mem, probs.max(2, keepdims=True), -1.0), logits.shape)
  else:
    union = is_mem.any(1, keepdims=True)
    key = np.broadcast_to(np.where(union, probs.max(1, keepdims=True), -1.0), logits.shape)
  chosen = np.zeros(logits.shape, bool)
  order = np.argsort(-key, axis=-1, kind="stable")[..., :top_k]
  np.put_along_axis(chosen, order, True, axis=-1)
  return chosen & is_mem


def _as_mask(blocks, valid, num_blocks):
  """select_blocks' (blocks, valid) -> bool [B, T, H, num_blocks]."""
  blocks, valid = np.asarray(blocks), np.asarray(valid)
  mask = np.zeros(blocks.shape[:3] + (num_blocks,), bool)
  idx = np.nonzero(valid)
  mask[idx[0], idx[1], idx[2], blocks[idx]] = True
  return mask


# (T, local_blocks, Hkv, block_size, granularity, S): T=1 and chunks, every local_blocks in {0, 1, 2};
# S=50 with block 4 exercises the pad of a cache that is not a whole number of blocks.
FULL_CASES = [
    (1, 0, 4, 4, "per_token_and_head", 48),
    (1, 1, 2, 5, "max_over_heads", 45),
    (1, 2, 2, 4, "max_over_tokens", 50),
    (5, 0, 2, 4, "per_token_and_head", 48),
    (6, 1, 4, 5, "max_over_tokens", 50),
    (4, 2, 2, 4, "max_over_heads", 44),
]


@pytest.mark.parametrize("t,local_blocks,hkv,block_size,granularity,s", FULL_CASES)
def test_all_blocks_retrieved_equals_full_form(t, local_blocks, hkv, block_size, granularity, s):
  q, k, v = _inputs(f"full{t}{local_blocks}{hkv}{block_size}{granularity}", t=t, hkv=hkv, s=s)
  qp = _positions(_first(s - t - 4), t)  # row 0 ends before the last slots: unfilled slots follow
  o = retrieval_attention(q, k, v, q_positions=qp, block_size=block_size, top_k=s, rope_theta=None,
                          local_blocks=local_blocks, granularity=granularity)
  testing.assert_close("o", _full_form(q, k, v, qp, block_size), o, testing.F32_RATIO)


@pytest.mark.parametrize("t,local_blocks", [pytest.param(1, 1, marks=pytest.mark.slow), (5, 0)])
def test_rope_true_positions_equals_rotated_full_form(t, local_blocks):
  s, block_size = 44, 4
  q, k, v = _inputs(f"rope{t}", t=t, hkv=2, s=s)
  qp = _positions(_first(30), t)
  o = retrieval_attention(q, k, v, q_positions=qp, block_size=block_size, top_k=16,
                          local_blocks=local_blocks, rope_theta=THETA, stingy=False)
  kvp = np.broadcast_to(np.arange(s, dtype=np.int32), (B, s))
  ref = _full_form(rope(q, qp, THETA), rope(k, kvp, THETA), v, qp, block_size)
  testing.assert_close("o", ref, o, testing.F32_RATIO)


def test_stingy_with_every_block_retrieved_keeps_true_positions():
  """m <= top_k: every memory block is one of the latest k, so the stingy map is the identity."""
  s, block_size, t = 40, 5, 3
  q, k, v = _inputs("stingy_identity", t=t, hkv=2, s=s)
  qp = _positions(_first(28), t)  # m = 4 or 5 with local_blocks=1
  kwargs = dict(q_positions=qp, block_size=block_size, top_k=6, local_blocks=1, rope_theta=THETA)
  testing.assert_close("o", retrieval_attention(q, k, v, stingy=False, **kwargs),
                       retrieval_attention(q, k, v, stingy=True, **kwargs), testing.F32_RATIO)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_top_k_selection_and_restricted_form(granularity):
  """A chunk that crosses a block boundary (per-token memories differ), top_k < memory blocks."""
  s, block_size, t, top_k, local_blocks = 56, 4, 6, 3, 1
  q, k, v = _inputs(f"topk{granularity}", t=t, hkv=2, s=s)
  qp = _positions(_first(42), t)
  kwargs = dict(q_positions=qp, block_size=block_size, top_k=top_k, local_blocks=local_blocks,
                granularity=granularity, rope_theta=None)
  blocks, valid = select_blocks(q, k, **kwargs)
  chosen = _as_mask(blocks, valid, s // block_size)
  expected = _expected_selection(q, k, qp, block_size=block_size, top_k=top_k,
                                 local_blocks=local_blocks, granularity=granularity)
  np.testing.assert_array_equal(chosen, expected)
  m = _memory_counts(qp, block_size, local_blocks)
  if granularity != "max_over_tokens":  # exactly min(top_k, m) blocks per (token, head)
    np.testing.assert_array_equal(chosen.sum(-1), np.broadcast_to(np.minimum(top_k, m)[:, :, None],
                                                                  (B, t, H)))
  if granularity == "max_over_heads":  # one set per token, shared by the heads
    assert (chosen == chosen[:, :, :1]).all()
  if granularity == "max_over_tokens":  # one set per head: the last token's, cut to each memory
    is_mem = np.arange(s // block_size)[None, None, None] < m[:, :, None, None]
    np.testing.assert_array_equal(chosen, chosen[:, -1:] & is_mem)
  o = retrieval_attention(q, k, v, **kwargs)
  ref = _restricted_form(q, k, v, qp, chosen, block_size=block_size, local_blocks=local_blocks)
  testing.assert_close("o", ref, o, testing.F32_RATIO)


def test_stingy_attention_equals_restricted_form_at_mapped_positions():
  """Retrieved keys rotated at the stingy layout (old blocks left, latest-k right, a gap between)."""
  s, block_size, t, top_k, local_blocks = 48, 4, 3, 2, 1
  q, k, v = _inputs("stingy_attend", t=t, hkv=2, s=s)
  qp = _positions(_first(38), t)  # m = 8..9 memory blocks: the mapping is not the identity
  kwargs = dict(q_positions=qp, block_size=block_size, top_k=top_k, local_blocks=local_blocks,
                rope_theta=THETA, stingy=True)
  blocks, valid = select_blocks(q, k, **kwargs)
  blocks, valid = np.asarray(blocks), np.asarray(valid)
  m = _memory_counts(qp, block_size, local_blocks)
  key_positions = np.broadcast_to(np.arange(s), (B, t, H, s)).copy()
  for bi, ti, hi in np.ndindex(B, t, H):
    mm = m[bi, ti]
    kk = min(top_k, mm)
    for j in np.nonzero(valid[bi, ti, hi])[0]:
      c = blocks[bi, ti, hi, j]
      start = (mm - kk - 1 + j + int(c >= mm - kk)) * block_size
      key_positions[bi, ti, hi, c * block_size:(c + 1) * block_size] = start + np.arange(block_size)
  assert (key_positions != np.arange(s)).any()  # some block is moved
  chosen = _as_mask(blocks, valid, s // block_size)
  ref = _restricted_form(q, k, v, qp, chosen, block_size=block_size, local_blocks=local_blocks,
                         key_positions=key_positions)
  testing.assert_close("o", ref, retrieval_attention(q, k, v, **kwargs), testing.F32_RATIO)


def test_stingy_selection_scores_landmarks_at_mapped_positions():
  """per_token_and_head with stingy RoPE: top_k of the landmark logits at max(b, m-k-1)*L + L-1."""
  s, block_size, t, top_k, local_blocks = 48, 4, 2, 2, 1
  q, k, _ = _inputs("stingy_select", t=t, hkv=4, s=s)
  qp = _positions(_first(40), t)
  blocks, valid = select_blocks(q, k, q_positions=qp, block_size=block_size, top_k=top_k,
                                local_blocks=local_blocks, rope_theta=THETA, stingy=True)
  nb = s // block_size
  m = _memory_counts(qp, block_size, local_blocks)
  q_rot = np.asarray(rope(q, qp, THETA), np.float64)
  expected = np.zeros((B, t, H, nb), bool)
  for bi in range(B):
    for ti in range(t):
      mm = m[bi, ti]
      kk = min(top_k, mm)
      lm_pos = np.maximum(np.arange(mm), mm - kk - 1) * block_size + block_size - 1
      lm = np.asarray(k)[bi, block_size - 1:mm * block_size:block_size]  # [m, H, D]
      lm_rot = np.asarray(rope(jnp.asarray(lm)[None], jnp.asarray(lm_pos)[None], THETA), np.float64)[0]
      logits = np.einsum("hd,nhd->hn", q_rot[bi, ti], lm_rot)
      for hi in range(H):
        expected[bi, ti, hi, np.argsort(-logits[hi])[:kk]] = True
  np.testing.assert_array_equal(_as_mask(blocks, valid, nb), expected)


def test_stingy_position_mapping_hand_example():
  """L=4, m=6 memory blocks, top_k=2: prefix [12, 24) right before the local window at 24."""
  lm = stingy_landmark_positions(np.array(6), top_k=2, block_size=4, num_blocks=6)
  np.testing.assert_array_equal(lm, [15, 15, 15, 15, 19, 23])  # older at the first slot, latest 2 true
  starts = stingy_block_starts(np.array([[1, 5], [4, 5], [0, 2], [2, 3]]), np.array([6, 6, 6, 6]),
                               top_k=2, block_size=4)
  # {1, 5}: old block left (12), latest right (20, its true slot), empty block [16, 20) between;
  # {4, 5}: the latest two at their true slots; {0, 2}: both old, packed from the left.
  np.testing.assert_array_equal(starts, [[12, 20], [16, 20], [12, 16], [12, 16]])
  # k=1 still reserves 2 blocks: prefix [16, 24) for m=6; fewer memory blocks than top_k: identity.
  np.testing.assert_array_equal(stingy_landmark_positions(np.array(6), top_k=1, block_size=4,
                                                          num_blocks=6), [19] * 5 + [23])
  np.testing.assert_array_equal(stingy_block_starts(np.array([2]), np.array(6), top_k=1, block_size=4),
                                [16])
  np.testing.assert_array_equal(stingy_block_starts(np.array([0, 1]), np.array(2), top_k=3,
                                                    block_size=4), [0, 4])


def test_stingy_is_relative_only(granularity="per_token_and_head"):
  """Shifting the stream by 3 whole blocks (prepended blocks never retrieved) leaves o unchanged."""
  s, block_size, top_k, local_blocks, shift_blocks = 44, 4, 2, 1, 3
  q, k, v = _inputs(f"shift{granularity}", t=1, hkv=H, s=s)
  qp = _positions(_first(37), 1)
  kwargs = dict(block_size=block_size, top_k=top_k, local_blocks=local_blocks,
                granularity=granularity, rope_theta=THETA, stingy=True)
  o = retrieval_attention(q, k, v, q_positions=qp, **kwargs)

  shift = shift_blocks * block_size
  gen = testing.rng(f"junk{granularity}")
  junk_k = np.array(testing.randn(gen, (B, shift, H, D)))
  junk_v = np.asarray(testing.randn(gen, (B, shift, H, D)))
  # Junk landmarks score -100 |q_h| * scale at their stingy position, so they are never retrieved.
  qp_shift = qp + shift
  m = _memory_counts(qp_shift[:, 0], block_size, local_blocks)
  old_pos = (m - top_k - 1) * block_size + block_size - 1
  q_rel = np.asarray(rope(q, qp_shift - old_pos[:, None], THETA))[:, 0]  # [B, H, D]
  junk_k[:, block_size - 1::block_size] = (
      -100.0 * q_rel / np.linalg.norm(q_rel, axis=-1, keepdims=True))[:, None]
  k2 = jnp.concatenate([jnp.asarray(junk_k), k], axis=1)
  v2 = jnp.concatenate([jnp.asarray(junk_v), v], axis=1)
  o_shift = retrieval_attention(q, k2, v2, q_positions=qp_shift, **kwargs)
  assert np.isfinite(np.asarray(o)).all()
  testing.assert_close("o", o, o_shift, testing.F32_RATIO)


def test_start_of_stream_and_fewer_blocks_than_top_k():
  """No memory block (positions 0..3) and m < top_k: finite and equal to the full form."""
  s, block_size, t = 24, 4, 4
  q, k, v = _inputs("start", t=t, hkv=2, s=s)
  for first in (np.array([0, 1]), np.array([11, 14])):  # m = 0, and m in 1..2 < top_k = 4
    qp = _positions(first, t)
    ref = _full_form(q, k, v, qp, block_size)
    for granularity in GRANULARITIES:
      o = retrieval_attention(q, k, v, q_positions=qp, block_size=block_size, top_k=4, local_blocks=1,
                              granularity=granularity, rope_theta=None)
      testing.assert_close(f"o {granularity}", ref, o, testing.F32_RATIO)
    o = retrieval_attention(q, k, v, q_positions=qp, block_size=block_size, top_k=4, local_blocks=1,
                            rope_theta=THETA, stingy=True)
    assert np.isfinite(np.asarray(o)).all()


def test_jit_with_traced_positions():
  block_size, t, s = 4, 2, 40
  q, k, v = _inputs("jit", t=t, hkv=2, s=s)
  qp = _positions(np.array([29, 33]), t)
  kwargs = dict(block_size=block_size, top_k=2, rope_theta=THETA, granularity="max_over_heads")
  o = jax.jit(functools.partial(retrieval_attention, **kwargs))(q, k, v, q_positions=jnp.asarray(qp))
  testing.assert_close("o", retrieval_attention(q, k, v, q_positions=qp, **kwargs), o,
                       testing.F32_RATIO)


def test_cache_shorter_than_the_local_window():
  """S = 7 < the window (padded), bf16, custom scale: o keeps q's dtype and matches the f32 full form."""
  block_size, t, s = 4, 2, 7
  q, k, v = _inputs("tiny", t=t, hkv=2, s=s, dtype=jnp.bfloat16)
  qp = _positions(np.array([2, 5]), t)
  o = retrieval_attention(q, k, v, q_positions=qp, block_size=block_size, top_k=2, rope_theta=None,
                          scale=0.3)
  assert o.dtype == jnp.bfloat16 and o.shape == q.shape
  f32 = lambda x: x.astype(jnp.float32)
  testing.assert_close("o", _full_form(f32(q), f32(k), f32(v), qp, block_size, scale=0.3), o,
                       testing.BF16_FWD_RATIO)


@pytest.mark.parametrize("kwargs,match", [
    (dict(granularity="max_over_blocks"), "Unknown granularity"),
    (dict(top_k=0), "top_k must be an int >= 1"),
    (dict(top_k=2.0), "top_k must be an int >= 1"),
    (dict(local_blocks=-1), "local_blocks must be an int >= 0"),
    (dict(block_size=1), "block_size must be an int >= 2"),
    (dict(rope_theta=-1.0), "rope_theta must be None or a positive number"),
])
def test_bad_arguments_raise(kwargs, match):
  q, k, v = _inputs("bad", t=1, hkv=2, s=16)
  args = dict(q_positions=np.array([[9], [9]]), block_size=4, top_k=2) | kwargs
  with pytest.raises(ValueError, match=match):
    retrieval_attention(q, k, v, **args)


def test_bad_shapes_raise():
  q, k, v = _inputs("bad_shapes", t=1, hkv=3, s=16)
  with pytest.raises(ValueError, match="multiple of the kv heads"):
    retrieval_attention(q, k, v, q_positions=np.array([[9], [9]]), block_size=4, top_k=2)
  q, k, v = _inputs("bad_shapes2", t=2, hkv=2, s=16)
  with pytest.raises(ValueError, match="q_positions must be an integer array"):
    retrieval_attention(q, k, v, q_positions=np.array([[9.0, 10.0]] * 2), block_size=4, top_k=2)
