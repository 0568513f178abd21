"""Tests for data/store.py, the byte-store cache of data/corpora.py, and batches read from it."""

import json
import os
import pickle

import numpy as np
import pytest

from configs import base
from data import bytes as byte_vocab
from data import corpora
from data import pipeline
from data import scoring
from data import store


def _cfg(tmp_path, **overrides):
  cfg = base.get_config().data
  cfg.cache_dir = str(tmp_path / "cache")
  cfg.update(overrides)
  return cfg


def _reference_stream(docs):
  """The in-memory id stream: each document's bytes then EOS (what every split was before the store)."""
  return np.concatenate([np.append(byte_vocab.encode(d), byte_vocab.EOS_ID) for d in docs]).astype(np.int32)


def _reference_cap(docs, max_bytes):
  out, left = [], max_bytes
  for doc in docs:
    if left <= 0:
      break
    out.append(doc[:left])
    left -= len(out[-1])
  return out


def _write_store(tmp_path, docs, split="train"):
  directory = str(tmp_path / "entry")
  writer = store.StoreWriter(directory, (split,))
  for doc in docs:
    writer.write(split, doc[:3])  # a document may arrive in several chunks
    writer.write(split, doc[3:])
    writer.end_document(split)
  writer.commit({"key": {}})
  return directory


DOCS = [b"hello world", b"", b"x", bytes(range(256)), b"", b"", b"tail end\n"]


def test_windows_reads_and_raw_bytes_equal_the_in_memory_stream(tmp_path):
  ids = _reference_stream(DOCS)
  opened = store.SplitStore(_write_store(tmp_path, DOCS), "train")
  assert (opened.num_ids, opened.num_documents, opened.num_bytes) == (len(ids), len(DOCS), sum(map(len, DOCS)))
  np.testing.assert_array_equal(opened.read(), ids)
  rng = np.random.default_rng(0)
  for length in (1, 2, 7, 40):
    starts = rng.integers(0, len(ids) - length + 1, 16)
    np.testing.assert_array_equal(opened.windows(starts, length), ids[starts[:, None] + np.arange(length)])
    assert opened.eos_count(starts, length) == int((ids[starts[:, None] + np.arange(length)] == 1).sum())
  raw = ids[ids != byte_vocab.EOS_ID] - byte_vocab.BYTE_OFFSET
  for start, stop in [(0, len(raw)), (0, 1), (10, 12), (11, 12), (5, 200), (len(raw) - 3, len(raw) + 9)]:
    np.testing.assert_array_equal(opened.raw_bytes(start, stop), raw[start:stop])
  assert list(opened.documents()) == DOCS
  with pytest.raises(IndexError, match="leave the"):
    opened.windows([len(ids) - 2], 3)
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(opened)).read(), ids)  # grain workers reopen it


@pytest.mark.parametrize("max_bytes", [1, 11, 12, 13, 100, 267, 275, 10_000])
def test_capped_view_equals_the_capped_documents(tmp_path, max_bytes):
  opened = store.SplitStore(_write_store(tmp_path, DOCS), "train", max_bytes=max_bytes)
  capped = _reference_cap(DOCS, max_bytes)
  assert list(opened.documents()) == capped
  np.testing.assert_array_equal(opened.read(), _reference_stream(capped))
  assert opened.num_bytes == min(max_bytes, sum(map(len, DOCS)))
  raw = b"".join(capped)
  assert opened.raw_bytes(0, len(raw)).tobytes() == raw


