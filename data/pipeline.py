"""Batches for training (grain) and evaluation (numpy), in two formats (BATCH_FORMATS): packed byte
windows ("causal_lm", below) and T5 span corruption ("span_corruption", further below).

A "causal_lm" batch is a dict of [b, L] arrays:
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
Each process reads only its own rows' windows, by offset from the split's byte
store (data/store.py), so no host scans the corpus after the cache is built.
The iterator's state (get_state/set_state, or grain.checkpoint) is one index, so a
restored iterator continues with exactly the batches the original would produce.

Evaluation (eval_batches; data/scoring.py eval_scored_bytes): the eval stream of a split is EOS_ID followed by
the split's id stream (corpora.open_split: each document's bytes then EOS), so the split's very first byte is
predicted too, after an EOS context as every later document is. Window i has inputs
ids[i*L : i*L+L] and targets ids[i*L+1 : i*L+L+1] of that eval stream: the windows tile it without
overlap, every stream id is a target exactly once, and the weights mark the real byte targets
(not EOS, not padding), so the whole split scores exactly its documents' total byte count. The
last window is padded. With max_batches = 0 every window is scored in order (the last batch is
padded with all-pad rows, weights 0). With max_batches > 0 and fewer than the split's W windows
in k = max_batches * batch_size rows, the k windows floor(j * W / k), j = 0..k-1, are scored:
distinct, sorted, evenly spread over the whole split, window 0 first (whole windows only, never
the padded last one), in exactly max_batches full batches; otherwise the whole split is scored.
scoring.eval_scored_bytes returns the bytes of the weighted targets in scoring order (EOS separators
dropped), so its length is the sum of the eval weights, for compressor baselines
(data/compressors.py).

Span corruption (batch_format "span_corruption", T5 / ByT5 encoder-decoders; data/span_corruption.py,
../shared/specs/token_free.md §2.4; options ``data.span_corruption.noise_density`` (0.15) and
``.mean_noise_span_length`` (20)). seq_len is the encoder input length L; span_corruption.lengths(L)
gives the raw chunk length R and the target length T (L = 1024: R = 1193, T = 189). A split's raw
bytes are its id stream with the EOS separators dropped (T5 joins documents without them, spec
§17.1), cut into non-overlapping chunks of R ids. Every batch is a dict of arrays:
  inputs: int32 [b, L], the encoder ids: non-noise bytes, one sentinel 258 - i per noise span i, EOS,
    then PAD up to L (a whole chunk fills all of L, or all but one id; a short eval chunk less).
  targets: int32 [b, T], sentinel i then span i's bytes for every span, EOS, then PAD.
  decoder_inputs: int32 [b, T], targets shifted right with start id 0 (PAD).
  weights: float32 [b, T]; train: 1 on every non-pad target (sentinels and EOS included, as T5 trains);
    eval: 1 only on the real byte targets (the noise bytes), so bits per byte counts bytes.
  special_weights: float32 [b, T], 1 on the sentinel and EOS targets (reported apart in eval).
Training: the chunk indices are shuffled, repeated, batched and process-sharded exactly as the windows
above (the same code), so the iterator state is the same one index. Row r of local batch k on process
p is global example e = (k * P + p) * b + r, the same e a 1-process run gives that row, and its noise
mask is drawn from np.random.default_rng([train seed, e]): a function of the position in the stream,
so a resumed iterator redraws exactly the same masks, a chunk gets a new mask every epoch, and the P
processes' batches concatenate to the 1-process batch. Evaluation (eval_batches, scoring.eval_scored_bytes):
chunk c of the split (c = 0..C-1, C = ceil(raw bytes / R), every byte in exactly one chunk) gets the
fixed mask of default_rng([0, c]); the whole split in order, or with max_batches > 0 the chunks
eval_window_indices(C, batch_size, max_batches) as for the windows. The last chunk may be shorter than R:
it is corrupted with span_corruption.span_counts of its own length (fewer noise bytes and spans, so its
inputs and targets are padded), not padded with fake bytes. The last batch gets all-pad rows (weights
0). scoring.eval_scored_bytes returns the weighted targets' bytes (the noise bytes) in scoring order.

Synthetic source ``mqar`` (data/synthetic.py, options ``data.mqar``): training example
i is a function of (train.seed, i), batched and sharded exactly as the windows above
(without shuffling: the examples are already random); eval batches of split s are the
first ``data.mqar.eval_examples`` examples of stream s (seed 0). Weights mark only
the query-value targets, so "bits per byte" is then bits per answer.
"""

