"""Tests for data/span_corruption.py and the "span_corruption" batches of data/pipeline.py (spec §2.4)."""

import numpy as np
import pytest

from data import bytes as byte_vocab
from data import corpora
from data import pipeline
from data import scoring
from data import span_corruption as sc
from tests.data import test_pipeline as tp

SPAN = "span_corruption"
SHORT_SPANS = dict(span_corruption=dict(noise_density=0.15, mean_noise_span_length=3.0))  # 3 spans in 64
KEYS = ("inputs", "targets", "decoder_inputs", "weights", "special_weights")


def _t5_lengths(inputs_length, noise_density, mean):
  """T5's compute_input_and_target_lengths, restated (spec §2.4 step 1): (raw, targets)."""
  def sizes(t):
    noise = int(round(t * noise_density))
    spans = int(round(noise / mean))
    return t - noise + spans + 1, noise + spans + 1
  t = inputs_length
  while sizes(t + 1)[0] <= inputs_length:
    t += 1
  return t, sizes(t)[1]


def _reassemble(inputs, targets):
  """The raw ids back from one example's corrupt() output: each sentinel of inputs filled with its span.

  Needs raw ids below the sentinels in use (258, 257, ...), so a sentinel is never a raw byte.
  """
  inputs, targets = list(inputs), list(targets)
  inputs = inputs[:inputs.index(byte_vocab.EOS_ID)]
  targets = targets[:targets.index(byte_vocab.EOS_ID)]
  raw, i = [], 0
  for x in inputs:
    if x != sc.SENTINEL_START - i:
      raw.append(x)
      continue
    assert targets[0] == x, "targets start with the same sentinel"
    end = targets.index(x - 1) if x - 1 in targets else len(targets)
    raw.extend(targets[1:end])
    targets = targets[end:]
    i += 1
  assert not targets
  return np.array(raw, np.int32)


def _runs(mask):
  return int((mask & ~np.concatenate([[False], mask[:-1]])).sum())


# --- data/span_corruption.py ------------------------------------------------------------------------


def test_lengths_byt5():
  assert sc.lengths(1024) == sc.SpanLengths(raw_length=1193, targets_length=189, num_noise=179,
                                            num_spans=9)


@pytest.mark.parametrize("density, mean", [(0.15, 20.0), (0.15, 3.0), (0.3, 5.0)])
def test_lengths_match_t5(density, mean):
  for inputs_length in (62, 100, 189, 256, 500, 1000, 1024, 1500, 2048):
    try:
      got = sc.lengths(inputs_length, density, mean)
    except corpora.DataError:  # too many spans for the sentinels
      assert inputs_length * density / mean > 200
      continue
    assert (got.raw_length, got.targets_length) == _t5_lengths(inputs_length, density, mean)
    assert (got.num_noise, got.num_spans) == sc.span_counts(got.raw_length, density, mean)
    assert got.raw_length - got.num_noise + got.num_spans + 1 <= inputs_length  # fits the encoder
    longer = sc.span_counts(got.raw_length + 1, density, mean)
    assert got.raw_length + 1 - longer[0] + longer[1] + 1 > inputs_length  # the largest that fits


def test_lengths_small_inputs():
  for inputs_length in range(3, 62):
    got = sc.lengths(inputs_length)
    assert got.num_spans >= 1 and got.num_noise >= 1 and got.raw_length - got.num_noise >= got.num_spans
    assert got.raw_length - got.num_noise + got.num_spans + 1 <= inputs_length
  assert sc.lengths(3) == sc.SpanLengths(raw_length=2, targets_length=3, num_noise=1, num_spans=1)


