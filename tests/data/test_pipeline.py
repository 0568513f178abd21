"""Tests for data/pipeline.py."""

import numpy as np
import pytest

from configs import base
from data import bytes as byte_vocab
from data import corpora
from data import pipeline
from data import scoring

KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def _cfg(**overrides):
  cfg = base.get_config().data
  cfg.update(overrides)
  return cfg


def _docs_cfg(tmp_path, docs, **overrides):
  """A files corpus whose split "all" stream is docs[0] EOS docs[1] EOS ..."""
  for i, doc in enumerate(docs):
    (tmp_path / f"d{i:03d}.txt").write_bytes(doc)
  return _cfg(source="files", paths=(str(tmp_path),), **overrides)


def _random_text_cfg(tmp_path, num_bytes, **overrides):
  rng = np.random.default_rng(0)
  f = tmp_path / "text.txt"
  f.write_bytes(rng.integers(ord("a"), ord("z") + 1, num_bytes, dtype=np.uint8).tobytes())
  return _cfg(source="single_file", paths=(str(f),), **overrides)


def _stream(cfg, split):
  """The split's id stream as the in-memory reference builds it: each document's bytes, then EOS."""
  return np.concatenate([np.append(byte_vocab.encode(d), byte_vocab.EOS_ID)
                         for d in corpora.load_documents(cfg, split)]).astype(np.int32)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def test_segments_on_hand_built_stream():
  e = byte_vocab.EOS_ID
  inputs = np.array([[5, 6, e, 7, e, e, 8, 9], [e, 5, 6, 7, 8, 9, 10, e]])
  seg, pos = pipeline._segments(inputs, segment_documents=True)
  np.testing.assert_array_equal(seg, [[1, 1, 1, 2, 2, 3, 4, 4], [1, 2, 2, 2, 2, 2, 2, 2]])
  np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]])
  seg, pos = pipeline._segments(inputs, segment_documents=False)
  np.testing.assert_array_equal(seg, np.ones((2, 8)))
  np.testing.assert_array_equal(pos, [np.arange(8)] * 2)


def test_eval_batches_hand_built(tmp_path):
  # Eval stream: EOS a b EOS c d e EOS f EOS  (10 ids, 9 targets, 3 windows of 4).
  cfg = _docs_cfg(tmp_path, [b"ab", b"cde", b"f"])
  batches = list(pipeline.eval_batches(cfg, "all", seq_len=4, batch_size=2))
  assert len(batches) == 2
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        k: ((2, 4), np.float32 if k == "weights" else np.int32) for k in KEYS}
  b = {k: np.concatenate([x[k] for x in batches]) for k in KEYS}
  ids = lambda s: [1 if c == "|" else 0 if c == "." else ord(c) + 3 for c in s]  # "|" EOS, "." pad
  np.testing.assert_array_equal(b["inputs"], [ids("|ab|"), ids("cde|"), ids("f..."), [0] * 4])
  np.testing.assert_array_equal(b["targets"], [ids("ab|c"), ids("de|f"), ids("|..."), [0] * 4])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 2, 2, 2], [1, 1, 1, 1], [1, 0, 0, 0], [0] * 4])
  np.testing.assert_array_equal(b["positions"], [[0, 0, 1, 2], [0, 1, 2, 3], [0] * 4, [0] * 4])
  # The first byte "a" is scored (after the EOS context); EOS targets and padding are not.
  np.testing.assert_array_equal(b["weights"], [[1, 1, 0, 1], [1, 1, 0, 1], [0] * 4, [0] * 4])
  assert b["weights"].sum() == 6 == len(b"ab" + b"cde" + b"f")
  assert scoring.eval_scored_bytes(cfg, "all", seq_len=4, batch_size=2) == b"abcdef"
  flat = list(pipeline.eval_batches(_docs_cfg(tmp_path, [b"ab", b"cde", b"f"],
                                              segment_documents=False),
                                    "all", seq_len=4, batch_size=2))
  flat = {k: np.concatenate([x[k] for x in flat]) for k in KEYS}
  np.testing.assert_array_equal(flat["segment_ids"], [[1] * 4, [1] * 4, [1, 0, 0, 0], [0] * 4])
  np.testing.assert_array_equal(flat["positions"], [np.arange(4)] * 2 + [[0] * 4] * 2)


