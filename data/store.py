"""On-disk byte store: a corpus split's id stream as a uint8 file and a document index.

A split's id stream (data/corpora.py) is each document's bytes then EOS_ID, concatenated: n ids for d
documents and n - d bytes. The store keeps it in two files of one cache entry directory:

  <split>.bytes    uint8 [n]: position s holds byte value id - BYTE_OFFSET; 0 where the id is EOS
  <split>.eos.npy  int64 [d]: the sorted stream positions of the d EOS ids (document i ends at eos[i])

so stream id s is EOS_ID if s is in eos, else bytes[s] + BYTE_OFFSET. One extra byte per document keeps
stream positions and file offsets equal, so a window of the stream is one contiguous range of the file.

Readers hold none of the corpus: windows are read by offset (os.pread) through the kernel's page cache,
which all processes on a host share and which the kernel can always reclaim, and the eos index is
memory-mapped (8 bytes per document). Memory is O(1) in the corpus size. The bytes are deliberately not
memory-mapped: mapped pages count in the process's RSS and stay mapped as an epoch touches them all, so a
long run over a corpus larger than RAM would look like a leak (and count against container limits).
pread of random 1025-byte windows is also ~4x faster than gathering them from a numpy memmap here.

Why not grain's ArrayRecord: its unit is a record, while training windows start at any byte and cross
documents. Cutting them from ArrayRecord means reading and joining whole records per window;
benchmarks/data.py measures both layouts.

An entry is written by StoreWriter into a temporary sibling directory and renamed into place, so a
crashed or concurrent build never leaves a half-written entry visible. Its meta.json records
FORMAT_VERSION, the key it was built for and per-split counts. open_entry reuses an entry only when all
of them match and the files have the recorded sizes; anything else is rebuilt, with one line saying why.
"""

from __future__ import annotations

import array
import json
import os
import shutil
import sys
import uuid
from typing import Any, Callable, Iterator

import numpy as np

from data import bytes as byte_vocab

FORMAT_VERSION = 1
_META = "meta.json"


def log(message: str) -> None:
  """One line on stderr (the data modules' build and rebuild messages)."""
  print(message, file=sys.stderr, flush=True)