def test_span_counts_grow_with_length():
  # Longer raw sequences never corrupt to shorter inputs or targets: lengths() may stop searching
  # early, and a short last eval chunk fits the batch's shapes.
  for density, mean in ((0.15, 20.0), (0.15, 3.0), (0.5, 1.0)):
    counts = np.array([sc.span_counts(t, density, mean) for t in range(1, 3000)])
    t = np.arange(1, 3000)
    inputs, targets = t - counts[:, 0] + counts[:, 1] + 1, counts.sum(axis=1) + 1
    assert (np.diff(inputs) >= 0).all() and (np.diff(targets) >= 0).all()
    assert (counts[1:, 1] >= 1).all() and (counts[1:, 1] <= counts[1:, 0]).all()
    assert (counts[1:, 1] <= t[1:] - counts[1:, 0]).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(inputs_length=2), "cannot hold one span"),
    (dict(inputs_length=1024, noise_density=0.0), r"noise_density must be in \(0, 1\)"),
    (dict(inputs_length=1024, noise_density=1.0), r"noise_density must be in \(0, 1\)"),
    (dict(inputs_length=1024, noise_density=-0.1), r"noise_density must be in \(0, 1\)"),
    (dict(inputs_length=1024, mean_noise_span_length=0.5), "must be at least 1"),
    (dict(inputs_length=65536), "more than the 256 sentinel ids"),
])
def test_lengths_bad_settings(kwargs, message):
  with pytest.raises(corpora.DataError, match=message) as e:
    sc.lengths(**kwargs)
  assert "\n" not in str(e.value) and str(e.value).endswith(".")


def test_noise_mask_counts_and_layout():
  rng = np.random.default_rng(0)
  for _ in range(300):
    length = int(rng.integers(2, 400))
    num_noise = int(rng.integers(1, length))
    num_spans = int(rng.integers(1, min(num_noise, length - num_noise) + 1))
    mask = sc.random_spans_noise_mask(length, num_noise, num_spans, rng)
    assert mask.shape == (length,) and mask.dtype == bool
    assert mask.sum() == num_noise and _runs(mask) == num_spans
    assert not mask[0] and mask[-1]  # a non-noise span first, a noise span last
  np.testing.assert_array_equal(sc.random_spans_noise_mask(1, 0, 0, rng), [False])


def test_noise_mask_is_random_and_seeded():
  make = lambda seed: sc.random_spans_noise_mask(1193, 179, 9, np.random.default_rng(seed))
  np.testing.assert_array_equal(make(1), make(1))
  masks = {make(seed).tobytes() for seed in range(20)}
  assert len(masks) == 20
  # Every position but the first and last can be noise or not.
  both = np.stack([make(seed) for seed in range(400)])
  assert both[:, 1:-1].any(axis=0).all() and (~both[:, 1:-1]).any(axis=0).all()


def test_noise_mask_bad_counts():
  rng = np.random.default_rng(0)
  for args in ((10, 5, 6), (10, 9, 2), (10, 3, 0)):
    with pytest.raises(corpora.DataError, match="do not fit"):
      sc.random_spans_noise_mask(*args, rng)


def test_corrupt_hand_built():
  raw = np.array([10, 11, 12, 13, 14, 15, 16, 17])
  mask = np.array([0, 1, 1, 0, 0, 1, 0, 1], bool)
  inputs, targets = sc.corrupt(raw, mask)
  np.testing.assert_array_equal(inputs, [10, 258, 13, 14, 257, 16, 256, 1])
  np.testing.assert_array_equal(targets, [258, 11, 12, 257, 15, 256, 17, 1])
  assert inputs.dtype == targets.dtype == np.int32
  _, _, is_sentinel = sc.corrupt_with_sentinels(raw, mask)
  np.testing.assert_array_equal(is_sentinel, [1, 0, 0, 1, 0, 1, 0, 0])


def test_corrupt_round_trip():
  rng = np.random.default_rng(1)
  for length in (2, 3, 10, 57, 300, 1193):
    num_noise, num_spans = sc.span_counts(length, 0.15, 3.0 if length < 100 else 20.0)
    for _ in range(10):
      raw = rng.integers(3, 200, length).astype(np.int32)  # below the sentinels
      mask = sc.random_spans_noise_mask(length, num_noise, num_spans, rng)
      inputs, targets, is_sentinel = sc.corrupt_with_sentinels(raw, mask)
      assert len(inputs) == length - num_noise + num_spans + 1
      assert len(targets) == num_noise + num_spans + 1
      assert inputs[-1] == targets[-1] == byte_vocab.EOS_ID
      sentinels = sc.SENTINEL_START - np.arange(num_spans)  # 258, 257, ...
      np.testing.assert_array_equal(inputs[inputs >= 200], sentinels)
      np.testing.assert_array_equal(targets[is_sentinel], sentinels)
      assert targets[0] == sc.SENTINEL_START
      np.testing.assert_array_equal(targets[~is_sentinel][:-1], raw[mask])
      np.testing.assert_array_equal(_reassemble(inputs, targets), raw)


