"""What an evaluation scores, as bytes: the compressor baselines' input and the progress total.

eval_scored_bytes returns exactly the bytes that data/pipeline.py eval_batches (same arguments) puts weight
on, in scoring order; eval_scored_count counts them without reading them. Both walk the same eval plans as
eval_batches (pipeline._eval_plan, pipeline._span_eval_plan), so they cannot disagree with it.
"""

from typing import Any

import numpy as np

from data import bytes as byte_vocab
from data import corpora
from data import pipeline
from data import span_corruption


def _scored_units(data_config: Any, split: str, seq_len: int, batch_size: int, max_batches: int,
                  batch_format: str) -> tuple[int, Any]:
  """(number of scored units, unit(i) -> the uint8 bytes that unit i scores), in scoring order.

  A unit is an eval window (causal_lm: its targets with the EOS separators dropped) or a raw chunk
  (span_corruption: its noise bytes, the targets without sentinels and EOS).
  """
  if batch_format == "span_corruption":
    sizes, density, mean, stream, chunks = pipeline._span_eval_plan(
        data_config, split, seq_len, batch_size, max_batches)

    def span_unit(i: int) -> np.ndarray:
      c = int(chunks[i])
      batch = pipeline._span_features([pipeline._raw_chunk(stream, c, sizes.raw_length)],
                                      [pipeline._span_seed(0, c)], 1, seq_len, sizes, density, mean,
                                      eval_weights=True)
      return (batch["targets"][batch["weights"] > 0] - byte_vocab.BYTE_OFFSET).astype(np.uint8)
    return len(chunks), span_unit
  stream, windows = pipeline._eval_plan(data_config, split, seq_len, batch_size, max_batches)

  def window_unit(i: int) -> np.ndarray:
    ids = stream.read(int(windows[i]) * seq_len, int(windows[i]) * seq_len + seq_len)
    return (ids[byte_vocab.is_byte_id(ids)] - byte_vocab.BYTE_OFFSET).astype(np.uint8)
  return len(windows), window_unit


def eval_scored_count(data_config: Any, split: str, *, seq_len: int, batch_size: int,
                      max_batches: int = 0, batch_format: str = "causal_lm") -> int:
  """len(eval_scored_bytes(...)) with the same arguments (no max_bytes), without reading the bytes."""
  pipeline.check_batch_format(batch_format)
  if batch_format == "span_corruption":
    sizes, density, mean, stream, chunks = pipeline._span_eval_plan(
        data_config, split, seq_len, batch_size, max_batches)
    n = sizes.raw_length
    lengths = np.minimum(stream.num_bytes - chunks * n, n)
    full = span_corruption.span_counts(n, density, mean)[0]
    return int(sum(full if length == n else span_corruption.span_counts(int(length), density, mean)[0]
                   for length in lengths))
  stream, windows = pipeline._eval_plan(data_config, split, seq_len, batch_size, max_batches)
  if len(windows) == -(-len(stream) // seq_len):
    return stream.num_bytes
  return len(windows) * seq_len - stream.eos_count(windows * seq_len, seq_len)  # sampled windows are whole


def eval_scored_bytes(data_config: Any, split: str, *, seq_len: int, batch_size: int,
                      max_batches: int = 0, batch_format: str = "causal_lm", max_bytes: int = 0) -> bytes:
  """The bytes that eval_batches (same arguments) scores, in scoring order, concatenated.

  Exactly the weighted targets: the scored windows' targets in window order with the EOS
  separators dropped (they are not bytes and carry no weight), so len(result) equals the sum of
  the weights over eval_batches. For the whole split (max_batches = 0, or a cap that covers
  every window) that is b"".join(corpora.load_documents(split)); for a spread sample it is the
  sampled windows' bytes back to back. For "span_corruption" it is the scored chunks' noise bytes
  (the targets without sentinels and EOS) in scoring order. Compressor baselines compress this one
  string (data/compressors.py). Raises DataError for synthetic sources, which have no text.

  max_bytes > 0 bounds the result for compressors on huge splits: when the scored bytes are more, it
  returns the bytes of evenly spread blocks of consecutive scored windows (or chunks), each block
  about 1 MiB, at most max_bytes in all (at least one block).
  """
  pipeline.check_batch_format(batch_format)
  source = getattr(data_config, "source", "bundled")
  if source in corpora.SYNTHETIC_SOURCES:
    raise corpora.DataError(f"data.source {source!r} is synthetic: its eval targets are not text, so "
                            "there are no scored bytes to compress.")
  window = dict(seq_len=seq_len, batch_size=batch_size, max_batches=max_batches, batch_format=batch_format)
  total = eval_scored_count(data_config, split, **window)
  if batch_format == "causal_lm" and max_batches <= 0 and (max_bytes <= 0 or total <= max_bytes):
    stream = corpora.open_split(data_config, split)
    return stream.raw_bytes(0, stream.num_bytes).tobytes()  # the whole split in one read
  num_units, unit = _scored_units(data_config, split, **window)
  units = np.arange(num_units)
  if 0 < max_bytes < total:
    per_block = max(1, -(-_SAMPLE_BLOCK_BYTES * num_units // max(total, 1)))  # units per ~1 MiB block
    num_blocks = -(-num_units // per_block)
    keep = max(1, max_bytes * num_blocks // total)
    blocks = pipeline.eval_window_indices(num_blocks, 1, keep)
    units = (blocks[:, None] * per_block + np.arange(per_block)).reshape(-1)
    units = units[units < num_units]
  return b"".join(unit(int(i)).tobytes() for i in units)


_SAMPLE_BLOCK_BYTES = 1 << 20  # eval_scored_bytes(max_bytes=...) samples blocks of about this many bytes
