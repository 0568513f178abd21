"""Batches of packed byte windows for training (grain) and evaluation (numpy).

Every batch is a dict of [b, L] arrays:
  inputs, targets: int32 ids, targets[t] = the stream id after inputs[t].
  segment_ids: int32, 1 for the first document in the window, +1 on the token
    after each EOS in inputs (an EOS belongs to the document it ends); 0 = padding.
  positions: int32, restart at 0 at each segment (arange(L) when
    data.segment_documents is False, where all real tokens are segment 1).
  weights: float32 loss weights (train: targets != PAD; eval: real byte targets).

Training: the train stream is cut into non-overlapping windows of seq_len + 1 ids.
Window indices are shuffled (a different permutation each epoch, deterministic in
the seed), repeated forever and batched into per-process batches of
b = global_batch_size // process_count rows. Sharding is contiguous and
process-major: global batch k is the elements [k*G, (k+1)*G) of the shuffled
stream and process p holds rows [k*G + p*b, k*G + (p+1)*b), so concatenating the
local batches k of processes 0..P-1 gives exactly a 1-process run's batch k.
The iterator's state (get_state/set_state, or grain.checkpoint) is one index, so a
restored iterator continues with exactly the batches the original would produce.

Synthetic source ``mqar`` (data/synthetic.py, options ``data.mqar``): training example
i is a function of (train.seed, i), batched and sharded exactly as the windows above
(without shuffling: the examples are already random); eval batches of split s are the
first ``data.mqar.eval_examples`` examples of stream s (seed 0). Weights mark only
the query-value targets, so "bits per byte" is then bits per answer.
"""

from typing import Any, Iterator

import grain
import numpy as np

from data import bytes as byte_vocab
from data import corpora
from data import synthetic

Batch = dict[str, np.ndarray]

# Batches are cheap numpy gathers; a few threads and a short buffer keep memory small.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def _segments(inputs: np.ndarray, segment_documents: bool) -> tuple[np.ndarray, np.ndarray]:
  """Returns (segment_ids, positions), both int32 [b, L], for inputs [b, L]."""
  b, length = inputs.shape
  t = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length))
  if not segment_documents:
    return np.ones((b, length), np.int32), t.copy()
  is_start = np.zeros((b, length), bool)
  is_start[:, 0] = True
  is_start[:, 1:] = inputs[:, :-1] == byte_vocab.EOS_ID
  segment_ids = np.cumsum(is_start, axis=1, dtype=np.int32)
  starts = np.maximum.accumulate(np.where(is_start, t, 0), axis=1)
  return segment_ids, (t - starts).astype(np.int32)


def _features(windows: np.ndarray, valid: np.ndarray, segment_documents: bool,
              eval_weights: bool) -> Batch:
  """Builds a batch from windows int32 [b, L+1] whose first valid[b] tokens are real."""
  length = windows.shape[1] - 1
  mask = np.arange(length)[None, :] < valid[:, None]  # [b, L]
  inputs = np.where(mask, windows[:, :-1], byte_vocab.PAD_ID).astype(np.int32)
  targets = np.where(mask, windows[:, 1:], byte_vocab.PAD_ID).astype(np.int32)
  segment_ids, positions = _segments(inputs, segment_documents)
  if eval_weights:  # bits per byte: real bytes only, not EOS
    weights = byte_vocab.is_byte_id(targets) & mask
  else:
    weights = (targets != byte_vocab.PAD_ID) & mask
  return {
      "inputs": inputs,
      "targets": targets,
      "segment_ids": np.where(mask, segment_ids, 0).astype(np.int32),
      "positions": np.where(mask, positions, 0).astype(np.int32),
      "weights": weights.astype(np.float32),
  }


def _shuffle_seed(seed: int) -> int:
  # grain reseeds epoch e with seed + e; hashing keeps seed s+1 from replaying epoch 1 of s.
  return int(np.random.SeedSequence(int(seed) % 2**63).generate_state(1, np.uint32)[0])


class _TrainWindows:
  """Maps a [b] array of window indices to a train batch (picklable for grain)."""

  def __init__(self, stream: np.ndarray, seq_len: int, segment_documents: bool):
    self._stream = stream
    self._seq_len = seq_len
    self._segment_documents = segment_documents

  def __call__(self, window_ids: np.ndarray) -> Batch:
    window_ids = np.asarray(window_ids, np.int64)
    span = self._seq_len + 1
    windows = self._stream[window_ids[:, None] * span + np.arange(span)]
    valid = np.full(len(window_ids), self._seq_len)
    return _features(windows, valid, self._segment_documents, eval_weights=False)


class _MqarRows:
  """Maps a [b] array of example indices to an MQAR train batch (picklable for grain)."""

  def __init__(self, mqar_config: Any, seq_len: int, seed: int):
    self._num_pairs = synthetic.mqar_num_pairs(mqar_config.num_pairs)
    self._seq_len = seq_len
    self._seed = seed

  def __call__(self, example_ids: np.ndarray) -> Batch:
    return synthetic.mqar_batch(example_ids, seed=self._seed, num_pairs=self._num_pairs,
                                seq_len=self._seq_len, stream="train")


def _mqar_config(data_config: Any) -> Any:
  mqar = getattr(data_config, "mqar", None)
  if mqar is None:
    raise corpora.DataError("data.source='mqar' needs the data.mqar options (num_pairs, eval_examples); "
                            "see configs/base.py.")
  try:
    pairs = synthetic.mqar_num_pairs(mqar.num_pairs)
  except ValueError as e:
    raise corpora.DataError(f"data.mqar.num_pairs: {e}") from None
  return mqar, pairs