def test_blank_inputs_keeps_sentinels_in_order_eos_and_pad():
  space = byte_vocab.BYTE_OFFSET + ord(" ")
  inputs = np.array([[3 + 97, 258, 3 + 98, 257, 1, 0],
                     [257, 3 + 99, 258, 3 + 100, 257, 1]])  # row 2: a 257 before 258 is a text byte
  np.testing.assert_array_equal(sc.blank_inputs(inputs), [[space, 258, space, 257, 1, 0],
                                                          [space, space, 258, space, 257, 1]])
  assert sc.blank_inputs(inputs, blank_id=7)[0, 0] == 7


def test_blank_inputs_of_corrupted_rows():
  rng = np.random.default_rng(2)
  raw = rng.integers(3, 200, 300).astype(np.int32)
  mask = sc.random_spans_noise_mask(300, *sc.span_counts(300, 0.15, 3.0), rng)
  inputs, _ = sc.corrupt(raw, mask)
  padded = np.pad(inputs, (0, 5))[None]
  kept = padded >= 200
  kept[0, len(inputs) - 1:] = True  # EOS, then PAD
  np.testing.assert_array_equal(sc.blank_inputs(padded), np.where(kept, padded, byte_vocab.BYTE_OFFSET + 32))


def test_corrupt_bad_shapes():
  with pytest.raises(corpora.DataError, match="same 1-D shape"):
    sc.corrupt(np.arange(5), np.zeros(4, bool))


# --- data/pipeline.py batch_format="span_corruption" ------------------------------------------------


def _low_byte_docs(seed, n=30, max_len=90):
  """Documents of bytes below 0xC0, so no byte id is one of the sentinels in use (_reassemble)."""
  rng = np.random.default_rng(seed)
  return [bytes(rng.integers(0, 0xC0, int(k), dtype=np.uint8)) for k in rng.integers(1, max_len, n)]


def _raw(cfg, split):
  return byte_vocab.encode(b"".join(corpora.load_documents(cfg, split)))


def _mask(chunk, seed, density=0.15, mean=20.0):
  return sc.random_spans_noise_mask(len(chunk), *sc.span_counts(len(chunk), density, mean),
                                    np.random.default_rng(seed))


def _check_batch(batch, rows, seq_len, mean=20.0):
  sizes = sc.lengths(seq_len, mean_noise_span_length=mean)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: ((rows, seq_len if k == "inputs" else sizes.targets_length),
          np.float32 if "weights" in k else np.int32) for k in KEYS}
  np.testing.assert_array_equal(batch["decoder_inputs"][:, 0], 0)
  np.testing.assert_array_equal(batch["decoder_inputs"][:, 1:], batch["targets"][:, :-1])


def test_span_train_batches(tmp_path):
  cfg = tp._docs_cfg(tmp_path, _low_byte_docs(0), shuffle=False, **SHORT_SPANS)
  seq_len = 64
  raw_length = sc.lengths(seq_len, mean_noise_span_length=3.0).raw_length
  raw = _raw(cfg, "train")
  it = pipeline.make_train_iterator(cfg, seq_len=seq_len, global_batch_size=4, seed=0, batch_format=SPAN)
  for k, batch in enumerate(tp._take(it, 3)):
    _check_batch(batch, 4, seq_len, mean=3.0)
    np.testing.assert_array_equal(batch["weights"], batch["targets"] != 0)  # sentinels and EOS too
    for r in range(4):  # unshuffled: example e = 4k + r is chunk e, EOS separators dropped
      e = 4 * k + r
      chunk = raw[e * raw_length:(e + 1) * raw_length]
      np.testing.assert_array_equal(_reassemble(batch["inputs"][r], batch["targets"][r]), chunk)
      assert (batch["inputs"][r] != 0).all()  # a whole chunk fills the encoder
      inputs, targets = sc.corrupt(chunk, _mask(chunk, seed=[0, e], mean=3.0))  # the documented seed rule
      np.testing.assert_array_equal(batch["inputs"][r], inputs)
      np.testing.assert_array_equal(batch["targets"][r, :len(targets)], targets)


