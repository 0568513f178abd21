"""Text corpora as documents, split into train/valid/test and kept in an on-disk byte store.

A split is read as its id stream: each document's bytes then EOS_ID, concatenated. open_split returns it
as a data/store.py SplitStore, read by offset from a cache entry that is built once per source and split
rule by streaming the source file by file, so neither the build nor a reader holds the corpus in memory.

Sources (`config.data.source`):

* ``bundled``: the default corpus, present on any machine without downloads: the
  Python standard library's own ``*.py`` source files, found under
  ``sysconfig.get_paths()["stdlib"]`` of the running interpreter. Files under any
  directory named ``site-packages``, ``dist-packages``, ``test``, ``tests``,
  ``idlelib``, ``lib2to3`` or ``turtledemo`` are excluded; symlinked directories
  are not followed. Documents are ordered by their relative POSIX path (sorted).
  Each file goes whole to one split by a stable hash of that relative path,
  ``h = zlib.crc32(relpath.encode("utf-8")) % 100``: ``h < 90`` train,
  ``h < 95`` valid, otherwise test. The corpus therefore depends only on the
  Python version (3.12 has ~530 files, ~10 MB).
* ``files``: ``config.data.paths`` lists files, directories (searched
  recursively for regular files; hidden names starting with "." are skipped) and
  globs (``**`` allowed). Each file is one document, split by the same crc32
  90/5/5 rule applied to a relocation-stable key: for a directory entry the path
  relative to that directory, for a glob the path relative to the glob's
  leading non-wildcard directory, for a plain file its base name. Documents keep
  the order of the entries, sorted by key within each entry; a file matched
  twice is used once.
* ``single_file``: exactly one file, split contiguously (enwik8 style): the first
  90% of its bytes is train, the next 5% valid, the last 5% test; each split is
  one document.
* ``jsonl``, ``parquet``, ``array_record``: record files found as for ``files``
  (globs over many shards), read by data/sources.py: one document per JSON line
  (field ``data.text_field``; .gz and .zst files too), per parquet row (column
  ``data.text_field``) or per ArrayRecord record. Files are read in entry order,
  records in file order, and record i of the file with key k goes to a split by
  the crc32 rule on the key ``f"{k}:{i}"``, so even one shard yields all three
  splits.
* Named splits: ``config.data.split_paths.{train,valid,test}`` list the dataset's
  own files per split (entries as for ``data.paths``, which is then ignored), for
  ``files`` and the record sources. Every document of those files goes to that split.

* ``mqar`` (synthetic, no documents): multi-query associative recall sequences
  built on the fly by ``data/synthetic.py`` (options under ``data.mqar``);
  ``data/pipeline.py`` serves its batches, so it has no stream here.

Split ``all`` is every document of the source in source order (e.g. to evaluate a checkpoint on an
arbitrary text file); it is a cache entry of its own. ``config.data.max_corpus_bytes > 0`` truncates the
train split to that many bytes (documents in order, the last one cut) without rebuilding anything.

The cache: ``config.data.cache_dir``, else ``$BYTELAB_DATA_CACHE``, else ``~/.cache/bytelab/data``
(``$XDG_CACHE_HOME`` respected). An entry is named by the source and a hash of its key: the source, the
split rule, the text field and every input file's resolved path, size and modification time (not a hash
of the contents, which would read the whole corpus at every start; a changed file changes its size or
time). data/store.py rebuilds an entry that another store format wrote, saying so.
"""

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
import time
import zlib
from typing import Any, Sequence

from data import sources
from data import store as store_lib

SPLITS = ("train", "valid", "test", "all")
SOURCES = ("bundled", "files", "single_file", "jsonl", "parquet", "array_record")
RECORD_SOURCES = tuple(sources.RECORD_READERS)
SYNTHETIC_SOURCES = ("mqar",)  # generated batch by batch in data/pipeline.py, never read as text
_TRAIN_VALID_TEST = ("train", "valid", "test")
_PROGRESS_MIN_BYTES = 64 << 20  # builds of smaller sources take about a second: no build lines