class SplitStore:
  """A read-only view of one split's id stream (module docstring), optionally cut to its first bytes.

  Picklable (it reopens its files), so grain worker processes can read windows from it.
  """

  def __init__(self, directory: str, split: str, max_bytes: int = 0):
    self.directory, self.split, self.max_bytes = directory, split, int(max_bytes)
    self._open()

  def _open(self) -> None:
    path = os.path.join(self.directory, split_file(self.split, "bytes"))
    self._fd = os.open(path, os.O_RDONLY)
    size = os.fstat(self._fd).st_size
    eos = np.asarray(np.load(os.path.join(self.directory, split_file(self.split, "eos.npy")), mmap_mode="r"))
    self._raw_ends = None  # raw byte offsets of the document ends, built on first raw_bytes
    num_ids = size
    if self.max_bytes > 0 and len(eos) and int(eos[-1]) + 1 - len(eos) > self.max_bytes:
      # Keep the first max_bytes bytes: documents in order, the last one cut and closed by an EOS at the cut.
      raw_ends = np.asarray(eos) - np.arange(len(eos))
      last = int(np.searchsorted(raw_ends, self.max_bytes, "left"))  # the document holding byte max_bytes - 1
      cut = self.max_bytes + last  # stream position right after that byte
      eos = np.concatenate([np.asarray(eos[:last]), np.array([cut], np.int64)])
      num_ids = cut + 1
    self._eos = eos
    self.num_ids = int(num_ids)
    self.num_documents = int(len(eos))
    self.num_bytes = self.num_ids - self.num_documents

  def __del__(self) -> None:
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)
      self._fd = None

  def _pread(self, start: int, count: int) -> np.ndarray:
    """uint8 [count]: the file's bytes [start, start + count), all inside the stream."""
    data = os.pread(self._fd, count, start)
    if len(data) != count:
      raise OSError(f"{self.directory}: read {len(data)} of {count} bytes at offset {start}; the cache file "
                    "was changed or truncated while open.")
    return np.frombuffer(data, np.uint8)

  def __getstate__(self) -> dict[str, Any]:
    return {"directory": self.directory, "split": self.split, "max_bytes": self.max_bytes}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return self.num_ids

  def _set_eos(self, ids: np.ndarray, starts: np.ndarray, length: int) -> None:
    """Writes EOS_ID into ids [b, length], row r holding stream positions starts[r] + [0, length)."""
    lo = np.searchsorted(self._eos, starts, "left")
    hi = np.searchsorted(self._eos, starts + length, "left")
    counts = hi - lo
    total = int(counts.sum())
    if total == 0:
      return
    rows = np.repeat(np.arange(len(starts)), counts)
    first = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    positions = np.asarray(self._eos[np.arange(total) + first])
    ids[rows, positions - starts[rows]] = byte_vocab.EOS_ID

  def windows(self, starts: Any, length: int) -> np.ndarray:
    """int32 ids [b, length]: row r is the stream ids [starts[r], starts[r] + length), all in range."""
    starts = np.asarray(starts, np.int64).reshape(-1)
    if len(starts) and (starts.min() < 0 or starts.max() + length > self.num_ids):
      raise IndexError(f"windows of {length} ids from {starts.min()}..{starts.max()} leave the "
                       f"{self.num_ids}-id stream.")
    ids = np.empty((len(starts), length), np.int32)
    for row, start in enumerate(starts):
      ids[row] = self._pread(int(start), length)
    ids += byte_vocab.BYTE_OFFSET
    self._set_eos(ids, starts, length)
    return ids

  def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
    """int32 ids [stop - start] of the stream range [start, stop) (clipped to the stream)."""
    stop = self.num_ids if stop is None else min(int(stop), self.num_ids)
    start = min(max(int(start), 0), stop)
    return self.windows([start], stop - start)[0]

  def _raw_to_stream(self, raw: np.ndarray) -> np.ndarray:
    """Stream positions of raw byte offsets (the byte stream without EOS ids)."""
    if self._raw_ends is None:
      self._raw_ends = np.asarray(self._eos) - np.arange(self.num_documents)  # raw offset after document i
    return raw + np.searchsorted(self._raw_ends, raw, "right")

  def raw_bytes(self, start: int, stop: int) -> np.ndarray:
    """uint8 byte values [stop - start] of raw offsets [start, stop) of the split's bytes, EOS ids dropped."""
    stop = min(int(stop), self.num_bytes)
    start = min(max(int(start), 0), stop)
    if stop == start:
      return np.zeros(0, np.uint8)
    first, last = (int(p) for p in self._raw_to_stream(np.array([start, stop - 1])))
    eos = self._eos[np.searchsorted(self._eos, first):np.searchsorted(self._eos, last)]
    return np.delete(self._pread(first, last + 1 - first), eos - first)

  def eos_count(self, starts: Any, length: int) -> int:
    """How many EOS ids the stream ranges [starts[r], starts[r] + length) hold, in total."""
    starts = np.asarray(starts, np.int64).reshape(-1)
    return int((np.searchsorted(self._eos, starts + length) - np.searchsorted(self._eos, starts)).sum())

  def documents(self) -> Iterator[bytes]:
    """Each document's bytes, in order (reads the whole split: for small corpora and tests)."""
    start = 0
    for end in np.asarray(self._eos):
      yield self._pread(start, int(end) - start).tobytes()
      start = int(end) + 1


def split_file(split: str, suffix: str) -> str:
  return f"{split}.{suffix}"