def _check_mqar_seq_len(pairs: tuple[int, ...], seq_len: int) -> None:
  need = synthetic.mqar_min_seq_len(max(pairs))
  if seq_len < need:
    raise corpora.DataError(f"data.source='mqar' with up to {max(pairs)} pairs needs seq_len >= {need} "
                            f"(4 bytes per pair), got {seq_len}.")


def make_train_dataset(data_config: Any, *, seq_len: int, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Returns an infinite grain IterDataset of this process's train batches.

  Each element is a Batch of [global_batch_size // process_count, seq_len] arrays.
  """
  if seq_len < 1 or global_batch_size < 1:
    raise corpora.DataError(f"seq_len ({seq_len}) and the global batch size "
                            f"({global_batch_size}) must be positive.")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise corpora.DataError(f"process_index {process_index} is out of range for "
                            f"process_count {process_count}.")
  if global_batch_size % process_count:
    raise corpora.DataError(f"the global batch size {global_batch_size} does not divide "
                            f"evenly over {process_count} processes.")
  local_batch = global_batch_size // process_count
  if getattr(data_config, "source", "bundled") == "mqar":
    mqar, pairs = _mqar_config(data_config)
    _check_mqar_seq_len(pairs, seq_len)
    ds = grain.MapDataset.range(2**62).batch(local_batch, drop_remainder=True)  # endless in practice
    ds = ds[process_index::process_count]  # process-major, as the corpus windows
    return ds.map(_MqarRows(mqar, seq_len, seed)).to_iter_dataset(_READ_OPTIONS)
  stream = corpora.load_stream(data_config, "train")
  num_windows = len(stream) // (seq_len + 1)
  if num_windows < global_batch_size:
    raise corpora.DataError(
        f"the train split has {len(stream)} ids, only {num_windows} windows of "
        f"seq_len + 1 = {seq_len + 1}, fewer than one global batch of {global_batch_size}; "
        "use a larger corpus, a smaller batch or a shorter seq_len.")
  ds = grain.MapDataset.range(num_windows)
  if getattr(data_config, "shuffle", True):
    ds = ds.shuffle(seed=_shuffle_seed(seed))
  ds = ds.repeat(None).batch(local_batch, drop_remainder=True)
  ds = ds[process_index::process_count]  # process-major: see the module docstring
  ds = ds.map(_TrainWindows(stream, seq_len, bool(getattr(data_config, "segment_documents",
                                                          True))))
  return ds.to_iter_dataset(_READ_OPTIONS)


def make_train_iterator(data_config: Any, *, seq_len: int, global_batch_size: int, seed: int,
                        process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Returns a checkpointable iterator (get_state/set_state) over make_train_dataset."""
  return iter(make_train_dataset(
      data_config, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
      process_index=process_index, process_count=process_count))


def eval_batches(data_config: Any, split: str, *, seq_len: int, batch_size: int,
                 max_batches: int = 0) -> Iterator[Batch]:
  """Yields fixed eval batches of [batch_size, seq_len] arrays over one split.

  Window i has inputs stream[i*L : i*L+L] and targets stream[i*L+1 : i*L+L+1], so
  every stream id after the first is a target exactly once. The last window is
  padded, and the last batch gets all-pad rows (weights 0). max_batches > 0 stops
  early.
  """
  if seq_len < 1 or batch_size < 1:
    raise corpora.DataError(f"seq_len ({seq_len}) and the eval batch size ({batch_size}) "
                            "must be positive.")
  if getattr(data_config, "source", "bundled") == "mqar":
    yield from _mqar_eval_batches(data_config, split, seq_len, batch_size, max_batches)
    return
  stream = corpora.load_stream(data_config, split)
  segment_documents = bool(getattr(data_config, "segment_documents", True))
  num_targets = len(stream) - 1
  num_windows = -(-num_targets // seq_len)
  num_batches = -(-num_windows // batch_size)
  if max_batches > 0:
    num_batches = min(num_batches, max_batches)
  span = np.arange(seq_len + 1)
  for k in range(num_batches):
    starts = (k * batch_size + np.arange(batch_size)) * seq_len
    valid = np.clip(num_targets - starts, 0, seq_len)
    windows = stream[np.minimum(starts[:, None] + span, len(stream) - 1)]
    yield _features(windows, valid, segment_documents, eval_weights=True)


def _mqar_eval_batches(data_config: Any, split: str, seq_len: int, batch_size: int,
                       max_batches: int) -> Iterator[Batch]:
  """The first data.mqar.eval_examples examples of `split`'s MQAR stream; the last batch padded."""
  if split not in corpora.SPLITS:
    raise corpora.DataError(f"unknown split {split!r}; expected one of {', '.join(corpora.SPLITS)}.")
  mqar, pairs = _mqar_config(data_config)
  _check_mqar_seq_len(pairs, seq_len)
  num_examples = int(mqar.eval_examples)
  if num_examples < 1:
    raise corpora.DataError(f"data.mqar.eval_examples must be positive, got {num_examples}.")
  num_batches = -(-num_examples // batch_size)
  if max_batches > 0:
    num_batches = min(num_batches, max_batches)
  for k in range(num_batches):
    ids = k * batch_size + np.arange(batch_size)
    batch = synthetic.mqar_batch(ids, seed=0, num_pairs=pairs, seq_len=seq_len, stream=split)
    beyond = ids >= num_examples  # padding rows of the last batch: no loss, no attention
    for key in batch:
      batch[key][beyond] = 0
    yield batch