def test_span_train_masks_seeded_and_new_every_epoch(tmp_path):
  cfg = tp._random_text_cfg(tmp_path, 2000, shuffle=False, **SHORT_SPANS)
  num_chunks = len(_raw(cfg, "train")) // sc.lengths(64, mean_noise_span_length=3.0).raw_length
  make = lambda seed: pipeline.make_train_iterator(cfg, seq_len=64, global_batch_size=1, seed=seed,
                                                   batch_format=SPAN)
  a, b, c = tp._take(make(0), 2 * num_chunks), tp._take(make(0), 3), tp._take(make(1), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])  # same chunk, another seed's mask
  # Unshuffled, epoch 2 sees chunk 0 again, with a new mask.
  np.testing.assert_array_equal(_reassemble(a[0]["inputs"][0], a[0]["targets"][0]),
                                _reassemble(a[num_chunks]["inputs"][0], a[num_chunks]["targets"][0]))
  assert not np.array_equal(a[0]["inputs"], a[num_chunks]["inputs"])


def test_span_train_process_sharding(tmp_path):
  cfg = tp._random_text_cfg(tmp_path, 20000, **SHORT_SPANS)
  kw = dict(seq_len=64, global_batch_size=8, seed=3, batch_format=SPAN)
  whole = tp._take(pipeline.make_train_iterator(cfg, **kw), 4)
  parts = [tp._take(pipeline.make_train_iterator(cfg, process_index=p, process_count=2, **kw), 4)
           for p in range(2)]
  for k in range(4):
    _check_batch(parts[0][k], 4, 64, mean=3.0)
    for key in KEYS:
      np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])


def test_span_train_state_resumes_exactly(tmp_path):
  cfg = tp._random_text_cfg(tmp_path, 1200, **SHORT_SPANS)  # 1080 train bytes: 15 chunks of 70
  kw = dict(seq_len=64, global_batch_size=4, seed=7, batch_format=SPAN)
  it = pipeline.make_train_iterator(cfg, **kw)
  tp._take(it, 5)
  state = it.get_state()
  expected = tp._take(it, 8)  # crosses epoch boundaries
  restored = pipeline.make_train_iterator(cfg, **kw)
  restored.set_state(state)
  for x, y in zip(tp._take(restored, 8), expected, strict=True):
    for key in KEYS:
      np.testing.assert_array_equal(x[key], y[key])


def _eval_rows(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in KEYS}


@pytest.mark.parametrize("seq_len, batch_size, mean", [(64, 3, 20.0), (32, 4, 20.0), (189, 2, 20.0),
                                                     (100, 3, 3.0)])