import ctypes
import dataclasses
from typing import Any, Iterator

import grain
import numpy as np

from data import bytes as byte_vocab
from data import corpora
from data import span_corruption
from data import store
from data import synthetic

Batch = dict[str, np.ndarray]

# Batches are cheap numpy gathers; a few threads and a short buffer keep memory small.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _keep_batch_temporaries_on_the_heap() -> None:
  """Sets glibc's malloc mmap threshold to 32 MiB and its trim threshold to 64 MiB (a no-op elsewhere).

  A 64 x 1024 batch makes ~0.25 MB numpy temporaries. Under glibc's initial 128 KiB thresholds each one
  is a fresh mmap (or heap top returned to the kernel), page-faulted again on the next batch: 1.6 ms per
  batch instead of 0.65 ms, measured here. glibc raises both by itself after the first large free, as a
  process that loaded a whole corpus into memory always did; one that reads the byte store may never.
  """
  try:
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
  except (OSError, AttributeError):
    pass


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


_PASSKEY_STREAM = 1  # the third seed word of the passkey mixture's draws


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: never compares the store
class _TrainWindows:
  """Maps (local batch index, [b] window indices) to a train batch (picklable for grain).

  With passkey_fraction > 0, row r of local batch k on process p (global example e = (k * P + p) * b + r,
  process-major as the rows) becomes a passkey document (synthetic.passkey_document, up to seq_len bytes)
  + EOS + the start of its corpus window when np.random.default_rng([seed, e, 1]).random() < the fraction;
  the same generator draws the document. A function of the position in the stream: a resumed iterator
  draws the same documents, each epoch new ones, and P processes' batches concatenate to 1 process's.
  """
  stream: store.SplitStore
  seq_len: int
  segment_documents: bool
  passkey_fraction: float = 0.0
  seed: int = 0
  local_batch: int = 1
  process_index: int = 0
  process_count: int = 1

  def __call__(self, batch_index: int, window_ids: np.ndarray) -> Batch:
    window_ids = np.asarray(window_ids, np.int64)
    span = self.seq_len + 1
    windows = self.stream.windows(window_ids * span, span)
    if self.passkey_fraction > 0:
      first = (int(batch_index) * self.process_count + self.process_index) * self.local_batch
      for row in range(len(windows)):
        rng = np.random.default_rng([int(self.seed) % 2**63, first + row, _PASSKEY_STREAM])
        if rng.random() < self.passkey_fraction:
          document = byte_vocab.encode(synthetic.passkey_document(rng, self.seq_len))
          corpus = windows[row, :span - len(document) - 1].copy()
          windows[row] = np.concatenate([document, [byte_vocab.EOS_ID], corpus])
    valid = np.full(len(window_ids), self.seq_len)
    return _features(windows, valid, self.segment_documents, eval_weights=False)