def test_bundled_batches_are_bitwise_those_of_the_in_memory_stream():
  """Train, eval and span corruption batches cut from the memory map equal those the in-memory int32
  stream gave (the formulas below are the pre-store pipeline's)."""
  cfg = base.get_config().data
  train = _reference_stream(corpora.load_documents(cfg, "train"))
  seq_len, batch = 64, 8
  index_batches = pipeline._train_index_batches(cfg, len(train) // (seq_len + 1), batch, 7, 0, 1, what="")
  it = pipeline.make_train_iterator(cfg, seq_len=seq_len, global_batch_size=batch, seed=7)
  for k in range(4):
    windows = train[np.asarray(index_batches[k])[:, None] * (seq_len + 1) + np.arange(seq_len + 1)]
    expected = pipeline._features(windows, np.full(batch, seq_len), True, eval_weights=False)
    got = next(it)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  valid = _reference_stream(corpora.load_documents(cfg, "valid"))
  ids = np.concatenate([[byte_vocab.EOS_ID], valid])
  for max_batches in (0, 3):
    windows = pipeline.eval_window_indices(-(-len(valid) // seq_len), batch, max_batches)
    got = list(pipeline.eval_batches(cfg, "valid", seq_len=seq_len, batch_size=batch, max_batches=max_batches))
    for k, b in enumerate(got):
      rows = windows[k * batch:(k + 1) * batch]
      starts = np.full(batch, len(valid), np.int64)
      starts[:len(rows)] = rows * seq_len
      expected = pipeline._features(ids[np.minimum(starts[:, None] + np.arange(seq_len + 1), len(valid))],
                                    np.clip(len(valid) - starts, 0, seq_len), True, eval_weights=True)
      for key in expected:
        np.testing.assert_array_equal(b[key], expected[key])
  raw = valid[valid != byte_vocab.EOS_ID]
  span = next(pipeline.eval_batches(cfg, "valid", seq_len=128, batch_size=2, batch_format="span_corruption"))
  sizes = pipeline._span_config(cfg, 128)[0]
  expected = pipeline._span_features([raw[:sizes.raw_length], raw[sizes.raw_length:2 * sizes.raw_length]],
                                     [[0, 0], [0, 1]], 2, 128, sizes, 0.15, 20.0, eval_weights=True)
  for key in expected:
    np.testing.assert_array_equal(span[key], expected[key])


def _files_cfg(tmp_path, n=40):
  rng = np.random.default_rng(1)
  root = tmp_path / "corpus"
  root.mkdir()
  for i in range(n):
    (root / f"f{i:02d}.txt").write_bytes(rng.integers(0, 256, int(rng.integers(1, 500)), dtype=np.uint8).tobytes())
  return _cfg(tmp_path, source="files", paths=(str(root),)), root


def _entries(cfg):
  root = corpora.cache_root(cfg)
  return sorted(e for e in os.listdir(root)) if os.path.isdir(root) else []


def test_cache_is_built_once_reused_and_rebuilt_when_stale(tmp_path, capsys, monkeypatch):
  builds = []
  build = corpora._build
  monkeypatch.setattr(corpora, "_build", lambda *args: builds.append(args[0].splits) or build(*args))
  cfg, root = _files_cfg(tmp_path)
  docs = {s: corpora.load_documents(cfg, s) for s in ("train", "valid", "test")}
  assert builds == [("train", "valid", "test")]  # one pass writes all three splits
  (entry,) = _entries(cfg)
  corpora.forget_opened()  # a new process
  assert {s: corpora.load_documents(cfg, s) for s in docs} == docs
  assert len(builds) == 1  # reused
  # An entry of another store format is detected and rebuilt, never read.
  meta_path = os.path.join(corpora.cache_root(cfg), entry, "meta.json")
  meta = json.load(open(meta_path))
  json.dump({**meta, "format_version": 0}, open(meta_path, "w"))
  corpora.forget_opened()
  assert corpora.load_documents(cfg, "valid") == docs["valid"]
  err = capsys.readouterr().err
  assert "written by byte-store format 0 and this code reads format 1; rebuilding it" in err
  assert json.load(open(meta_path))["format_version"] == store.FORMAT_VERSION
  # A truncated bytes file is detected too.
  with open(os.path.join(corpora.cache_root(cfg), entry, "train.bytes"), "r+b") as f:
    f.truncate(10)
  corpora.forget_opened()
  assert corpora.load_documents(cfg, "train") == docs["train"]
  assert "wrong size" in capsys.readouterr().err
  # A changed source file is a new entry (its size and modification time are in the key).
  changed = root / "f00.txt"
  changed.write_bytes(b"new text")
  os.utime(changed, ns=(1, 1))
  corpora.forget_opened()
  all_docs = corpora.load_documents(cfg, "all")
  assert b"new text" in all_docs and len(all_docs) == 40
  assert len([e for e in _entries(cfg) if e.startswith("files-tvt")]) == 1
  assert not [e for e in _entries(cfg) if ".tmp-" in e or ".stale-" in e]


def _jsonl_lines(docs, field="text"):
  return b"".join(json.dumps({field: d, "id": i}).encode() + b"\n" for i, d in enumerate(docs))


TEXTS = [f"document {i}: " + "abcdefgh" * (i % 7) + " é ✓" for i in range(300)]


def test_jsonl_gzip_zstd_parquet_and_array_record_give_the_same_documents(tmp_path):
  import gzip

  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  from array_record.python import array_record_module

  shards = [TEXTS[:125], TEXTS[125:]]
  for fmt in ("jsonl", "gz", "zst", "parquet", "array_record"):
    (tmp_path / fmt).mkdir()
  for i, shard in enumerate(shards):
    lines = _jsonl_lines(shard)
    (tmp_path / "jsonl" / f"part-{i}.jsonl").write_bytes(lines)
    (tmp_path / "gz" / f"part-{i}.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "zst" / f"part-{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"id": list(range(len(shard))), "text": shard}),
                   str(tmp_path / "parquet" / f"part-{i}.parquet"), row_group_size=7)
    writer = array_record_module.ArrayRecordWriter(str(tmp_path / "array_record" / f"part-{i}.array_record"))
    for text in shard:
      writer.write(text.encode())
    writer.close()
  results = {}
  for fmt, source, pattern in [("jsonl", "jsonl", "part-*.jsonl"), ("gz", "jsonl", "part-*.jsonl.gz"),
                               ("zst", "jsonl", "part-*.jsonl.zst"), ("parquet", "parquet", "*.parquet"),
                               ("array_record", "array_record", "part-*")]:
    cfg = _cfg(tmp_path, source=source, paths=(str(tmp_path / fmt / pattern),))
    results[fmt] = {s: corpora.load_documents(cfg, s) for s in corpora.SPLITS}
  # The split key is "<file key>:<record index>", and the file keys (names relative to the glob's
  # directory) differ by extension, so only the formats with equal file names split alike.
  everything = [t.encode() for t in TEXTS]
  for fmt, splits in results.items():
    assert splits["all"] == everything, fmt
    assert sorted(splits["train"] + splits["valid"] + splits["test"]) == sorted(everything), fmt
    assert len(splits["valid"]) and len(splits["test"]) and len(splits["train"]) > 200, fmt


def test_named_split_files(tmp_path):
  for split, texts in (("train", TEXTS[:40]), ("valid", TEXTS[40:50]), ("test", TEXTS[50:])):
    (tmp_path / f"{split}.jsonl").write_bytes(_jsonl_lines(texts))
  cfg = _cfg(tmp_path, source="jsonl")
  cfg.split_paths.update(train=(str(tmp_path / "train.jsonl"),), valid=(str(tmp_path / "valid.jsonl"),),
                         test=(str(tmp_path / "test.jsonl"),))
  assert corpora.load_documents(cfg, "valid") == [t.encode() for t in TEXTS[40:50]]
  assert corpora.load_documents(cfg, "train") == [t.encode() for t in TEXTS[:40]]
  assert corpora.load_documents(cfg, "all") == [t.encode() for t in TEXTS]
  bad = _cfg(tmp_path, source="single_file", paths=(str(tmp_path / "train.jsonl"),))
  bad.split_paths.valid = (str(tmp_path / "valid.jsonl"),)
  with pytest.raises(corpora.DataError, match="does not take"):
    corpora.open_split(bad, "train")


def test_jsonl_records_without_text_are_skipped_and_counted_and_bytes_are_kept(tmp_path, capsys):
  lines = [json.dumps({"text": t}).encode() for t in TEXTS[:30]]
  lines[3] = b'{"title": "no text field"}'
  lines[9] = b'{"text": null}'
  lines[12] = b'{"text": "raw \xff\xfe bytes"}'  # not UTF-8: kept as the bytes it is
  lines[15] = b'{"text": "lone \\ud800 surrogate"}'
  lines.insert(20, b"")  # a blank line is no record
  (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  cfg = _cfg(tmp_path, source="jsonl", paths=(str(tmp_path / "a.jsonl"),))
  docs = corpora.load_documents(cfg, "all")
  err = capsys.readouterr().err
  assert len(docs) == 28
  assert "skipped 2 of 30 lines without a string 'text' (first at" in err and "a.jsonl:4)" in err
  assert "kept 2 documents that are not valid UTF-8 as raw bytes" in err
  assert b"raw \xff\xfe bytes" in docs and "lone \ud800 surrogate".encode("utf-8", "surrogatepass") in docs


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl:2 is not a JSON object"),
    ("cut.jsonl.gz", None, r"cut.jsonl.gz is corrupt after line"),
    ("nocol.parquet", None, r"has no column 'text' \(data.text_field\); its columns are 'body'"),
])
def test_unreadable_record_files_are_one_error_and_leave_no_cache(tmp_path, name, content, message):
  import gzip

  import pyarrow as pa
  import pyarrow.parquet as pq
  path = tmp_path / name
  if name.endswith(".gz"):
    whole = gzip.compress(_jsonl_lines(TEXTS * 50))
    path.write_bytes(whole[:len(whole) // 2])
  elif name.endswith(".parquet"):
    pq.write_table(pa.table({"body": TEXTS}), str(path))
  else:
    path.write_bytes(content)
  cfg = _cfg(tmp_path, source="parquet" if name.endswith(".parquet") else "jsonl", paths=(str(path),))
  with pytest.raises(corpora.DataError, match=message):
    corpora.open_split(cfg, "train")
  assert _entries(cfg) == []  # nothing half-built is left to be reused


def test_scored_count_and_the_compressor_sample(tmp_path):
  rng = np.random.default_rng(3)
  (tmp_path / "small.txt").write_bytes(rng.integers(97, 123, 300_000, dtype=np.uint8).tobytes())
  (tmp_path / "big.txt").write_bytes(rng.integers(97, 123, 5_000_000, dtype=np.uint8).tobytes())
  cfg = _cfg(tmp_path, source="single_file", paths=(str(tmp_path / "small.txt"),))
  for fmt, seq_len in (("causal_lm", 100), ("span_corruption", 64)):
    for max_batches in (0, 5):
      kw = dict(seq_len=seq_len, batch_size=4, max_batches=max_batches, batch_format=fmt)
      whole = scoring.eval_scored_bytes(cfg, "all", **kw)
      assert scoring.eval_scored_count(cfg, "all", **kw) == len(whole)
  cfg = _cfg(tmp_path, source="single_file", paths=(str(tmp_path / "big.txt"),))
  kw = dict(seq_len=100, batch_size=4)
  whole = scoring.eval_scored_bytes(cfg, "all", **kw)
  sample = scoring.eval_scored_bytes(cfg, "all", max_bytes=2_200_000, **kw)
  block = -(-(1 << 20) * 50_000 // 5_000_000) * 100  # consecutive whole windows of about 1 MiB
  assert sample == whole[:block] + whole[2 * block:3 * block]  # blocks 0 and 2 of 5: evenly spread
