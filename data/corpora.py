"""Text corpora as documents (bytes) and as id streams, split into train/valid/test.

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

* ``mqar`` (synthetic, no documents): multi-query associative recall sequences
  built on the fly by ``data/synthetic.py`` (options under ``data.mqar``);
  ``data/pipeline.py`` serves its batches, so it has no stream here.

Split ``all`` is every document of the source (e.g. to evaluate a checkpoint on
an arbitrary text file). ``config.data.max_corpus_bytes > 0`` truncates the train
split to that many bytes (documents in order, the last one cut).
"""

import glob
import os
import sysconfig
import zlib
from typing import Any, Sequence

import numpy as np

from data import bytes as byte_vocab

SPLITS = ("train", "valid", "test", "all")
SOURCES = ("bundled", "files", "single_file")
SYNTHETIC_SOURCES = ("mqar",)  # generated batch by batch in data/pipeline.py, never read as text

_BUNDLED_EXCLUDED_DIRS = frozenset(
    ("site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"))

# (source, paths, split, cap) -> read-only int32 stream; the bundled corpus is ~10 MB.
_STREAM_CACHE: dict[tuple[Any, ...], np.ndarray] = {}


class DataError(ValueError):
  """A data configuration or corpus problem, stated in one sentence."""


def _split_of(key: str) -> str:
  """The split of a whole-file document, from a stable hash of its path key."""
  h = zlib.crc32(key.encode("utf-8")) % 100
  return "train" if h < 90 else ("valid" if h < 95 else "test")


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


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


def _files_documents(paths: Sequence[str]) -> list[tuple[str, bytes]]:
  """Returns (split key, contents) of every file that the entries name, in order."""
  if not paths:
    raise DataError("data.paths is empty; data.source='files' needs at least one file, "
                    "directory or glob.")
  seen, docs = set(), []
  for entry in paths:
    files = _entry_files(entry)
    if not files:
      raise DataError(f"data.paths entry {entry!r} matches no file.")
    for key, path in files:
      real = os.path.realpath(path)
      if real not in seen:
        seen.add(real)
        docs.append((key, _read(path)))
  return docs


def _single_file_splits(paths: Sequence[str]) -> dict[str, bytes]:
  if len(paths) != 1:
    raise DataError(f"data.source='single_file' needs exactly one path in data.paths, "
                    f"got {len(paths)}.")
  path = os.path.expanduser(paths[0])
  if not os.path.isfile(path):
    raise DataError(f"data.paths entry {paths[0]!r} is not a file.")
  text = _read(path)
  a, b = len(text) * 90 // 100, len(text) * 95 // 100
  return {"train": text[:a], "valid": text[a:b], "test": text[b:], "all": text}


def _cap(docs: list[bytes], max_bytes: int) -> list[bytes]:
  """Keeps the first max_bytes bytes of the documents, in order."""
  out, left = [], max_bytes
  for doc in docs:
    if left <= 0:
      break
    out.append(doc[:left])
    left -= len(out[-1])
  return out


def load_documents(data_config: Any, split: str) -> list[bytes]:
  """Returns the documents (raw bytes) of one split, in a deterministic order."""
  source = getattr(data_config, "source", "bundled")
  if source in SYNTHETIC_SOURCES:
    raise DataError(f"data.source {source!r} is synthetic: it has batches (data/pipeline.py), not "
                    "documents or a byte stream.")
  if source not in SOURCES:
    raise DataError(f"unknown data.source {source!r}; expected one of "
                    f"{', '.join(SOURCES + SYNTHETIC_SOURCES)}.")
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
  paths = _config_paths(data_config)
  hint = ""
  if source == "bundled":
    files = _bundled_files()
    docs = [_read(p) for key, p in files if split == "all" or _split_of(key) == split]
  elif source == "files":
    keyed = _files_documents(paths)
    docs = [d for key, d in keyed if split == "all" or _split_of(key) == split]
    hint = (f"{len(docs)} of the {len(keyed)} file(s) landed in it (each file goes whole to "
            "one split by a hash of its path), so add more files or use "
            "data.source='single_file'")
    if not any(d for _, d in keyed):
      hint = f"every file that data.paths names is empty ({len(keyed)} file(s))"
  else:
    splits = _single_file_splits(paths)
    docs = [splits[split]]
    hint = f"the file {paths[0]!r} has only {len(splits['all'])} bytes"
  max_bytes = int(getattr(data_config, "max_corpus_bytes", 0) or 0)
  if split == "train" and max_bytes > 0:
    docs = _cap(docs, max_bytes)
  if sum(len(d) for d in docs) == 0:
    raise DataError(f"the {split!r} split of data source {source!r} is empty (0 bytes); "
                    + (hint or "the corpus has no text for it") + ".")
  return docs


def load_stream(data_config: Any, split: str) -> np.ndarray:
  """Returns the split as int32 ids [n]: each document's bytes then EOS_ID, concatenated.

  Cached per (source, paths, split, cap); the returned array is read-only.
  """
  source = getattr(data_config, "source", "bundled")
  paths = tuple(os.path.abspath(os.path.expanduser(p)) for p in _config_paths(data_config))
  cap = int(getattr(data_config, "max_corpus_bytes", 0) or 0)
  key = (source, paths if source != "bundled" else (), split, cap if split == "train" else 0)
  if key not in _STREAM_CACHE:
    docs = load_documents(data_config, split)
    stream = np.empty(sum(len(d) + 1 for d in docs), np.int32)
    start = 0
    for doc in docs:
      stream[start:start + len(doc)] = byte_vocab.encode(doc)
      stream[start + len(doc)] = byte_vocab.EOS_ID
      start += len(doc) + 1
    stream.flags.writeable = False  # shared by every caller through the cache
    _STREAM_CACHE[key] = stream
  return _STREAM_CACHE[key]
