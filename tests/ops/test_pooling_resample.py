"""ops.pooling.resample: offsets, run ids, concatenation pooling, per-offset slices and the slot attention
masks against naive Python loops written from the module docstring (specs/token_free.md §6, §10.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import pooling


def _case(seed, t=24, p=0.3, docs=True):
  rng = np.random.default_rng(seed)
  b = rng.random((2, t)) < p
  seg = np.ones((2, t), np.int32)
  if docs:  # row 1 packs two documents; the first ends with a boundary (an EOS)
    seg[1, 10:] = 2
    b[1, 9] = True
  return b, seg


def _naive_group_offsets(b_row, seg_row):
  out, start = [], 0
  for t in range(len(b_row)):
    if t == 0 or b_row[t - 1] or seg_row[t] != seg_row[t - 1]:
      start = t
    out.append(t - start)
  return out


def _naive_read_offsets(reads_row, seg_row):
  out, origin = [], -1
  for t in range(len(reads_row)):
    new_doc = t == 0 or seg_row[t] != seg_row[t - 1]
    if new_doc or reads_row[t] != reads_row[t - 1]:
      origin = t - 1 if reads_row[t] == 0 else t  # the null slot's virtual boundary precedes the document
    out.append(t - origin)
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_offsets_and_run_ids_match_naive_loops(seed):
  b, seg = _case(seed)
  groups = pooling.group_ids(jnp.asarray(b), 9)
  offsets = np.asarray(pooling.group_offsets(groups, jnp.asarray(seg)))
  reads = np.asarray(groups.reads)
  read_offsets = np.asarray(pooling.read_offsets(jnp.asarray(reads), jnp.asarray(seg)))
  runs = np.asarray(pooling.run_ids(jnp.asarray(reads), jnp.asarray(seg)))
  for r in range(2):
    assert list(offsets[r]) == _naive_group_offsets(b[r], seg[r])
    assert list(read_offsets[r]) == _naive_read_offsets(reads[r], seg[r])
    for i in range(1, b.shape[1]):  # a new run exactly where the read slot or the document changes
      same = reads[r, i] == reads[r, i - 1] and seg[r, i] == seg[r, i - 1]
      assert (runs[r, i] == runs[r, i - 1]) == same


def test_fixed_patches_give_megabyte_local_positions():
  """Fixed patches of P (b_t = 1[t mod P == 0], the shifted form of §10.1): byte t reads slot t // P + 1 at
  local position p = t mod P; the boundary byte is p = 0 of the next patch's local model."""
  p, t = 4, 16
  ends = pooling.fixed_boundaries(jnp.full((1, t), 7, jnp.int32), p)
  groups = pooling.group_ids(ends, t // p + 1)
  np.testing.assert_array_equal(groups.reads[0], np.arange(t) // p + 1)
  np.testing.assert_array_equal(pooling.read_offsets(groups.reads)[0], np.arange(t) % p)


@pytest.mark.parametrize("width", [2, 5])
def test_concat_pool_matches_naive_loop_and_fixed_pool(width):
  b, seg = _case(3)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 24, 3)), jnp.float32)
  capacity = 7
  groups = pooling.group_ids(jnp.asarray(b), capacity)
  null = jnp.arange(width * 3, dtype=jnp.float32)
  out = np.asarray(pooling.concat_pool(x, groups, width, jnp.asarray(seg), null))
  want = np.zeros((2, capacity, width * 3))
  want[:, 0] = null
  g = np.asarray(groups.exclusive)
  for r in range(2):
    offsets = _naive_group_offsets(b[r], seg[r])
    for t in range(24):
      if g[r, t] + 1 < capacity and offsets[t] < width:
        want[r, g[r, t] + 1, offsets[t] * 3:(offsets[t] + 1) * 3] = x[r, t]
  np.testing.assert_allclose(out, want, rtol=1e-6)
  # Fixed patches: the groups m >= 1 are fixed_pool's concat patches (the shifted MEGABYTE input).
  k = 3
  ends = pooling.fixed_boundaries(jnp.full((2, 24), 7, jnp.int32), k)
  fixed = pooling.concat_pool(x, pooling.group_ids(ends, 24 // k + 1), k)
  np.testing.assert_allclose(fixed[:, 2:], pooling.fixed_pool(x, k, mode="concat")[:, 1:], rtol=1e-6)


def test_offset_slices_take_the_offsets_slice_and_zero_past_the_width():
  y = jnp.arange(2 * 5 * 6, dtype=jnp.float32).reshape(2, 5, 6)  # width 3 of D = 2
  offsets = jnp.asarray([[0, 1, 2, 3, 0], [2, 2, 1, 0, 7]])
  out = np.asarray(pooling.offset_slices(y, offsets, 3))
  for r in range(2):
    for t in range(5):
      o = int(offsets[r, t])
      want = np.asarray(y[r, t, 2 * o:2 * o + 2]) if o < 3 else np.zeros(2)
      np.testing.assert_array_equal(out[r, t], want)
  with pytest.raises(ValueError, match="multiple of width"):
    pooling.offset_slices(y, offsets, 4)


def test_masks_match_their_definitions():
  b, seg = _case(5)
  groups = pooling.group_ids(jnp.asarray(b), 6)
  pool_mask = np.asarray(pooling.pooling_mask(groups))
  g = np.asarray(groups.exclusive)
  for r in range(2):
    for s in range(6):
      for t in range(24):
        assert pool_mask[r, s, t] == (s >= 1 and g[r, t] + 1 == s)
  reads = np.minimum(np.asarray(groups.reads), 5)
  slot_segments = np.array([[0, 1, 1, 1, 1, 1], [0, 1, 1, 2, 2, 2]], np.int32)
  up = np.asarray(pooling.upsampling_mask(jnp.asarray(reads), jnp.asarray(slot_segments), jnp.asarray(seg)))
  for r in range(2):
    for t in range(24):
      for s in range(6):
        assert up[r, t, s] == (s == 0 or (s <= reads[r, t] and slot_segments[r, s] == seg[r, t]))


def test_masked_attention_is_a_masked_softmax_and_empty_rows_are_zero():
  rng = np.random.default_rng(6)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1, 3, 2, 4), (1, 5, 2, 4), (1, 5, 2, 4)))
  mask = jnp.asarray([[[1, 1, 0, 0, 1], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]]], bool)
  out = np.asarray(pooling.masked_attention(q, k, v, mask))
  for i in range(3):
    for h in range(2):
      keys = [j for j in range(5) if mask[0, i, j]]
      if not keys:
        np.testing.assert_array_equal(out[0, i, h], 0.0)
        continue
      s = np.array([np.dot(q[0, i, h], k[0, j, h]) / 2.0 for j in keys])
      w = np.exp(s - s.max())
      w /= w.sum()
      np.testing.assert_allclose(out[0, i, h], sum(wj * v[0, j, h] for wj, j in zip(w, keys)), rtol=1e-5)
  grads = jax.grad(lambda q, k, v: jnp.sum(pooling.masked_attention(q, k, v, mask) ** 2), argnums=(0, 1, 2))(
      q, k, v)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  np.testing.assert_array_equal(grads[0][0, 1], 0.0)  # the query that sees nothing has no gradient