def _passkey_fraction(data_config: Any, seq_len: int, batch_format: str) -> float:
  """data.passkey_fraction, checked: in [0, 1], causal_lm only, and seq_len long enough for a document."""
  fraction = float(getattr(data_config, "passkey_fraction", 0.0) or 0.0)
  if fraction == 0:
    return 0.0
  if not 0 < fraction <= 1:
    raise corpora.DataError(f"data.passkey_fraction must be in [0, 1], got {fraction}.")
  if batch_format != "causal_lm":
    raise corpora.DataError(f"data.passkey_fraction mixes passkey documents into causal_lm windows; the "
                            f"model's batch format is {batch_format!r}.")
  need = synthetic.passkey_fixed_bytes() + synthetic.passkey_document_max_bytes()
  if seq_len < need:
    raise corpora.DataError(f"data.passkey_fraction needs seq_len >= {need} (the shortest passkey document "
                            f"with its answer), got {seq_len}.")
  return fraction


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


def _check_not_synthetic(source: str, batch_format: str) -> None:
  if source in corpora.SYNTHETIC_SOURCES:
    raise corpora.DataError(f"data.source {source!r} is synthetic and has no text to corrupt; "
                            f"{batch_format!r} batches need a text source ({', '.join(corpora.SOURCES)}).")


def _span_config(data_config: Any, seq_len: int) -> tuple[span_corruption.SpanLengths, float, float]:
  """(lengths for encoder length seq_len, noise_density, mean_noise_span_length) of data.span_corruption."""
  options = getattr(data_config, "span_corruption", None)  # absent: the T5 defaults
  density = float(getattr(options, "noise_density", 0.15))
  mean = float(getattr(options, "mean_noise_span_length", 20.0))
  return span_corruption.lengths(seq_len, density, mean), density, mean


def _raw_chunk(stream: store.SplitStore, chunk: int, raw_length: int) -> np.ndarray:
  """int32 byte ids of raw chunk `chunk`: the split's bytes without EOS separators, as T5 joins documents
  (spec §17.1), cut into chunks of raw_length (the last one may be shorter)."""
  values = stream.raw_bytes(chunk * raw_length, (chunk + 1) * raw_length)
  return values.astype(np.int32) + byte_vocab.BYTE_OFFSET


def _span_features(chunks: list[np.ndarray], seeds: list[list[int]], batch_size: int, seq_len: int,
                   sizes: span_corruption.SpanLengths, density: float, mean: float,
                   eval_weights: bool) -> Batch:
  """Row i is chunks[i] span-corrupted with the noise mask of np.random.default_rng(seeds[i]).

  A chunk shorter than sizes.raw_length gets span_counts of its own length; rows past len(chunks)
  are all padding (weights 0).
  """
  inputs = np.zeros((batch_size, seq_len), np.int32)
  targets = np.zeros((batch_size, sizes.targets_length), np.int32)
  special = np.zeros((batch_size, sizes.targets_length), bool)
  for row, (chunk, seed) in enumerate(zip(chunks, seeds)):
    num_noise, num_spans = span_corruption.span_counts(len(chunk), density, mean)
    mask = span_corruption.random_spans_noise_mask(len(chunk), num_noise, num_spans,
                                                   np.random.default_rng(seed))
    row_inputs, row_targets, is_sentinel = span_corruption.corrupt_with_sentinels(chunk, mask)
    inputs[row, :len(row_inputs)] = row_inputs
    targets[row, :len(row_targets)] = row_targets
    special[row, :len(row_targets)] = is_sentinel | (row_targets == byte_vocab.EOS_ID)
  decoder_inputs = np.zeros_like(targets)  # start id 0 (PAD), then the targets shifted right
  decoder_inputs[:, 1:] = targets[:, :-1]
  real = targets != byte_vocab.PAD_ID
  return {
      "inputs": inputs,
      "targets": targets,
      "decoder_inputs": decoder_inputs,
      "weights": ((real & ~special) if eval_weights else real).astype(np.float32),
      "special_weights": special.astype(np.float32),
  }