_BUNDLED_EXCLUDED_DIRS = frozenset(
    ("site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"))

# (data options that name the corpus, split) -> the open SplitStore (file handles, no data).
_OPEN_SPLITS: dict[tuple[Any, ...], store_lib.SplitStore] = {}
# The cache entry behind train, valid and test: discovered, stat'ed and opened once per process.
_OPEN_ENTRIES: dict[tuple[Any, ...], tuple[Any, str, dict[str, Any]]] = {}


class DataError(ValueError):
  """A data configuration or corpus problem, stated in one sentence."""


def _split_of(key: str) -> str:
  """The split of a whole-file document, from a stable hash of its path key."""
  h = zlib.crc32(key.encode("utf-8")) % 100
  return "train" if h < 90 else ("valid" if h < 95 else "test")


def _bundled_files() -> list[tuple[str, str]]:
  """Returns sorted (relative posix path, absolute path) of the stdlib *.py files."""
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _BUNDLED_EXCLUDED_DIRS]
    for name in filenames:
      full = os.path.join(dirpath, name)
      if name.endswith(".py") and os.path.isfile(full):
        found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
  if not found:
    raise DataError(f"the bundled corpus found no *.py file under the standard library "
                    f"directory {root!r}.")
  return sorted(found)


def _has_magic(part: str) -> bool:
  return any(c in part for c in "*?[")


def _walk_files(root: str) -> list[str]:
  """All regular, non-hidden files under directory root, recursively."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    out.extend(os.path.join(dirpath, n) for n in filenames
               if not n.startswith(".") and os.path.isfile(os.path.join(dirpath, n)))
  return out


def _entry_files(entry: str) -> list[tuple[str, str]]:
  """Returns sorted (split key, path) for one data.paths entry ([] if no match)."""
  entry = os.path.expanduser(str(entry))
  if _has_magic(entry):
    parts = entry.replace(os.sep, "/").split("/")
    n = next(i for i, p in enumerate(parts) if _has_magic(p))
    base = "/".join(parts[:n]) or "."
    if entry.startswith("/") and n == 1:
      base = "/"
    paths = [p for p in glob.glob(entry, recursive=True) if os.path.isfile(p)]
    found = [(os.path.relpath(p, base), p) for p in paths]
  elif os.path.isdir(entry):
    found = [(os.path.relpath(p, entry), p) for p in _walk_files(entry)]
  elif os.path.isfile(entry):
    found = [(os.path.basename(entry), entry)]
  else:
    found = []
  return sorted((k.replace(os.sep, "/"), p) for k, p in found)


def _config_paths(data_config: Any) -> tuple[str, ...]:
  paths = getattr(data_config, "paths", ()) or ()
  if isinstance(paths, (str, os.PathLike)):  # a single path given on the command line
    paths = (paths,)
  return tuple(str(p) for p in paths)


def _named_split_paths(data_config: Any) -> dict[str, tuple[str, ...]]:
  """{split: entries} of data.split_paths ({} when it names nothing)."""
  named = getattr(data_config, "split_paths", None)
  out = {}
  for split in _TRAIN_VALID_TEST:
    entries = getattr(named, split, ()) if named is not None else ()
    if isinstance(entries, (str, os.PathLike)):
      entries = (entries,)
    out[split] = tuple(str(p) for p in entries or ())
  return out if any(out.values()) else {}


@dataclasses.dataclass(frozen=True)
class _File:
  key: str  # the split key (module docstring)
  path: str
  split: str | None  # the named split of every document in it, or None: split by the crc32 rule


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What one cache entry is built from: the files in order and how their documents are split."""
  source: str
  splits: tuple[str, ...]  # ("train", "valid", "test") or ("all",)
  files: tuple[_File, ...]
  text_field: str
  rule: str  # how documents get their split (part of the cache key)

  def key(self) -> dict[str, Any]:
    stats = [os.stat(f.path) for f in self.files]
    return {"source": self.source, "splits": list(self.splits), "rule": self.rule,
            "text_field": self.text_field if self.source in RECORD_SOURCES else "",
            "files": [[f.key, os.path.realpath(f.path), f.split, st.st_size, st.st_mtime_ns]
                      for f, st in zip(self.files, stats)]}


