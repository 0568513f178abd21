"""Landmark token insertion and lm_benchmark targets (specs/attention_variants.md §2.1, §2.3, §2.8).

The token-stream side of Landmark attention (Mohtashami & Jaggi 2023). All functions are pure, jit-safe and
have static output shapes, so the model calls them on traced ids (`models/landmark.py` inserts landmarks
inside the model, like the paper's llama flash path `enable_landmark_insertion`).

Insertion (§2.1): one landmark id after every `block_size - 1` regular tokens of each segment, so a block
is `block_size - 1` regular tokens plus its landmark (default 51 = 50 + 1, the paper's ℓ_block = 50).
Positions are positions in the expanded stream: landmarks occupy position slots, position p is a landmark
iff p % block_size == block_size - 1, and block = p // block_size. A regular token with regular
(landmark-free) position r sits at expanded position r + r // (block_size - 1).

Pitfall §2.8 (off-by-one between ids and mask): ids, segment ids, positions and the map back to the
regular tokens all come from the one function `insert_landmarks`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

PAD_ID = 0  # ByT5 byte ids (DESIGN §6): 0 pad, 1 eos, 2 unk, byte b -> b + 3
LANDMARK_ID = 259  # the first special id above the 259 byte ids (DESIGN §6)
DEFAULT_BLOCK_SIZE = 51  # 50 regular tokens + 1 landmark (paper ℓ_block = 50, lm_benchmark mem_freq = 50)


class LandmarkStream(NamedTuple):
  """A landmark-expanded token stream of static length N (see `expanded_length`).

  ids:          [B, N] int32, landmark_id after every block_size - 1 regular tokens of each segment;
                unused tail slots hold PAD_ID.
  segment_ids:  [B, N] int32, a landmark takes the segment of the token it follows; unused slots 0.
  positions:    [B, N] int32 expanded within-segment positions; unused slots 0.
  token_slots:  [B, T] int32, slot of each input token in the expanded stream (`contract` uses it).
  num_valid:    [B] int32, number of used slots (they are the prefix [0, num_valid) of each row).
  """
  ids: jax.Array
  segment_ids: jax.Array
  positions: jax.Array
  token_slots: jax.Array
  num_valid: jax.Array


def _check_block_size(block_size: int) -> int:
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
    raise ValueError(f"landmark block_size must be an int >= 2 (regular tokens + 1 landmark), got "
                     f"{block_size!r}.")
  return block_size


def expanded_length(length: int, block_size: int, aligned: bool = True) -> int:
  """Static expanded length for `length` regular tokens.

  aligned=True: every segment starts at regular position 0, so at most length // (block_size - 1)
  landmarks fit. aligned=False: the first segment may start anywhere (a decode call at an offset, or a
  window continuing a document), which can add one more landmark.
  """
  per_block = _check_block_size(block_size) - 1
  return length + length // per_block + (0 if aligned else 1)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """[B, T] segment ids -> [B, T] int32 positions restarting at 0 wherever the segment id changes."""
  t = segment_ids.shape[1]
  index = jnp.arange(t, dtype=jnp.int32)
  change = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=True)
  starts = jax.lax.cummax(jnp.where(change, index, 0), axis=1)
  return index - starts


def insert_landmarks(ids: jax.Array, *, block_size: int = DEFAULT_BLOCK_SIZE,
                     segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                     landmark_id: int = LANDMARK_ID) -> LandmarkStream:
  """Inserts a landmark after every block_size - 1 regular tokens of each segment (spec §2.1).

  Args:
    ids: [B, T] int regular token ids.
    block_size: regular tokens per block + 1 (the landmark), >= 2.
    segment_ids: [B, T] int or None (one segment). Segment 0 (padding) never gets landmarks.
    positions: [B, T] int regular (landmark-free) within-segment positions, or None: derived from
      segment_ids (restarting at 0 in each segment), or arange(T). Given positions decide where blocks
      close (a landmark follows a token at regular position r iff (r + 1) % (block_size - 1) == 0), so
      a decode call at offset o passes o + arange(T). Every segment but a row's first must start at 0.

  Returns:
    A `LandmarkStream` of length `expanded_length(T, block_size, aligned=positions is None)`; the unused
    tail slots are padding (PAD_ID, segment 0, position 0).
  """
  block_size = _check_block_size(block_size)
  per_block = block_size - 1
  ids = jnp.asarray(ids, jnp.int32)
  batch, t = ids.shape
  n = expanded_length(t, block_size, aligned=positions is None)
  if segment_ids is None:
    segment_ids = jnp.ones((batch, t), jnp.int32)
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  if positions is None:
    positions = segment_positions(segment_ids)
  positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (batch, t))

  closes_block = (segment_ids != 0) & ((positions + 1) % per_block == 0)
  landmarks_before = jnp.cumsum(closes_block, axis=1, dtype=jnp.int32) - closes_block
  token_slots = jnp.arange(t, dtype=jnp.int32) + landmarks_before
  landmark_slots = jnp.where(closes_block, token_slots + 1, n)  # n: out of bounds, dropped
  token_positions = positions + positions // per_block

  rows = jnp.arange(batch)[:, None]

  def scatter(tokens, landmarks, fill):
    out = jnp.full((batch, n), fill, jnp.int32)
    out = out.at[rows, token_slots].set(tokens, mode="drop")
    return out.at[rows, landmark_slots].set(landmarks, mode="drop")

  return LandmarkStream(
      ids=scatter(ids, jnp.full_like(ids, landmark_id), PAD_ID),
      segment_ids=scatter(segment_ids, segment_ids, 0),
      positions=scatter(token_positions, token_positions + 1, 0),
      token_slots=token_slots,
      num_valid=t + jnp.sum(closes_block, axis=1, dtype=jnp.int32))


def contract(x: jax.Array, token_slots: jax.Array) -> jax.Array:
  """Values at the regular tokens: x [B, N, ...] expanded stream, token_slots [B, T] -> [B, T, ...]."""
  index = token_slots.reshape(token_slots.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def lm_benchmark_targets(ids: jax.Array, *, landmark_id: int = LANDMARK_ID,
                         ignored_ids: tuple[int, ...] = (PAD_ID,)
                         ) -> tuple[jax.Array, jax.Array]:
  """Next-token targets and weights for an expanded stream, as lm_benchmark `optim/utils.py::get_batch`.

  Spec §2.3: the target of position s is the next token, skipping a landmark (then it is the token after
  the landmark); positions whose input is a landmark, whose input or target is in `ignored_ids`, or whose
  target falls outside the array get weight 0. lm_benchmark also ignores its EOT inputs; the byte LM trains on
  eos inputs, so `ignored_ids` defaults to padding only, which makes this loss equal to the byte-level loss
  of the in-model insertion (`models/landmark.py`; tests/data/test_landmark_data.py checks it).

  Args:
    ids: [B, N] int expanded ids.

  Returns:
    (targets [B, N] int32, weights [B, N] float32).
  """
  ids = jnp.asarray(ids, jnp.int32)
  n = ids.shape[1]
  pad = jnp.full_like(ids[:, :2], PAD_ID)
  ahead = jnp.concatenate([ids, pad], axis=1)
  next1, next2 = ahead[:, 1:n + 1], ahead[:, 2:n + 2]
  skip = next1 == landmark_id
  targets = jnp.where(skip, next2, next1)
  index = jnp.arange(n)
  in_range = jnp.where(skip, index + 2 < n, index + 1 < n)
  ignored = ids == landmark_id
  for ignored_id in ignored_ids:
    ignored |= (ids == ignored_id) | (targets == ignored_id)
  weights = (in_range & ~ignored).astype(jnp.float32)
  return jnp.where(weights > 0, targets, PAD_ID), weights
