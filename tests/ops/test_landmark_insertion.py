"""Tests for ops/landmark/insertion.py: landmark insertion (spec §2.1, §2.8), lm_benchmark targets (spec §2.3)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from data import bytes as byte_ids
from ops.landmark import insertion as landmark
from tests.models import model_testing as mt
from ops import losses

LM = landmark.LANDMARK_ID


def _loop_insert(ids, segment_ids, positions, block_size):
  """Python-loop oracle for one row: (ids, segments, positions, token_slots) of the used prefix."""
  per_block = block_size - 1
  out_ids, out_seg, out_pos, slots = [], [], [], []
  for token, seg, pos in zip(ids, segment_ids, positions):
    slots.append(len(out_ids))
    expanded = pos + pos // per_block
    out_ids.append(token), out_seg.append(seg), out_pos.append(expanded)
    if seg != 0 and (pos + 1) % per_block == 0:
      out_ids.append(LM), out_seg.append(seg), out_pos.append(expanded + 1)
  return out_ids, out_seg, out_pos, slots


def _check_against_loop(stream, ids, segment_ids, positions, block_size):
  for b in range(ids.shape[0]):
    want_ids, want_seg, want_pos, want_slots = _loop_insert(ids[b], segment_ids[b], positions[b], block_size)
    n = len(want_ids)
    assert int(stream.num_valid[b]) == n
    np.testing.assert_array_equal(stream.ids[b, :n], want_ids)
    np.testing.assert_array_equal(stream.segment_ids[b, :n], want_seg)
    np.testing.assert_array_equal(stream.positions[b, :n], want_pos)
    np.testing.assert_array_equal(stream.token_slots[b], want_slots)
    # Unused tail slots are padding: pad id, segment 0.
    np.testing.assert_array_equal(stream.ids[b, n:], byte_ids.PAD_ID)
    np.testing.assert_array_equal(stream.segment_ids[b, n:], 0)


def test_insert_hand_example():
  ids = np.arange(10, 20, dtype=np.int32)[None]  # 10 regular tokens, blocks of 3 + 1 landmark
  stream = landmark.insert_landmarks(ids, block_size=4)
  assert stream.ids.shape == (1, 10 + 10 // 3)
  np.testing.assert_array_equal(stream.ids[0], [10, 11, 12, LM, 13, 14, 15, LM, 16, 17, 18, LM, 19])
  np.testing.assert_array_equal(stream.positions[0], np.arange(13))
  np.testing.assert_array_equal(stream.token_slots[0], [0, 1, 2, 4, 5, 6, 8, 9, 10, 12])
  # Landmarks sit exactly at positions p with p % block_size == block_size - 1 (the ops' convention).
  is_landmark = np.asarray(stream.ids[0]) == LM
  np.testing.assert_array_equal(is_landmark, np.arange(13) % 4 == 3)


@pytest.mark.parametrize("t, block_size", [(1, 2), (7, 5), (23, 5), (50, 51), (51, 51), (103, 51)])
def test_insert_without_segments_fills_the_static_length(t, block_size):
  ids = mt.random_ids(t, (2, t))
  stream = landmark.insert_landmarks(ids, block_size=block_size)
  n = landmark.expanded_length(t, block_size)
  assert n == t + t // (block_size - 1)
  for field in (stream.ids, stream.segment_ids, stream.positions):
    assert field.shape == (2, n) and field.dtype == jnp.int32
  np.testing.assert_array_equal(stream.num_valid, [n, n])  # no padding needed
  _check_against_loop(stream, ids, np.ones_like(ids), np.tile(np.arange(t), (2, 1)), block_size)


@pytest.mark.parametrize("seed", range(4))
def test_insert_with_segments_restarts_blocks(seed):
  """Random packed rows (with a padded tail): blocks restart at each segment, segment 0 gets none."""
  rng = np.random.default_rng(seed)
  t, block_size = 29, 4
  lengths = rng.integers(1, 12, size=8)
  segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[:t]
  segment_ids = np.pad(segment_ids, (0, t - segment_ids.size))
  segment_ids[rng.integers(t - 5, t):] = 0  # padding tail
  segment_ids = np.stack([segment_ids, np.ones(t, np.int64)]).astype(np.int32)
  ids = mt.random_ids(seed, (2, t))
  stream = landmark.insert_landmarks(ids, block_size=block_size, segment_ids=segment_ids)
  assert stream.ids.shape == (2, landmark.expanded_length(t, block_size))
  positions = np.asarray(landmark.segment_positions(jnp.asarray(segment_ids)))
  for b in range(2):  # positions restart at every segment change
    starts = np.flatnonzero(np.diff(segment_ids[b], prepend=-1) != 0)
    for start, end in zip(starts, list(starts[1:]) + [t]):
      np.testing.assert_array_equal(positions[b, start:end], np.arange(end - start))
  _check_against_loop(stream, ids, segment_ids, positions, block_size)


@pytest.mark.parametrize("block_size", [3, 5])
def test_decode_offsets_and_valid_count(block_size):
  """A call of T tokens at offset o: the static length T + T // (bs-1) + 1 always suffices, num_valid is
  T + #completed blocks, and consecutive calls concatenate to the one-shot expansion."""
  per_block = block_size - 1
  insert = jax.jit(functools.partial(landmark.insert_landmarks, block_size=block_size))
  total = 17
  ids = mt.random_ids(block_size, (1, total))
  whole = landmark.insert_landmarks(ids, block_size=block_size)
  for t in (1, 2, 3, 4, 5, 7):
    for offset in range(0, total - t + 1):
      positions = offset + np.arange(t, dtype=np.int32)[None]
      stream = insert(ids[:, offset:offset + t], positions=positions)  # traced positions
      assert stream.ids.shape == (1, t + t // per_block + 1)
      completed = (offset + t) // per_block - offset // per_block
      assert int(stream.num_valid[0]) == t + completed
      assert completed in (t // per_block, t // per_block + 1)
      n = t + completed
      start = offset + offset // per_block  # expanded position of the first token
      np.testing.assert_array_equal(stream.ids[0, :n], whole.ids[0, start:start + n])
      np.testing.assert_array_equal(stream.positions[0, :n], start + np.arange(n))
      _check_against_loop(stream, ids[:, offset:offset + t], np.ones((1, t), np.int32), positions,
                          block_size)


def test_contract_round_trip():
  t, block_size = 23, 5
  ids = mt.random_ids(0, (2, t))
  segment_ids = np.where(np.arange(t) < 9, 1, 2)[None].repeat(2, 0).astype(np.int32)
  stream = landmark.insert_landmarks(ids, block_size=block_size, segment_ids=segment_ids)
  np.testing.assert_array_equal(landmark.contract(stream.ids, stream.token_slots), ids)
  x = jnp.asarray(np.random.default_rng(1).normal(size=stream.ids.shape + (3,)), jnp.float32)
  gathered = landmark.contract(x, stream.token_slots)
  assert gathered.shape == (2, t, 3)
  np.testing.assert_array_equal(gathered, np.take_along_axis(np.asarray(x), np.asarray(
      stream.token_slots)[..., None], axis=1))
  # The dropped rows are exactly the landmarks.
  kept = np.zeros(stream.ids.shape, bool)
  np.put_along_axis(kept, np.asarray(stream.token_slots), True, axis=1)
  np.testing.assert_array_equal(~kept & (np.asarray(stream.segment_ids) != 0),
                                np.asarray(stream.ids) == LM)


def test_bad_block_size_raises():
  for bad in (1, 0, 5.0, True):
    with pytest.raises(ValueError, match="block_size must be an int >= 2"):
      landmark.insert_landmarks(np.ones((1, 4), np.int32), block_size=bad)


def test_lm_benchmark_targets_hand_example():
  a, b, c, d, e = 10, 11, 12, 13, 14
  ids = np.array([[a, b, LM, c, d, LM, e, 0]], np.int32)
  targets, weights = landmark.lm_benchmark_targets(ids)
  # next token, skipping landmarks; landmark / padding inputs or targets and missing targets ignored
  np.testing.assert_array_equal(weights[0], [1, 1, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(np.where(weights[0] > 0, targets[0], -1), [b, c, -1, d, e, -1, -1, -1])
  # A stream ending right before a landmark has no target for its last regular token.
  targets, weights = landmark.lm_benchmark_targets(np.array([[a, b, LM]], np.int32))
  np.testing.assert_array_equal(weights[0], [1, 0, 0])
  assert int(targets[0, 0]) == b


def test_model_loss_equals_lm_benchmark_loss():
  """Spec §2.3 equivalence: the in-model insertion's byte loss == the lm_benchmark loss of the same
  weights on the externally expanded stream (landmark targets skipped, landmark inputs ignored)."""
  block_size, t = 5, 21
  config = mt.tiny_model_config("landmark", **{"landmark.block_size": block_size})
  external = mt.tiny_model_config("landmark", name="transformer", **{"landmark.block_size": block_size})
  model, lm_benchmark_model = models.get_model(config), models.get_model(external)
  params = mt.init_params(model)
  stream_bytes = mt.random_ids(5, (2, t + 1))

  logits = mt.forward(model, params, stream_bytes[:, :t])
  nll, count = losses.weighted_nll(logits, stream_bytes[:, 1:], np.ones((2, t), np.float32))

  expanded = landmark.insert_landmarks(stream_bytes, block_size=block_size)
  targets, weights = landmark.lm_benchmark_targets(expanded.ids)
  assert float(weights.sum()) == 2 * t  # every regular input but the last has a target
  bench_logits = mt.forward(lm_benchmark_model, params, expanded.ids)
  bench_nll, bench_count = losses.weighted_nll(bench_logits, targets, weights)
  assert float(count) == float(bench_count)
  np.testing.assert_allclose(float(bench_nll), float(nll), rtol=1e-5)
  # Position by position: the model's logits are the expanded stream's logits at the regular tokens.
  np.testing.assert_allclose(landmark.contract(bench_logits, expanded.token_slots)[:, :t], logits,
                             atol=1e-5, rtol=0)


def test_ids_agree_with_the_byte_vocabulary():
  """ops/ cannot import data/, so the ids it hard-codes must be the byte vocabulary's (DESIGN §6)."""
  assert landmark.PAD_ID == byte_ids.PAD_ID
  assert landmark.LANDMARK_ID == byte_ids.VOCAB_SIZE  # the first id above the byte ids
