"""ops.pooling.end_of_token (Toucan, specs/token_free.md §7) against a naive walk over the bytes: append the
byte, then an EOT after every boundary whose group is stored."""

import jax.numpy as jnp
import numpy as np
import pytest

from ops import pooling

EOT = 259


def _naive(b_row, seg_row, pos_row, capacity, targets_row, weights_row):
  tokens, segs, poss, tgts, wts = [], [], [], [], []
  groups_before, eots_in_doc, byte_weight = 0, 0, []
  for t in range(len(b_row)):
    if t > 0 and seg_row[t] != seg_row[t - 1]:
      eots_in_doc = 0
    overflow = groups_before >= capacity - 1
    stored = bool(b_row[t]) and not overflow
    w = 0.0 if overflow else weights_row[t]
    byte_weight.append(w)
    tokens.append(("byte", t))
    segs.append(seg_row[t])
    poss.append(pos_row[t] + eots_in_doc)
    tgts.append(EOT if stored else targets_row[t])
    wts.append(w)
    if stored:
      tokens.append(("eot", t))
      segs.append(seg_row[t])
      poss.append(pos_row[t] + eots_in_doc + 1)
      tgts.append(targets_row[t])
      wts.append(w)
      eots_in_doc += 1
    groups_before += int(b_row[t])
  return tokens, segs, poss, tgts, wts, byte_weight


@pytest.mark.parametrize("seed, capacity", [(0, 9), (1, 4), (2, 30)])
def test_layout_targets_and_next_byte_view_match_a_naive_walk(seed, capacity):
  rng = np.random.default_rng(seed)
  t = 20
  b = rng.random((2, t)) < 0.35
  seg = np.ones((2, t), np.int32)
  seg[1, 8:] = 2
  b[1, 7] = True  # the first document's EOS
  pos = np.where(seg[1] == 1, np.arange(t), np.arange(t) - 8)[None].repeat(2, 0)
  pos[0] = np.arange(t)
  targets = rng.integers(3, 259, (2, t)).astype(np.int32)
  weights = (rng.random((2, t)) < 0.9).astype(np.float32)
  groups = pooling.group_ids(jnp.asarray(b), capacity)
  layout = pooling.eot_layout(jnp.asarray(b), groups, jnp.asarray(seg), jnp.asarray(pos))
  assert layout.length == t + capacity - 1
  ex_t, ex_w, byte_w = pooling.eot_targets(jnp.asarray(targets), jnp.asarray(weights), layout, EOT)
  values = jnp.arange(2 * t, dtype=jnp.int32).reshape(2, t)
  expanded = pooling.expand_layout(layout, values, -values - 1, -999)
  for r in range(2):
    tokens, segs, poss, tgts, wts, bw = _naive(b[r], seg[r], pos[r], capacity, targets[r], weights[r])
    n = len(tokens)
    want = [int(values[r, i]) if kind == "byte" else int(-values[r, i] - 1) for kind, i in tokens]
    np.testing.assert_array_equal(expanded[r, :n], want)
    np.testing.assert_array_equal(expanded[r, n:], -999)
    np.testing.assert_array_equal(layout.segment_ids[r, :n], segs)
    np.testing.assert_array_equal(layout.segment_ids[r, n:], 0)
    np.testing.assert_array_equal(layout.positions[r, :n], poss)
    np.testing.assert_array_equal(ex_t[r, :n], tgts)
    np.testing.assert_array_equal(ex_w[r, :n], wts)
    np.testing.assert_array_equal(byte_w[r], bw)
    # The next-byte view: at byte t, the token whose target is byte t + 1 (its EOT when it has one).
    view = np.asarray(pooling.next_byte_view(expanded, layout))[r]
    for i in range(t):
      has_eot = ("eot", i) in tokens
      assert view[i] == (-values[r, i] - 1 if has_eot else values[r, i])
