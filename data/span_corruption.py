"""T5 / ByT5 span corruption on byte ids (../shared/specs/token_free.md §2.4).

A raw chunk of `raw_length` byte ids is split into noise and non-noise spans (T5's
`random_spans_noise_mask`, §2.4 step 2: it starts with a non-noise span and ends with a noise span,
§17.1 "Noise-mask layout"). The encoder input keeps the non-noise ids and replaces noise span i with
the sentinel id SENTINEL_START - i (258, 257, ...: ByT5 reuses the last byte ids, §2.2); the target is
sentinel i followed by span i's ids for every noise span. Both end with EOS (§2.4 step 3).

`lengths(inputs_length)` picks the raw length whose corrupted input fits the encoder exactly (T5's
`compute_input_and_target_lengths`, §2.4 step 1): 1024 -> raw 1193, 179 noise ids in 9 spans,
targets 189, as ByT5's `sequence_length = {inputs: 1024, targets: 189}`.
"""

import dataclasses

import numpy as np

from data import bytes as byte_vocab
from data import corpora

SENTINEL_START = 258  # noise span i is replaced by id 258 - i (§2.2: bytes 0xFF, 0xFE, ...)
MAX_SPANS = SENTINEL_START - byte_vocab.BYTE_OFFSET + 1  # 256: sentinels stay byte ids (>= 3)
EOS_ID = byte_vocab.EOS_ID
PAD_ID = byte_vocab.PAD_ID


@dataclasses.dataclass(frozen=True)
class SpanLengths:
  """The span corruption sizes for one encoder input length (§2.4 step 1)."""
  raw_length: int  # raw ids per example before corruption
  targets_length: int  # num_noise + num_spans + 1 (EOS)
  num_noise: int  # noise ids per example
  num_spans: int  # noise spans per example (= sentinels in inputs and in targets)


def span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
  """(num_noise, num_spans) of a raw sequence of `length` ids (§2.4 steps 1-2).

  num_noise = round(noise_density * length), at least 1 and at most length - 1; num_spans =
  round(num_noise / mean_noise_span_length), at least 1 and at most the non-noise count (so every
  span of the interleaving is positive). T5's random_spans_noise_mask rule; a single id (length 1)
  has no noise: (0, 0). Python's round (half to even), as T5's.
  """
  if length < 2:
    return 0, 0
  num_noise = min(max(round(noise_density * length), 1), length - 1)
  num_spans = min(max(round(num_noise / mean_noise_span_length), 1), length - num_noise)
  return num_noise, num_spans