def _span_seed(seed: int, index: int) -> list[int]:
  """The np.random.default_rng seed of a noise mask: [seed mod 2**63, example or chunk index]."""
  return [int(seed) % 2**63, int(index)]


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: never compares or hashes the array
class _TrainSpanRows:
  """Maps (local batch index, [b] chunk indices) to a span corruption train batch (picklable for grain).

  Row r of local batch k on process p is global example e = (k * P + p) * b + r of the train stream
  (process-major, as the windows), and its noise mask is drawn from np.random.default_rng([seed, e]).
  """
  stream: store.SplitStore  # the train split; chunks are cut from its bytes without EOS separators
  seq_len: int
  sizes: span_corruption.SpanLengths
  density: float
  mean: float
  seed: int
  local_batch: int
  process_index: int
  process_count: int

  def __call__(self, batch_index: int, chunk_ids: np.ndarray) -> Batch:
    first = (int(batch_index) * self.process_count + self.process_index) * self.local_batch
    raw_length = self.sizes.raw_length
    chunks = [_raw_chunk(self.stream, int(c), raw_length) for c in chunk_ids]
    seeds = [_span_seed(self.seed, first + r) for r in range(len(chunks))]
    return _span_features(chunks, seeds, len(chunks), self.seq_len, self.sizes, self.density,
                          self.mean, eval_weights=False)