def _discover(entries: Sequence[str], split: str | None, seen: set[str], setting: str) -> list[_File]:
  found = []
  for entry in entries:
    files = _entry_files(entry)
    if not files:
      raise DataError(f"{setting} entry {entry!r} matches no file.")
    for key, path in files:
      real = os.path.realpath(path)
      if real not in seen:
        seen.add(real)
        found.append(_File(key, path, split))
  return found


def _plan(data_config: Any, split: str) -> _Plan:
  source = getattr(data_config, "source", "bundled")
  if source in SYNTHETIC_SOURCES:
    raise DataError(f"data.source {source!r} is synthetic: it has batches (data/pipeline.py), not "
                    "documents or a byte stream.")
  if source not in SOURCES:
    raise DataError(f"unknown data.source {source!r}; expected one of "
                    f"{', '.join(SOURCES + SYNTHETIC_SOURCES)}.")
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
  splits = ("all",) if split == "all" else _TRAIN_VALID_TEST
  text_field = str(getattr(data_config, "text_field", "text") or "text")
  named = _named_split_paths(data_config)
  if named and source in ("bundled", "single_file"):
    raise DataError(f"data.split_paths names files per split, which data.source={source!r} does not take; "
                    "use data.source='files' or a record source (jsonl, parquet, array_record).")
  if source == "bundled":
    files = [_File(key, path, None) for key, path in _bundled_files()]
    return _Plan(source, splits, tuple(files), text_field, "crc32 90/5/5 of the relative path")
  if named:
    seen: set[str] = set()
    files = [f for s in _TRAIN_VALID_TEST
             for f in _discover(named[s], s, seen, f"data.split_paths.{s}")]
    return _Plan(source, splits, tuple(files), text_field, "named split files")
  paths = _config_paths(data_config)
  if source == "single_file":
    if len(paths) != 1:
      raise DataError(f"data.source='single_file' needs exactly one path in data.paths, "
                      f"got {len(paths)}.")
    path = os.path.expanduser(paths[0])
    if not os.path.isfile(path):
      raise DataError(f"data.paths entry {paths[0]!r} is not a file.")
    return _Plan(source, splits, (_File(os.path.basename(path), path, None),), text_field,
                 "contiguous 90/5/5 of the bytes")
  if not paths:
    raise DataError(f"data.paths is empty; data.source={source!r} needs at least one file, "
                    "directory or glob.")
  rule = "crc32 90/5/5 of the file key" if source == "files" else "crc32 90/5/5 of file key:record index"
  return _Plan(source, splits, tuple(_discover(paths, None, set(), "data.paths")), text_field, rule)


def cache_root(data_config: Any) -> str:
  """The directory that holds the byte-store cache entries (module docstring)."""
  configured = str(getattr(data_config, "cache_dir", "") or "") or os.environ.get("BYTELAB_DATA_CACHE", "")
  if configured:
    return os.path.abspath(os.path.expanduser(configured))
  return user_cache_dir("data")