def lengths(inputs_length: int, noise_density: float = 0.15,
            mean_noise_span_length: float = 20.0) -> SpanLengths:
  """The largest raw length whose corrupted input fits `inputs_length` (§2.4 step 1).

  A raw length t corrupts to (t - num_noise) + num_spans + 1 (EOS) input ids and num_noise +
  num_spans + 1 target ids, with span_counts(t). This is T5's compute_input_and_target_lengths
  wherever that gives at least one span (round(num_noise / mean) >= 1: inputs_length >= 62 at the
  defaults); below, T5 would count 0 spans where the mask has 1. T5's special case for
  noise_density == 0.5 (target length cut to the input length) is not applied. Raises
  corpora.DataError for settings that
  cannot be met: noise_density outside (0, 1), mean_noise_span_length < 1, an input too short for
  one span (< 3 ids) or more spans than there are sentinel ids (MAX_SPANS).
  """
  if not 0.0 < noise_density < 1.0:
    raise corpora.DataError(f"data.span_corruption.noise_density must be in (0, 1), got {noise_density}.")
  if not mean_noise_span_length >= 1.0:
    raise corpora.DataError("data.span_corruption.mean_noise_span_length must be at least 1, got "
                            f"{mean_noise_span_length}.")
  if inputs_length < 3:
    raise corpora.DataError(f"a span-corrupted input of {inputs_length} ids cannot hold one span: it needs "
                            "a kept byte, a sentinel and EOS (at least 3).")
  # t = inputs_length - 1 always fits (num_spans <= num_noise), so the search starts there. It ends
  # once t - num_noise + 2 (the shortest input t can give: one sentinel) exceeds inputs_length, as
  # t - num_noise never decreases while t grows (num_noise grows by at most 1 per step).
  t = best = inputs_length - 1
  while True:
    num_noise, num_spans = span_counts(t, noise_density, mean_noise_span_length)
    if t - num_noise + 2 > inputs_length:
      break
    if t - num_noise + num_spans + 1 <= inputs_length:
      best = t
    t += 1
  num_noise, num_spans = span_counts(best, noise_density, mean_noise_span_length)
  if num_spans > MAX_SPANS:
    raise corpora.DataError(
        f"span corruption of {inputs_length} input ids makes {num_spans} noise spans, more than the "
        f"{MAX_SPANS} sentinel ids {SENTINEL_START}..{byte_vocab.BYTE_OFFSET}; use a shorter input or a "
        "longer data.span_corruption.mean_noise_span_length.")
  return SpanLengths(raw_length=best, targets_length=num_noise + num_spans + 1, num_noise=num_noise,
                     num_spans=num_spans)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Lengths [num_segments] of a uniformly random split of num_items into positive parts."""
  cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, num_noise: int, num_spans: int,
                            rng: np.random.Generator) -> np.ndarray:
  """bool [length], True on noise: T5's random_spans_noise_mask (§2.4 step 2, §17.1).

  num_noise is split into num_spans positive parts and length - num_noise into num_spans positive
  parts, each uniformly at random; the spans alternate non-noise, noise, non-noise, ..., so the
  mask starts with a non-noise span and ends with a noise span. num_noise = num_spans = 0 (e.g.
  span_counts(1)) gives no noise.
  """
  if num_noise == 0 and num_spans == 0:
    return np.zeros(length, bool)
  if not 1 <= num_spans <= min(num_noise, length - num_noise):
    raise corpora.DataError(f"{num_noise} noise ids in {num_spans} spans do not fit a sequence of {length} "
                            "ids with a positive non-noise span before every noise span.")
  noise = _random_segmentation(num_noise, num_spans, rng)
  kept = _random_segmentation(length - num_noise, num_spans, rng)
  span_lengths = np.stack([kept, noise], axis=1).reshape(-1)
  return np.repeat(np.tile([False, True], num_spans), span_lengths)


def corrupt_with_sentinels(raw_ids: np.ndarray,
                           noise_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """corrupt's (inputs, targets) and bool [len(targets)], True where targets holds a sentinel.

  Sentinels reuse byte ids (§2.2), so their target positions cannot be told from the ids alone.
  """
  raw_ids = np.asarray(raw_ids, np.int32)
  noise_mask = np.asarray(noise_mask, bool)
  if raw_ids.shape != noise_mask.shape or raw_ids.ndim != 1:
    raise corpora.DataError(f"raw ids {raw_ids.shape} and noise mask {noise_mask.shape} must be the same "
                            "1-D shape.")
  span_start = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])
  num_spans = int(span_start.sum())
  if num_spans > MAX_SPANS:
    raise corpora.DataError(f"{num_spans} noise spans need more than the {MAX_SPANS} sentinel ids.")
  sentinels = (SENTINEL_START - np.cumsum(span_start) + 1).astype(np.int32)  # span i -> 258 - i
  keep = ~noise_mask | span_start
  inputs = np.append(np.where(span_start, sentinels, raw_ids)[keep], np.int32(EOS_ID)).astype(np.int32)
  noise_positions = np.flatnonzero(noise_mask)
  starts = span_start[noise_positions]
  where = np.arange(len(noise_positions)) + np.cumsum(starts)  # each noise id after its span's sentinel
  targets = np.full(len(noise_positions) + num_spans + 1, EOS_ID, np.int32)
  targets[where] = raw_ids[noise_positions]
  is_sentinel = np.zeros(len(targets), bool)
  is_sentinel[where[starts] - 1] = True
  targets[is_sentinel] = sentinels[noise_positions[starts]]
  return inputs, targets, is_sentinel


def corrupt(raw_ids: np.ndarray, noise_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets), int32, for raw ids [n] and their noise mask [n] (§2.4 step 3).

  inputs: the non-noise ids with each noise span replaced by one sentinel (span i -> 258 - i),
  then EOS. targets: for each noise span its sentinel then its ids, then EOS.
  """
  inputs, targets, _ = corrupt_with_sentinels(raw_ids, noise_mask)
  return inputs, targets


def blank_inputs(inputs: np.ndarray, blank_id: int = byte_vocab.BYTE_OFFSET + ord(" ")) -> np.ndarray:
  """inputs [b, L] with every byte id replaced by `blank_id` (a space); sentinels, EOS and PAD are kept.

  What the decoder can still predict from such inputs (where the spans are, and nothing of their context)
  measures how much it reads the encoder. Sentinels reuse byte ids (§2.2), so they are told apart by their
  order: the k-th sentinel of a row is 258 - k. A text byte that equals the next sentinel's id (0xF1-0xFF
  with up to 15 spans; 0xF5-0xFF never occur in UTF-8) is taken for it and kept.
  """
  inputs = np.asarray(inputs)
  out = np.full_like(inputs, blank_id)
  for row, ids in enumerate(inputs):
    expected = SENTINEL_START
    for j, token in enumerate(ids):
      if token in (PAD_ID, EOS_ID) or token == expected:
        out[row, j] = token
        expected -= int(token == expected)
  return out