def _span_eval_plan(data_config: Any, split: str, seq_len: int, batch_size: int, max_batches: int
                    ) -> tuple[span_corruption.SpanLengths, float, float, store.SplitStore, np.ndarray]:
  """(lengths, noise_density, mean span length, the split's stream, the scored raw chunk indices [k])."""
  sizes, density, mean = _span_config(data_config, seq_len)
  stream = corpora.open_split(data_config, split)
  return sizes, density, mean, stream, eval_window_indices(-(-stream.num_bytes // sizes.raw_length), batch_size,
                                                           max_batches)


def _span_eval_batches(data_config: Any, split: str, seq_len: int, batch_size: int,
                       max_batches: int) -> Iterator[Batch]:
  """Span corruption eval batches of `split` (module docstring); chunk c's mask seed is [0, c]."""
  sizes, density, mean, stream, chunks = _span_eval_plan(data_config, split, seq_len, batch_size, max_batches)
  n = sizes.raw_length
  for k in range(-(-len(chunks) // batch_size)):
    rows = chunks[k * batch_size:(k + 1) * batch_size]
    yield _span_features([_raw_chunk(stream, c, n) for c in rows], [_span_seed(0, c) for c in rows],
                         batch_size, seq_len, sizes, density, mean, eval_weights=True)


# Batch layouts a model family can ask for (models/family.py `batch_format`): "causal_lm" is the packed
# windows and "span_corruption" the T5 encoder-decoder batches of this module's docstring. A new layout is
# a new name here with its builders.
BATCH_FORMATS = ("causal_lm", "span_corruption")


def check_batch_format(batch_format: str) -> None:
  if batch_format not in BATCH_FORMATS:
    raise corpora.DataError(f"no data pipeline builds {batch_format!r} batches; available: "
                            f"{', '.join(BATCH_FORMATS)}.")


def make_train_dataset(data_config: Any, *, seq_len: int, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1,
                       batch_format: str = "causal_lm") -> grain.IterDataset:
  """Returns an infinite grain IterDataset of this process's train batches.

  Each element is a Batch of b = global_batch_size // process_count rows: [b, seq_len] arrays for
  "causal_lm"; for "span_corruption" inputs [b, seq_len] (seq_len is the encoder length) and
  targets, decoder_inputs, weights, special_weights [b, span_corruption.lengths(seq_len).targets_length]
  (module docstring). Synthetic sources have no span corruption batches (DataError).
  """
  check_batch_format(batch_format)
  _keep_batch_temporaries_on_the_heap()
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
  source = getattr(data_config, "source", "bundled")
  if batch_format == "span_corruption":
    _check_not_synthetic(source, batch_format)
    _passkey_fraction(data_config, seq_len, batch_format)  # not for span corruption: one error line
    sizes, density, mean = _span_config(data_config, seq_len)
    stream = corpora.open_split(data_config, "train")
    num_chunks = stream.num_bytes // sizes.raw_length
    ds = _train_index_batches(
        data_config, num_chunks, global_batch_size, seed, process_index, process_count,
        what=(f"the train split has {stream.num_bytes} bytes (EOS separators dropped), only {num_chunks} "
              f"chunks of {sizes.raw_length} raw bytes (span corruption of seq_len = {seq_len})"))
    return ds.map_with_index(_TrainSpanRows(stream, seq_len, sizes, density, mean, seed, local_batch,
                                            process_index, process_count)).to_iter_dataset(_READ_OPTIONS)
  if source == "mqar":
    mqar, pairs = _mqar_config(data_config)
    _check_mqar_seq_len(pairs, seq_len)
    ds = grain.MapDataset.range(2**62).batch(local_batch, drop_remainder=True)  # endless in practice
    ds = ds[process_index::process_count]  # process-major, as the corpus windows
    return ds.map(_MqarRows(mqar, seq_len, seed)).to_iter_dataset(_READ_OPTIONS)
  stream = corpora.open_split(data_config, "train")
  num_windows = len(stream) // (seq_len + 1)
  ds = _train_index_batches(
      data_config, num_windows, global_batch_size, seed, process_index, process_count,
      what=f"the train split has {len(stream)} ids, only {num_windows} windows of seq_len + 1 = "
           f"{seq_len + 1}")
  rows = _TrainWindows(stream, seq_len, bool(getattr(data_config, "segment_documents", True)),
                       _passkey_fraction(data_config, seq_len, batch_format), seed, local_batch,
                       process_index, process_count)
  return ds.map_with_index(rows).to_iter_dataset(_READ_OPTIONS)


def _train_index_batches(data_config: Any, num_items: int, global_batch_size: int, seed: int,
                         process_index: int, process_count: int, what: str) -> grain.MapDataset:
  """This process's endless batches [global_batch_size // process_count] of item indices.

  range(num_items), shuffled per epoch (data.shuffle), repeated, batched and sharded process-major
  (module docstring). `what` describes the items for the too-small error.
  """
  if num_items < global_batch_size:
    raise corpora.DataError(
        f"{what}, fewer than one global batch of {global_batch_size}; "
        "use a larger corpus, a smaller batch or a shorter seq_len.")
  ds = grain.MapDataset.range(num_items)
  if getattr(data_config, "shuffle", True):
    ds = ds.shuffle(seed=_shuffle_seed(seed))
  ds = ds.repeat(None).batch(global_batch_size // process_count, drop_remainder=True)
  return ds[process_index::process_count]  # process-major: see the module docstring


def make_train_iterator(data_config: Any, *, seq_len: int, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        batch_format: str = "causal_lm") -> grain.DatasetIterator:
  """Returns a checkpointable iterator (get_state/set_state) over make_train_dataset."""
  return iter(make_train_dataset(
      data_config, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
      process_index=process_index, process_count=process_count, batch_format=batch_format))


def _eval_plan(data_config: Any, split: str, seq_len: int, batch_size: int,
               max_batches: int) -> tuple[store.SplitStore, np.ndarray]:
  """Returns (the split's stream, the scored window indices [k] in scoring order).

  The eval stream is EOS_ID then the split's stream; window i's targets are its ids [i*L+1, i*L+L+1),
  which are the split stream's ids [i*L, i*L+L).
  """
  if seq_len < 1 or batch_size < 1:
    raise corpora.DataError(f"seq_len ({seq_len}) and the eval batch size ({batch_size}) "
                            "must be positive.")
  stream = corpora.open_split(data_config, split)
  return stream, eval_window_indices(-(-len(stream) // seq_len), batch_size, max_batches)


def _eval_windows(stream: store.SplitStore, starts: np.ndarray, span: int) -> np.ndarray:
  """int32 [b, span]: row r is the eval stream's ids [starts[r], starts[r] + span), PAD past its end.

  The eval stream is EOS_ID then the split's stream: the split's first byte is predicted after an EOS
  context, like every other document's.
  """
  out = np.full((len(starts), span), byte_vocab.PAD_ID, np.int32)
  for row, start in enumerate(int(s) for s in starts):
    ids = stream.read(max(start - 1, 0), start - 1 + span)
    if start == 0:
      out[row, 0] = byte_vocab.EOS_ID
    out[row, int(start == 0):int(start == 0) + len(ids)] = ids
  return out


def eval_num_windows(data_config: Any, split: str, *, seq_len: int, batch_format: str = "causal_lm") -> int:
  """How many eval windows (causal_lm) or raw chunks (span_corruption) the whole split has."""
  check_batch_format(batch_format)
  if batch_format == "span_corruption":
    return -(-corpora.open_split(data_config, split).num_bytes // _span_config(data_config, seq_len)[0].raw_length)
  return -(-len(corpora.open_split(data_config, split)) // seq_len)


def eval_window_indices(num_windows: int, batch_size: int, max_batches: int = 0) -> np.ndarray:
  """The eval windows scored, int64 [k], sorted and distinct (see the module docstring).

  All of range(num_windows) when max_batches <= 0 or max_batches * batch_size >= num_windows;
  otherwise the k = max_batches * batch_size windows floor(j * num_windows / k), j = 0..k-1.
  """
  k = max_batches * batch_size if max_batches > 0 else num_windows
  if k >= num_windows:
    return np.arange(num_windows, dtype=np.int64)
  return np.arange(k, dtype=np.int64) * num_windows // k  # steps of num_windows / k > 1: distinct


def eval_batches(data_config: Any, split: str, *, seq_len: int, batch_size: int,
                 max_batches: int = 0, batch_format: str = "causal_lm") -> Iterator[Batch]:
  """Yields fixed eval batches of [batch_size, seq_len] arrays over one split.

  The eval stream is EOS_ID then the split's id stream (corpora.open_split); window i has inputs
  ids[i*L : i*L+L] and targets ids[i*L+1 : i*L+L+1], so every byte of the split (its first
  one included) is a weighted target exactly once when the whole split is read. The last
  window is padded, and the last batch gets all-pad rows (weights 0). max_batches > 0 reads
  at most max_batches batches: when the split has more windows than max_batches * batch_size,
  that many windows evenly spread over the whole split (eval_window_indices), not the first
  ones. MQAR sources yield their first eval examples instead (module docstring).
  "span_corruption" yields the split's raw chunks corrupted with fixed masks instead, with
  "weights" on the real byte targets and "special_weights" on the sentinel and EOS targets (module
  docstring).
  """
  check_batch_format(batch_format)
  if seq_len < 1 or batch_size < 1:
    raise corpora.DataError(f"seq_len ({seq_len}) and the eval batch size ({batch_size}) "
                            "must be positive.")
  source = getattr(data_config, "source", "bundled")
  if batch_format == "span_corruption":
    _check_not_synthetic(source, batch_format)
    yield from _span_eval_batches(data_config, split, seq_len, batch_size, max_batches)
    return
  if source == "mqar":
    yield from _mqar_eval_batches(data_config, split, seq_len, batch_size, max_batches)
    return
  stream, windows = _eval_plan(data_config, split, seq_len, batch_size, max_batches)
  segment_documents = bool(getattr(data_config, "segment_documents", True))
  num_targets = len(stream)
  for k in range(-(-len(windows) // batch_size)):
    rows = windows[k * batch_size:(k + 1) * batch_size]
    starts = np.full(batch_size, num_targets, np.int64)  # rows past the last window: all padding
    starts[:len(rows)] = rows * seq_len
    valid = np.clip(num_targets - starts, 0, seq_len)
    yield _features(_eval_windows(stream, starts, seq_len + 1), valid, segment_documents, eval_weights=True)


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
