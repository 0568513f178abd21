"""Readers that stream the documents of one corpus file, for the byte store's build (data/corpora.py).

Each reader yields one document's bytes at a time and adds to a ReadCounts what it skipped, so no file
is ever read into memory whole (except by grain's ArrayRecord reader, one batch of records at a time).

* jsonl: one JSON object per line, the document is its string field `text_field`. Files ending in .gz
  are gunzipped, .zst / .zstd zstd-decompressed (the zstandard package) while they are read. Blank lines
  are ignored. A line whose field is missing, null or not a string is skipped and counted. A line that is
  not JSON stops the build with its file and line number. Raw bytes that are not UTF-8 are kept as they
  are (surrogateescape), and so are lone surrogates written as \\u escapes (surrogatepass): this is a
  byte model, so such documents are kept and counted, never dropped or repaired.
* parquet: column `text_field` of every row group (pyarrow), string or binary. Null cells are skipped
  and counted; a file without the column stops the build, naming the columns it has.
* array_record: every record of a grain ArrayRecord file is one document, its bytes as stored.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import zlib
from typing import Any, BinaryIO, Callable, Iterator

_CHUNK = 1 << 24  # bytes per read of a plain file
_RECORD_BATCH = 1024  # ArrayRecord records per read


class SourceError(ValueError):
  """A corpus file that cannot be read as its format, stated in one sentence."""


@dataclasses.dataclass
class ReadCounts:
  """What the readers read and skipped over a whole build (stored in the cache's meta.json)."""
  records: int = 0  # documents read (kept)
  skipped: int = 0  # records without usable text (missing field, null, not a string)
  first_skipped: str = ""  # "path:line" (or "path:row") of the first one
  non_utf8: int = 0  # documents kept as bytes although they are not valid UTF-8

  def skip(self, where: str) -> None:
    self.skipped += 1
    self.first_skipped = self.first_skipped or where


def file_chunks(path: str, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
  """The bytes [start, stop) of a plain file, in chunks of at most 16 MiB."""
  with open(path, "rb") as f:
    f.seek(start)
    left = None if stop is None else stop - start
    while left is None or left > 0:
      chunk = f.read(_CHUNK if left is None else min(_CHUNK, left))
      if not chunk:
        return
      if left is not None:
        left -= len(chunk)
      yield chunk


def _open_text_stream(path: str) -> BinaryIO:
  lower = path.lower()
  if lower.endswith(".gz"):
    return gzip.open(path, "rb")
  if lower.endswith((".zst", ".zstd")):
    try:
      import zstandard  # pylint: disable=import-outside-toplevel  # only zstd-compressed corpora need it
    except ImportError:
      raise SourceError(f"{path} is zstd-compressed; install the zstandard package "
                        "(pip install zstandard) to read it.") from None
    reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True, read_across_frames=True)
    return io.BufferedReader(reader, buffer_size=1 << 20)  # the zstd reader has no readline
  return open(path, "rb")


def _utf8(text: str, counts: ReadCounts) -> bytes:
  try:
    return text.encode("utf-8")
  except UnicodeEncodeError:  # raw non-UTF-8 bytes (surrogateescape) or an escaped lone surrogate
    counts.non_utf8 += 1
    try:
      return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
      return text.encode("utf-8", "surrogatepass")


def _decompression_errors() -> tuple[type[BaseException], ...]:
  errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
  try:
    import zstandard  # pylint: disable=import-outside-toplevel
    errors += (zstandard.ZstdError,)
  except ImportError:
    pass
  return errors


def jsonl_documents(path: str, text_field: str, counts: ReadCounts) -> Iterator[bytes]:
  line_number = 0
  try:
    with _open_text_stream(path) as f:
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line.decode("utf-8", "surrogateescape"))
        except ValueError as e:
          raise SourceError(f"{path}:{line_number} is not a JSON object ({e}).") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
          counts.skip(f"{path}:{line_number}")
          continue
        counts.records += 1
        yield _utf8(text, counts)
  except _decompression_errors() as e:
    raise SourceError(f"{path} is corrupt after line {line_number}: {e}.") from None


def parquet_documents(path: str, text_field: str, counts: ReadCounts) -> Iterator[bytes]:
  try:
    import pyarrow  # pylint: disable=import-outside-toplevel  # only parquet corpora need it
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SourceError(f"reading {path} needs pyarrow (pip install pyarrow).") from None
  try:
    table = pq.ParquetFile(path)
  except (pyarrow.ArrowException, OSError) as e:
    raise SourceError(f"{path} is not a readable parquet file: {e}.") from None
  columns = table.schema_arrow.names
  if text_field not in columns:
    raise SourceError(f"{path} has no column {text_field!r} (data.text_field); its columns are "
                      f"{', '.join(map(repr, columns))}.")
  kind = table.schema_arrow.field(text_field).type
  if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)
          or pyarrow.types.is_binary(kind) or pyarrow.types.is_large_binary(kind)):
    raise SourceError(f"column {text_field!r} of {path} holds {kind}, not text or bytes.")
  row = 0
  try:
    for batch in table.iter_batches(batch_size=4096, columns=[text_field]):
      for value in batch.column(0).to_pylist():
        row += 1
        if value is None:
          counts.skip(f"{path}:row {row}")
          continue
        counts.records += 1
        yield value.encode("utf-8") if isinstance(value, str) else bytes(value)
  except (pyarrow.ArrowException, OSError) as e:
    raise SourceError(f"{path} is corrupt after row {row}: {e}.") from None


def array_record_documents(path: str, text_field: str, counts: ReadCounts) -> Iterator[bytes]:
  del text_field  # a record is the document's bytes
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  try:
    reader = array_record_module.ArrayRecordReader(path)
  except (RuntimeError, OSError, ValueError) as e:
    raise SourceError(f"{path} is not a readable ArrayRecord file: {e}.") from None
  try:
    total = reader.num_records()
    for start in range(0, total, _RECORD_BATCH):
      for record in reader.read(start, min(start + _RECORD_BATCH, total)):
        counts.records += 1
        yield bytes(record)
  except (RuntimeError, OSError, ValueError) as e:
    raise SourceError(f"{path} is corrupt after record {counts.records}: {e}.") from None
  finally:
    reader.close()


# data.source -> reader(path, text_field, counts) of its record formats.
RECORD_READERS: dict[str, Callable[[str, str, ReadCounts], Iterator[bytes]]] = {
    "jsonl": jsonl_documents,
    "parquet": parquet_documents,
    "array_record": array_record_documents,
}


def describe_counts(counts: dict[str, Any], source: str, text_field: str) -> str:
  """One line about what a build skipped or kept as raw bytes ("" when nothing)."""
  parts = []
  if counts.get("skipped"):
    what = "lines" if source == "jsonl" else "rows"
    parts.append(f"skipped {counts['skipped']:,} of {counts['records'] + counts['skipped']:,} {what} without a "
                 f"string {text_field!r} (first at {counts['first_skipped']})")
  if counts.get("non_utf8"):
    parts.append(f"kept {counts['non_utf8']:,} documents that are not valid UTF-8 as raw bytes")
  return "; ".join(parts)
