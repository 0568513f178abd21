"""Tests for data/corpora.py."""

import shutil
import zlib

import numpy as np
import pytest

from configs import base
from data import bytes as byte_vocab
from data import corpora


def _cfg(**overrides):
  cfg = base.get_config().data
  cfg.update(overrides)
  return cfg


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
  return path


def _split_of(key):
  h = zlib.crc32(key.encode("utf-8")) % 100
  return "train" if h < 90 else ("valid" if h < 95 else "test")


def _many_files(root, n=200):
  for i in range(n):
    _write(root / f"sub{i % 3}" / f"doc{i:03d}.txt", f"document {i}\n" * (i % 5 + 1))
  return root


def test_single_file_splits_90_5_5(tmp_path):
  f = _write(tmp_path / "big.txt", bytes(range(256)) * 4 + b"x" * 976)  # 2000 bytes
  cfg = _cfg(source="single_file", paths=(str(f),))
  docs = {s: corpora.load_documents(cfg, s) for s in corpora.SPLITS}
  assert [len(docs[s]) for s in corpora.SPLITS] == [1, 1, 1, 1]
  assert [len(docs[s][0]) for s in ("train", "valid", "test", "all")] == [1800, 100, 100, 2000]
  assert docs["train"][0] + docs["valid"][0] + docs["test"][0] == f.read_bytes()
  stream = corpora.open_split(cfg, "valid").read()
  assert stream.dtype == np.int32 and stream.shape == (101,)
  assert stream[-1] == byte_vocab.EOS_ID
  np.testing.assert_array_equal(stream[:-1], byte_vocab.encode(docs["valid"][0]))


def test_files_dir_and_glob(tmp_path):
  root = _many_files(tmp_path / "corpus")
  _write(root / ".hidden" / "x.txt", "skipped")
  _write(root / ".dotfile", "skipped")
  cfg = _cfg(source="files", paths=(str(root),))
  all_docs = corpora.load_documents(cfg, "all")
  assert len(all_docs) == 200 and not any(b"skipped" in d for d in all_docs)
  split_docs = {s: corpora.load_documents(cfg, s) for s in ("train", "valid", "test")}
  assert sorted(sum(split_docs.values(), [])) == sorted(all_docs)
  # The split follows the crc32 of the path relative to the directory entry.
  expected_valid = sum(_split_of(f"sub{i % 3}/doc{i:03d}.txt") == "valid" for i in range(200))
  assert len(split_docs["valid"]) == expected_valid > 0
  assert corpora.load_documents(cfg, "train") == split_docs["train"]  # deterministic
  # Relocating the corpus (and using a glob) keeps every file in its split.
  moved = shutil.copytree(root, tmp_path / "elsewhere" / "copy")
  glob_cfg = _cfg(source="files", paths=(str(moved / "**" / "*.txt"),))
  assert corpora.load_documents(glob_cfg, "valid") == split_docs["valid"]
  # Globs and files mix; a file matched twice counts once.
  sub0 = root / "sub0"
  mixed = _cfg(source="files", paths=(str(sub0 / "*.txt"), str(sub0 / "doc000.txt")))
  assert len(corpora.load_documents(mixed, "all")) == len(list(sub0.glob("*.txt")))


def test_max_corpus_bytes_caps_train_only(tmp_path):
  f = _write(tmp_path / "big.txt", "abcdefghij" * 100)
  cfg = _cfg(source="single_file", paths=(str(f),), max_corpus_bytes=123)
  assert corpora.load_documents(cfg, "train") == [b"abcdefghij" * 12 + b"abc"]
  assert len(corpora.load_documents(cfg, "valid")[0]) == 50
  assert corpora.open_split(cfg, "train").read().shape == (124,)


def test_open_split_is_memoised_and_reads_are_copies(tmp_path):
  root = _many_files(tmp_path / "c", n=30)
  cfg = _cfg(source="files", paths=(str(root),))
  opened = corpora.open_split(cfg, "all")
  assert corpora.open_split(cfg, "all") is opened
  stream = opened.read()
  stream[:] = 0  # the caller's own array: the cache is unchanged
  stream = opened.read()
  assert stream.min() > 0
  docs = corpora.load_documents(cfg, "all")
  assert len(stream) == sum(len(d) + 1 for d in docs)
  assert int((stream == byte_vocab.EOS_ID).sum()) == len(docs)


@pytest.mark.parametrize("overrides, split, message", [
    (dict(source="files", paths=("{tmp}/nothing/*.txt",)), "train", "matches no file"),
    (dict(source="files", paths=("{tmp}/missing.txt",)), "train", "matches no file"),
    (dict(source="files", paths=()), "train", "data.paths is empty"),
    (dict(source="single_file", paths=()), "train", "exactly one path"),
    (dict(source="single_file", paths=("{tmp}/empty.txt",)), "valid", "is empty (0 bytes)"),
    (dict(source="wiki"), "train", "unknown data.source 'wiki'"),
    (dict(source="bundled"), "dev", "unknown split 'dev'"),
])
def test_data_errors_are_clear(tmp_path, overrides, split, message):
  _write(tmp_path / "empty.txt", b"")
  (tmp_path / "nothing").mkdir()
  overrides = dict(overrides)
  if "paths" in overrides:
    overrides["paths"] = tuple(p.format(tmp=tmp_path) for p in overrides["paths"])
  with pytest.raises(corpora.DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
    corpora.load_documents(_cfg(**overrides), split)
  text = str(e.value)
  assert text.count(". ") == 0 and text.endswith(".")  # one sentence
  for p in overrides.get("paths", ())[:1]:
    if "matches no file" in message:
      assert repr(p) in text


def test_empty_split_of_files_source(tmp_path):
  name = next(f"f{i}.txt" for i in range(1000) if _split_of(f"f{i}.txt") == "train")
  cfg = _cfg(source="files", paths=(str(_write(tmp_path / name, "hello")),))
  assert corpora.load_documents(cfg, "train") == [b"hello"]
  with pytest.raises(corpora.DataError, match=r"the 'valid' split of data source 'files' is empty"):
    corpora.open_split(cfg, "valid")


def test_bundled_corpus():
  cfg = _cfg(source="bundled")
  docs = {s: corpora.load_documents(cfg, s) for s in corpora.SPLITS}
  counts = {s: len(d) for s, d in docs.items()}
  assert all(counts[s] > 0 for s in ("train", "valid", "test"))
  assert counts["train"] + counts["valid"] + counts["test"] == counts["all"] > 100
  assert 0.8 < counts["train"] / counts["all"] < 0.97
  assert 0.01 < counts["valid"] / counts["all"] < 0.1
  assert 0.01 < counts["test"] / counts["all"] < 0.1
  # Disjoint and complete: the three splits partition the documents of "all".
  assert sorted(docs["train"] + docs["valid"] + docs["test"]) == sorted(docs["all"])
  assert corpora.load_documents(cfg, "valid") == docs["valid"]  # deterministic
  assert any(b"def " in d for d in docs["valid"])