def _random_docs(seed, n=9, max_len=40):
  rng = np.random.default_rng(seed)
  return [bytes(rng.integers(0, 256, int(k), dtype=np.uint8)) for k in rng.integers(1, max_len, n)]


def _rows(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in KEYS}


def _scored_bytes_of(batches):
  rows = _rows(batches)
  return (rows["targets"][rows["weights"] > 0] - byte_vocab.BYTE_OFFSET).astype(np.uint8).tobytes()


@pytest.mark.parametrize("seq_len, batch_size", [(7, 3), (16, 2), (1, 5)])
def test_eval_windows_cover_every_target_once(tmp_path, seq_len, batch_size):
  docs = _random_docs(seq_len)
  cfg = _docs_cfg(tmp_path, docs)
  stream = _stream(cfg, "all")
  ids = np.concatenate([[byte_vocab.EOS_ID], stream])  # the eval stream
  batches = list(pipeline.eval_batches(cfg, "all", seq_len=seq_len, batch_size=batch_size))
  assert all(b["inputs"].shape == (batch_size, seq_len) for b in batches)
  real = np.concatenate([b["segment_ids"].reshape(-1) > 0 for b in batches])
  targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
  inputs = np.concatenate([b["inputs"].reshape(-1) for b in batches])
  weights = np.concatenate([b["weights"].reshape(-1) for b in batches])
  np.testing.assert_array_equal(targets[real], ids[1:])
  np.testing.assert_array_equal(inputs[real], ids[:-1])
  assert (targets[~real] == byte_vocab.PAD_ID).all() and (inputs[~real] == 0).all()
  np.testing.assert_array_equal(weights, real & byte_vocab.is_byte_id(targets))
  # Every byte, the stream's first included, is a target; EOS and padding carry no weight.
  assert weights.sum() == sum(len(d) for d in docs)
  assert len(batches) == -(-(-(-len(stream) // seq_len)) // batch_size)
  scored = scoring.eval_scored_bytes(cfg, "all", seq_len=seq_len, batch_size=batch_size)
  assert scored == b"".join(docs) == _scored_bytes_of(batches)
  # A cap that covers every window reads the whole split, unchanged.
  capped = list(pipeline.eval_batches(cfg, "all", seq_len=seq_len, batch_size=batch_size,
                                      max_batches=len(batches)))
  _assert_batches_equal(capped, batches)


def test_eval_window_indices():
  np.testing.assert_array_equal(pipeline.eval_window_indices(10, 2, 2), [0, 2, 5, 7])
  np.testing.assert_array_equal(pipeline.eval_window_indices(10, 3, 3), [0, 1, 2, 3, 4, 5, 6, 7, 8])
  for cap in (0, 5, 7):  # none, exactly every window, more than every window
    np.testing.assert_array_equal(pipeline.eval_window_indices(10, 2, cap), np.arange(10))
  for n in range(1, 60):
    for k in range(1, n):
      w = pipeline.eval_window_indices(n, k, 1)
      assert len(w) == k and w[0] == 0 and (np.diff(w) > 0).all() and w[-1] <= n - 2
      assert w[-1] >= n - 1 - n / k  # the sample reaches the end of the split
  big = pipeline.eval_window_indices(1800, 16, 8)  # the bundled valid split's scale
  assert len(big) == 128 and big[-1] > 1750 and set(np.diff(big)) <= {14, 15}


@pytest.mark.parametrize("seq_len, batch_size, max_batches", [(7, 3, 2), (5, 4, 1), (1, 5, 3)])
def test_eval_spread_sample(tmp_path, seq_len, batch_size, max_batches):
  docs = _random_docs(seq_len + 100, n=12)
  cfg = _docs_cfg(tmp_path, docs)
  kw = dict(seq_len=seq_len, batch_size=batch_size)
  whole = _rows(list(pipeline.eval_batches(cfg, "all", **kw)))
  num_windows = -(-len(_stream(cfg, "all")) // seq_len)
  assert num_windows > 4 * max_batches * batch_size  # a real sample
  sample = list(pipeline.eval_batches(cfg, "all", max_batches=max_batches, **kw))
  assert len(sample) == max_batches
  assert all(b[k].shape == (batch_size, seq_len) for b in sample for k in KEYS)
  windows = pipeline.eval_window_indices(num_windows, batch_size, max_batches)
  assert windows[0] == 0 and windows[-1] >= num_windows - 1 - num_windows / len(windows)  # to the end
  rows = _rows(sample)
  for k in KEYS:  # the same windows, laid out as in the whole-split eval
    np.testing.assert_array_equal(rows[k], whole[k][windows])
  assert (rows["segment_ids"] > 0).all()  # whole windows: no padding
  scored = scoring.eval_scored_bytes(cfg, "all", max_batches=max_batches, **kw)
  assert len(scored) == rows["weights"].sum() > 0
  assert scored == _scored_bytes_of(sample)
  assert list(pipeline.eval_batches(cfg, "all", max_batches=max_batches, **kw))[0]["inputs"][0, 0] \
      == byte_vocab.EOS_ID  # window 0 first: the eval stream's leading EOS


def test_text_files_score_every_byte(tmp_path):
  a = tmp_path / "notes.txt"
  a.write_bytes(("def f(x):\n  return x + 1  # héllo, wörld\n" * 5).encode("utf-8"))
  b = tmp_path / "more.bin"
  b.write_bytes(bytes(range(256)) * 3 + b"\x01\x00")  # raw bytes 0 and 1 are bytes, not PAD/EOS
  for paths in ((a,), (a, b)):
    cfg = _cfg(source="files", paths=tuple(str(p) for p in paths))
    size = sum(p.stat().st_size for p in paths)
    for batch_size in (4, 64):
      batches = list(pipeline.eval_batches(cfg, "all", seq_len=32, batch_size=batch_size))
      assert sum(float(x["weights"].sum()) for x in batches) == size
      scored = scoring.eval_scored_bytes(cfg, "all", seq_len=32, batch_size=batch_size)
      assert scored == b"".join(p.read_bytes() for p in paths) == _scored_bytes_of(batches)


def test_eval_scored_bytes_rejects_synthetic_sources():
  cfg = _cfg(source="mqar")
  with pytest.raises(corpora.DataError, match="no scored bytes"):
    scoring.eval_scored_bytes(cfg, "valid", seq_len=64, batch_size=4)


def test_train_batches_shape_and_content(tmp_path):
  cfg = _random_text_cfg(tmp_path, 4000, shuffle=False)
  stream = _stream(cfg, "train")
  it = pipeline.make_train_iterator(cfg, seq_len=15, global_batch_size=4, seed=0)
  b = next(it)
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
      k: ((4, 15), np.float32 if k == "weights" else np.int32) for k in KEYS}
  windows = stream[:64].reshape(4, 16)  # unshuffled: windows 0..3, stride seq_len + 1
  np.testing.assert_array_equal(b["inputs"], windows[:, :-1])
  np.testing.assert_array_equal(b["targets"], windows[:, 1:])
  np.testing.assert_array_equal(b["weights"], np.ones((4, 15)))
  np.testing.assert_array_equal(b["segment_ids"], np.ones((4, 15)))


def test_train_deterministic_and_seed_dependent(tmp_path):
  cfg = _random_text_cfg(tmp_path, 20000)
  make = lambda seed: pipeline.make_train_iterator(cfg, seq_len=15, global_batch_size=8,
                                                   seed=seed)
  a, b, c = _take(make(0), 5), _take(make(0), 5), _take(make(1), 5)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def test_train_reshuffles_every_epoch(tmp_path):
  cfg = _random_text_cfg(tmp_path, 600)  # train: 540 bytes + EOS -> 33 windows of 16
  num_windows = len(_stream(cfg, "train")) // 16
  it = pipeline.make_train_iterator(cfg, seq_len=15, global_batch_size=3, seed=0)
  rows = [tuple(r) for b in _take(it, num_windows) for r in b["inputs"]]  # 3 epochs
  epochs = [rows[e * num_windows:(e + 1) * num_windows] for e in range(3)]
  assert len(set(epochs[0])) == num_windows  # random text: windows are distinct
  assert all(set(e) == set(epochs[0]) for e in epochs)  # each epoch sees every window once
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_train_process_sharding(tmp_path):
  cfg = _random_text_cfg(tmp_path, 20000)
  kw = dict(seq_len=15, global_batch_size=8, seed=3)
  whole = _take(pipeline.make_train_iterator(cfg, **kw), 6)
  parts = [_take(pipeline.make_train_iterator(cfg, process_index=p, process_count=2, **kw), 6)
           for p in range(2)]
  for k in range(6):
    assert parts[0][k]["inputs"].shape == (4, 15)
    rows = lambda b: {tuple(r) for r in b["inputs"]}
    assert rows(parts[0][k]) | rows(parts[1][k]) == rows(whole[k])
    for key in KEYS:  # process-major row order
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])


def test_train_state_resumes_exactly(tmp_path):
  cfg = _random_text_cfg(tmp_path, 600)
  kw = dict(seq_len=15, global_batch_size=4, seed=7)
  it = pipeline.make_train_iterator(cfg, **kw)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 12)  # crosses epoch boundaries (8 batches per epoch)
  restored = pipeline.make_train_iterator(cfg, **kw)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 12), expected)
  it.set_state(state)  # rewinding the same iterator works too
  _assert_batches_equal(_take(it, 12), expected)