class StoreWriter:
  """Streams documents of several splits into a new entry directory (temporary until commit)."""

  def __init__(self, directory: str, splits: tuple[str, ...]):
    self.directory = directory
    self.splits = splits
    self._tmp = f"{directory}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(self._tmp)
    self._files = {s: open(os.path.join(self._tmp, split_file(s, "bytes")), "wb", buffering=1 << 22)
                   for s in splits}
    self._eos = {s: array.array("q") for s in splits}
    self._length = dict.fromkeys(splits, 0)

  def write(self, split: str, chunk: bytes) -> None:
    """Appends bytes to the current document of `split`."""
    self._files[split].write(chunk)
    self._length[split] += len(chunk)

  def end_document(self, split: str) -> None:
    self._eos[split].append(self._length[split])
    self._files[split].write(b"\0")
    self._length[split] += 1

  def add_document(self, split: str, document: bytes) -> None:
    self.write(split, document)
    self.end_document(split)

  def counts(self) -> dict[str, dict[str, int]]:
    return {s: {"ids": self._length[s], "documents": len(self._eos[s])} for s in self.splits}

  def commit(self, meta: dict[str, Any], keep_existing: Callable[[], bool] = lambda: False) -> None:
    """Writes meta.json and renames the entry into place.

    An entry already at the destination is replaced, unless keep_existing() says it is good (a
    concurrent build finished first): then this build is discarded.
    """
    for split, f in self._files.items():
      f.close()
      np.save(os.path.join(self._tmp, split_file(split, "eos.npy")),
              np.frombuffer(self._eos[split], np.int64) if self._eos[split] else np.zeros(0, np.int64))
    meta = {"format_version": FORMAT_VERSION, **meta, "splits": self.counts()}
    with open(os.path.join(self._tmp, _META), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    stale = None
    if os.path.exists(self.directory):
      if keep_existing():
        shutil.rmtree(self._tmp, ignore_errors=True)
        return
      stale = f"{self.directory}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
      os.replace(self.directory, stale)
    try:
      os.rename(self._tmp, self.directory)
    except OSError:  # a concurrent build committed first: keep theirs
      shutil.rmtree(self._tmp, ignore_errors=True)
    if stale:
      shutil.rmtree(stale, ignore_errors=True)

  def abort(self) -> None:
    for f in self._files.values():
      f.close()
    shutil.rmtree(self._tmp, ignore_errors=True)


def read_meta(directory: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(directory, _META)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _stale_reason(directory: str, key: dict[str, Any], splits: tuple[str, ...]) -> str | None:
  """Why the entry at `directory` cannot be reused (None when it can)."""
  meta = read_meta(directory)
  if meta is None:
    return "it has no readable meta.json"
  if meta.get("format_version") != FORMAT_VERSION:
    return (f"it was written by byte-store format {meta.get('format_version')} and this code reads format "
            f"{FORMAT_VERSION}")
  if meta.get("key") != key:
    return "it was built for another source or split rule"
  for split in splits:
    counts = meta.get("splits", {}).get(split)
    path = os.path.join(directory, split_file(split, "bytes"))
    if counts is None or not os.path.exists(path) or os.path.getsize(path) != counts["ids"]:
      return f"its {split} files are missing or have the wrong size"
  return None


def open_entry(directory: str, key: dict[str, Any], splits: tuple[str, ...],
               build: Callable[[StoreWriter], dict[str, Any]]) -> dict[str, Any]:
  """Returns the meta of the entry at `directory`, building it first when it is absent or stale.

  `build(writer)` streams every document of `splits` into the writer and returns extra fields for
  meta.json (e.g. counts of skipped records); an exception aborts the build and leaves no entry.
  """
  if os.path.exists(directory):
    reason = _stale_reason(directory, key, splits)
    if reason is None:
      return read_meta(directory)
    log(f"the byte cache {directory} is not reused because {reason}; rebuilding it.")
  os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
  writer = StoreWriter(directory, splits)
  try:
    extra = build(writer)
    writer.commit({"key": key, **extra}, keep_existing=lambda: _stale_reason(directory, key, splits) is None)
  except BaseException:
    writer.abort()
    raise
  return read_meta(directory)