def user_cache_dir(kind: str) -> str:
  """bytelab's per-user cache directory for `kind`: $XDG_CACHE_HOME/bytelab/<kind>, else
  ~/.cache/bytelab/<kind> (the byte-store cache here, XLA's compilation cache in training/runtime.py)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "bytelab", kind)


def _entry_directory(data_config: Any, plan: _Plan, key: dict[str, Any]) -> str:
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  return os.path.join(cache_root(data_config), f"{plan.source}-{'all' if plan.splits == ('all',) else 'tvt'}-{digest}")


def _document_split(plan: _Plan, f: _File, key: str) -> str | None:
  """The split that a document of file f with split key `key` goes to (None: not in this entry)."""
  if plan.splits == ("all",):
    return "all"
  return f.split or _split_of(key)


def _build(plan: _Plan, sizes: list[int], writer: store_lib.StoreWriter, progress: Any) -> dict[str, Any]:
  """Streams every document of the plan (files of `sizes` bytes) into the writer; returns meta.json's stats."""
  files_per_split = dict.fromkeys(plan.splits, 0)
  counts = sources.ReadCounts()
  if plan.source == "single_file":
    (f,) = plan.files
    (size,) = sizes
    a, b = size * 90 // 100, size * 95 // 100
    ranges = {"all": (0, size)} if plan.splits == ("all",) else {
        "train": (0, a), "valid": (a, b), "test": (b, size)}
    for split, (start, stop) in ranges.items():
      for chunk in sources.file_chunks(f.path, start, stop):
        writer.write(split, chunk)
        progress.update(len(chunk))
      writer.end_document(split)
      files_per_split[split] = 1
    return {"stats": {"files": 1, "files_per_split": files_per_split, "bytes_in": size}}
  reader = sources.RECORD_READERS.get(plan.source)
  for f, size in zip(plan.files, sizes):
    if reader is None:  # bundled / files: the whole file is one document
      split = _document_split(plan, f, f.key)
      if split in files_per_split:
        for chunk in sources.file_chunks(f.path):
          writer.write(split, chunk)
        writer.end_document(split)
        files_per_split[split] += 1
    else:
      try:
        for index, document in enumerate(reader(f.path, plan.text_field, counts)):
          writer.add_document(_document_split(plan, f, f"{f.key}:{index}"), document)
      except sources.SourceError as e:
        raise DataError(str(e)) from None
    progress.update(size)
  return {"stats": {"files": len(plan.files), "files_per_split": files_per_split,
                    "bytes_in": sum(sizes), **dataclasses.asdict(counts)}}


def _progress(total: int, desc: str, enabled: bool) -> Any:
  # training/metrics.py owns the project's progress lines (tqdm on a terminal, plain lines in logs).
  from training import metrics  # pylint: disable=import-outside-toplevel
  return metrics.progress(total=total, unit="B", desc=desc, enabled=enabled)


def _open_entry(data_config: Any, plan: _Plan, show_progress: bool) -> tuple[str, dict[str, Any]]:
  key = plan.key()
  directory = _entry_directory(data_config, plan, key)
  built = []
  sizes = [size for *_, size, _ in key["files"]]  # stat once: the key holds every file's size
  total = sum(sizes)
  verbose = show_progress and total >= _PROGRESS_MIN_BYTES  # small sources build in about a second

  def build(writer: store_lib.StoreWriter) -> dict[str, Any]:
    if verbose:
      store_lib.log(f"building the byte cache of data.source={plan.source!r} ({len(plan.files):,} file(s), "
                    f"{total / 1e6:,.1f} MB) in {directory}")
    started = time.monotonic()
    with _progress(total, f"cache {plan.source}", verbose) as bar:
      stats = _build(plan, sizes, writer, bar)
    built.append(time.monotonic() - started)
    return stats

  meta = store_lib.open_entry(directory, key, plan.splits, build)
  if built and verbose:
    splits = ", ".join(f"{s} {c['ids'] - c['documents']:,} bytes / {c['documents']:,} documents"
                       for s, c in meta["splits"].items())
    mb_per_s = meta["stats"]["bytes_in"] / 1e6 / max(built[0], 1e-9)
    store_lib.log(f"built the byte cache in {built[0]:.1f} s ({mb_per_s:,.0f} MB/s): {splits}")
  skipped = sources.describe_counts(meta["stats"], plan.source, plan.text_field)
  if built and skipped:  # always said, whatever the size
    store_lib.log(f"data.source={plan.source!r}: {skipped}.")
  return directory, meta