def test_train_errors(tmp_path):
  cfg = _random_text_cfg(tmp_path, 600)
  with pytest.raises(corpora.DataError, match="does not divide evenly over 3 processes"):
    pipeline.make_train_dataset(cfg, seq_len=15, global_batch_size=8, seed=0, process_count=3)
  with pytest.raises(corpora.DataError, match="fewer than one global batch of 64"):
    pipeline.make_train_dataset(cfg, seq_len=15, global_batch_size=64, seed=0)


def test_passkey_mixture_rows_resume_and_shard_exactly(tmp_path):
  from data import synthetic
  cfg = _random_text_cfg(tmp_path, 200_000, passkey_fraction=0.5)
  kw = dict(seq_len=300, global_batch_size=8, seed=5)
  batches = _take(pipeline.make_train_iterator(cfg, **kw), 8)
  description = byte_vocab.encode(synthetic.PASSKEY_TASK_DESCRIPTION)
  mixed = 0
  for b in batches:
    for inputs, targets, segments in zip(b["inputs"], b["targets"], b["segment_ids"]):
      if not np.array_equal(inputs[:len(description)], description):
        assert segments.max() == 1  # a plain corpus window (random letters, no EOS)
        continue
      mixed += 1
      window = np.append(inputs, targets[-1])  # the document + EOS may fill all seq_len + 1 ids
      end = int(np.flatnonzero(window == byte_vocab.EOS_ID)[0])
      text = byte_vocab.decode(window[:end])
      key = int(text.split("The pass key is ")[1][:5])
      assert text.endswith(synthetic.PASSKEY_QUESTION + synthetic.passkey_answer(key))
      assert len(text) >= synthetic.passkey_fixed_bytes()
      assert segments[min(end, len(inputs) - 1)] == 1
      assert end >= len(inputs) - 1 or segments[-1] == 2  # the corpus window's start follows the EOS
  assert 16 <= mixed <= 48  # about half of the 64 rows
  # The draws are a function of the position in the stream: resume and 2-process sharding are exact.
  it = pipeline.make_train_iterator(cfg, **kw)
  _take(it, 3)
  restored = pipeline.make_train_iterator(cfg, **kw)
  restored.set_state(it.get_state())
  _assert_batches_equal(_take(restored, 5), batches[3:])
  parts = [_take(pipeline.make_train_iterator(cfg, process_index=p, process_count=2, **kw), 4) for p in range(2)]
  for k in range(4):
    for key in KEYS:
      np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), batches[k][key])
  off = _take(pipeline.make_train_iterator(_random_text_cfg(tmp_path, 200_000), **kw), 2)
  assert not any(np.array_equal(r[:len(description)], description) for b in off for r in b["inputs"])


@pytest.mark.parametrize("fraction, seq_len, batch_format, message", [
    (1.5, 300, "causal_lm", r"must be in \[0, 1\]"),
    (0.2, 200, "causal_lm", r"needs seq_len >= 254"),
    (0.2, 300, "span_corruption", "mixes passkey documents into causal_lm windows"),
])
def test_passkey_mixture_bad_options(tmp_path, fraction, seq_len, batch_format, message):
  cfg = _random_text_cfg(tmp_path, 200_000, passkey_fraction=fraction)
  with pytest.raises(corpora.DataError, match=message):
    pipeline.make_train_iterator(cfg, seq_len=seq_len, global_batch_size=4, seed=0, batch_format=batch_format)