def test_span_eval_covers_every_byte_once(tmp_path, seq_len, batch_size, mean):
  docs = _low_byte_docs(seq_len, n=20)
  cfg = tp._docs_cfg(tmp_path, docs)
  cfg.span_corruption = dict(noise_density=0.15, mean_noise_span_length=mean)
  kw = dict(seq_len=seq_len, batch_size=batch_size, batch_format=SPAN)
  batches = list(pipeline.eval_batches(cfg, "all", **kw))
  raw_length = sc.lengths(seq_len, mean_noise_span_length=mean).raw_length
  num_chunks = -(-len(b"".join(docs)) // raw_length)
  assert len(batches) == -(-num_chunks // batch_size)
  for b in batches:
    _check_batch(b, batch_size, seq_len, mean)
  rows = _eval_rows(batches)
  # The chunks reassemble to the split's bytes (documents joined without separators), once each.
  joined = np.concatenate([_reassemble(i, t) for i, t in zip(rows["inputs"][:num_chunks],
                                                            rows["targets"][:num_chunks])])
  np.testing.assert_array_equal(joined, byte_vocab.encode(b"".join(docs)))
  assert not rows["inputs"][num_chunks:].any() and not rows["targets"][num_chunks:].any()
  # weights (real bytes) and special_weights (sentinels, EOS) partition the non-pad targets.
  real = rows["targets"] != 0
  assert not (rows["weights"] * rows["special_weights"]).any()
  np.testing.assert_array_equal(rows["weights"] + rows["special_weights"], real)
  np.testing.assert_array_equal(rows["special_weights"] * (rows["targets"] == 1),
                                rows["targets"] == 1)  # every EOS is special
  scored = scoring.eval_scored_bytes(cfg, "all", **kw)
  assert len(scored) == rows["weights"].sum() > 0
  assert scored == (rows["targets"][rows["weights"] > 0] - 3).astype(np.uint8).tobytes()
  # Fixed masks: the same batches again.
  for x, y in zip(pipeline.eval_batches(cfg, "all", **kw), batches, strict=True):
    for key in KEYS:
      np.testing.assert_array_equal(x[key], y[key])


def test_span_eval_weights_with_sentinel_valued_bytes(tmp_path):
  f = tmp_path / "ff.bin"
  f.write_bytes(bytes(range(256)) * 4 + b"\xff" * 300)  # bytes 0xFF.. share ids with the sentinels
  cfg = tp._cfg(source="files", paths=(str(f),))
  kw = dict(seq_len=64, batch_size=4, batch_format=SPAN)
  rows = _eval_rows(list(pipeline.eval_batches(cfg, "all", **kw)))
  np.testing.assert_array_equal(rows["weights"] + rows["special_weights"], rows["targets"] != 0)
  # The scored bytes are the noise bytes of chunk c under the mask of default_rng([0, c]).
  raw = byte_vocab.encode(f.read_bytes())
  chunks = np.split(raw, np.arange(73, len(raw), 73))  # lengths(64).raw_length = 73
  expected = b"".join((chunk[_mask(chunk, seed=[0, c])] - 3).astype(np.uint8).tobytes()
                      for c, chunk in enumerate(chunks))
  scored = scoring.eval_scored_bytes(cfg, "all", **kw)
  assert scored == expected and len(scored) == rows["weights"].sum()
  assert len(chunks) * 2 == rows["special_weights"].sum()  # one sentinel and EOS a chunk


def test_span_eval_spread_sample(tmp_path):
  cfg = tp._docs_cfg(tmp_path, _low_byte_docs(5, n=60))
  kw = dict(seq_len=32, batch_size=3, batch_format=SPAN)
  whole = _eval_rows(list(pipeline.eval_batches(cfg, "all", **kw)))
  num_chunks = -(-len(_raw(cfg, "all")) // sc.lengths(32).raw_length)
  sample = list(pipeline.eval_batches(cfg, "all", max_batches=2, **kw))
  assert len(sample) == 2
  chunks = pipeline.eval_window_indices(num_chunks, 3, 2)
  rows = _eval_rows(sample)
  for key in KEYS:  # the same chunks with the same masks as in the whole-split eval
    np.testing.assert_array_equal(rows[key], whole[key][chunks])
  scored = scoring.eval_scored_bytes(cfg, "all", max_batches=2, **kw)
  assert len(scored) == rows["weights"].sum() > 0


def test_span_errors(tmp_path):
  with pytest.raises(corpora.DataError, match="synthetic and has no text to corrupt") as e:
    pipeline.make_train_dataset(tp._cfg(source="mqar"), seq_len=64, global_batch_size=4, seed=0,
                                batch_format=SPAN)
  assert "\n" not in str(e.value)
  with pytest.raises(corpora.DataError, match="synthetic and has no text to corrupt"):
    next(pipeline.eval_batches(tp._cfg(source="mqar"), "valid", seq_len=64, batch_size=4,
                               batch_format=SPAN))
  cfg = tp._random_text_cfg(tmp_path, 600)
  with pytest.raises(corpora.DataError, match="chunks of 73 raw bytes.*fewer than one global batch of 16"):
    pipeline.make_train_dataset(cfg, seq_len=64, global_batch_size=16, seed=0, batch_format=SPAN)
  with pytest.raises(corpora.DataError, match="cannot hold one span"):
    pipeline.make_train_dataset(cfg, seq_len=2, global_batch_size=1, seed=0, batch_format=SPAN)
  bad = tp._random_text_cfg(tmp_path, 600)
  bad.span_corruption = dict(noise_density=1.5, mean_noise_span_length=20.0)
  with pytest.raises(corpora.DataError, match="noise_density"):
    next(pipeline.eval_batches(bad, "train", seq_len=64, batch_size=4, batch_format=SPAN))