def _empty_hint(plan: _Plan, meta: dict[str, Any], split: str) -> str:
  stats = meta.get("stats", {})
  total = stats.get("files", 0)
  if plan.rule == "named split files":
    return f"data.split_paths.{split} names no file with text" if split != "all" else "the files are empty"
  if plan.source == "single_file":
    return f"the file {plan.files[0].path!r} has only {stats.get('bytes_in', 0)} bytes"
  if plan.source == "files":
    if all(c["ids"] == c["documents"] for c in meta["splits"].values()):
      return f"every file that data.paths names is empty ({total} file(s))"
    landed = stats.get("files_per_split", {}).get(split, 0)
    return (f"{landed} of the {total} file(s) landed in it (each file goes whole to one split by a hash of "
            "its path), so add more files or use data.source='single_file'")
  if plan.source in RECORD_SOURCES:
    read = stats.get("records", 0)
    skipped = sources.describe_counts(stats, plan.source, plan.text_field)
    return f"{meta['splits'][split]['documents']} of the {read} records landed in it" + (
        f" ({skipped})" if skipped else "")
  return "the corpus has no text for it"


def _signature(data_config: Any, split: str) -> tuple[Any, ...]:
  """The data options that name a split's corpus (the in-process memo key)."""
  named = _named_split_paths(data_config)
  return (getattr(data_config, "source", "bundled"),
          tuple(os.path.abspath(os.path.expanduser(p)) for p in _config_paths(data_config)),
          tuple((s, tuple(os.path.abspath(os.path.expanduser(p)) for p in v)) for s, v in named.items()),
          str(getattr(data_config, "text_field", "text")), cache_root(data_config), split,
          int(getattr(data_config, "max_corpus_bytes", 0) or 0) if split == "train" else 0)


def open_split(data_config: Any, split: str, *, show_progress: bool = True) -> store_lib.SplitStore:
  """The split's id stream (module docstring) as an open SplitStore, building its cache if needed.

  Memoised per process; raises DataError when the split has no bytes.
  """
  signature = _signature(data_config, split)
  if signature not in _OPEN_SPLITS:
    entry = (*signature[:-2], split == "all")
    if split not in SPLITS or entry not in _OPEN_ENTRIES:
      plan = _plan(data_config, split)
      _OPEN_ENTRIES[entry] = (plan, *_open_entry(data_config, plan, show_progress))
    plan, directory, meta = _OPEN_ENTRIES[entry]
    cap = signature[-1]
    opened = store_lib.SplitStore(directory, split, max_bytes=cap)
    if opened.num_bytes == 0:
      raise DataError(f"the {split!r} split of data source {plan.source!r} is empty (0 bytes); "
                      + _empty_hint(plan, meta, split) + ".")
    _OPEN_SPLITS[signature] = opened
  return _OPEN_SPLITS[signature]


def forget_opened() -> None:
  """Drops the in-process memo of opened splits and entries (as a new process would start)."""
  _OPEN_SPLITS.clear()
  _OPEN_ENTRIES.clear()


def prepare(data_config: Any, splits: Sequence[str] = _TRAIN_VALID_TEST, *, show_progress: bool = True) -> None:
  """Builds (or finds) the cache entries of `splits`, e.g. on one process before the others open them."""
  if getattr(data_config, "source", "bundled") in SYNTHETIC_SOURCES:
    return
  for split in splits:
    open_split(data_config, split, show_progress=show_progress)


def load_documents(data_config: Any, split: str) -> list[bytes]:
  """The documents (raw bytes) of one split, in order; reads them all into memory (small corpora, tests)."""
  return list(open_split(data_config, split).documents())
