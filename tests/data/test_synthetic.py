"""data/synthetic.py (passkey prompts, MQAR batches) and the `mqar` data source of data/pipeline.py."""

import re

import ml_collections
import numpy as np
import pytest

from data import bytes as byte_vocab
from data import corpora, pipeline, synthetic

KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def _equal_batches(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


# --- passkey ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [synthetic.passkey_fixed_bytes(), 300, 1000, 4096])
def test_passkey_prompt_exact_length_and_one_key(length):
  ids, keys = synthetic.passkey_batch(length, 6, seed=0)
  assert ids.shape == (6, length) and ids.dtype == np.int32
  for row, key in zip(ids, keys):
    text = byte_vocab.decode(row)
    assert len(text.encode("utf-8")) == length
    assert synthetic.PASSKEY_MIN <= key <= synthetic.PASSKEY_MAX
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    assert text.count(info) == 1
    assert re.findall(r"\d+", text) == [str(key), str(key)]  # the filler has no digits: K only, twice
    lines = text.split("\n")
    assert len(lines) == 5 and lines[0] == synthetic.PASSKEY_TASK_DESCRIPTION and lines[2] == info
    assert lines[4] == "What is the pass key? The pass key is"
    filler = (synthetic.PASSKEY_FILLER_SENTENCES + " ") * 100
    assert filler.startswith(lines[1]) and filler.startswith(lines[3])  # both restart the filler (spec code)
    assert len(lines[1]) + len(lines[3]) == length - synthetic.passkey_fixed_bytes()


def test_passkey_deterministic_seeded_and_split_point_random():
  a, ka = synthetic.passkey_batch(2000, 20, seed=3)
  b, kb = synthetic.passkey_batch(2000, 20, seed=3)
  c, kc = synthetic.passkey_batch(2000, 20, seed=4)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ka, kb)
  assert not np.array_equal(ka, kc)
  prefix_lengths = {len(byte_vocab.decode(row).split("\n")[1]) for row in a}
  assert len(prefix_lengths) > 10  # the needle's depth varies across trials


def test_passkey_too_short_is_a_clear_error():
  with pytest.raises(ValueError, match="needs at least 247 bytes"):
    synthetic.passkey_batch(synthetic.passkey_fixed_bytes() - 1, 1, seed=0)


# --- MQAR ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_pairs,seq_len", [(1, 3), (4, 15), (8, 64), (47, 200)])
def test_mqar_batch_format(num_pairs, seq_len):
  batch = synthetic.mqar_batch(np.arange(5), seed=1, num_pairs=num_pairs, seq_len=seq_len)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: ((5, seq_len), np.float32 if k == "weights" else np.int32) for k in KEYS}
  real = 4 * num_pairs - 1  # real targets per row
  for r in range(5):
    inputs, targets, weights = (batch[k][r] for k in ("inputs", "targets", "weights"))
    seq = np.concatenate([inputs[:real], targets[real - 1:real]]) - byte_vocab.BYTE_OFFSET
    keys, values = seq[0:2 * num_pairs:2], seq[1:2 * num_pairs:2]
    assert len(set(keys)) == num_pairs and set(keys) <= set(synthetic.MQAR_KEY_BYTES)
    assert len(set(values)) == num_pairs and set(values) <= set(synthetic.MQAR_VALUE_BYTES)
    pairs = dict(zip(keys, values))
    queries, answers = seq[2 * num_pairs::2], seq[2 * num_pairs + 1::2]
    assert sorted(queries) == sorted(keys)  # every key is queried once, after all the pairs
    assert [pairs[q] for q in queries] == list(answers)  # ... and answered with its own value
    # The weights mark exactly the targets that are query values, whose input is the query key.
    marked = np.flatnonzero(weights)
    np.testing.assert_array_equal(marked, 2 * num_pairs + 2 * np.arange(num_pairs))
    np.testing.assert_array_equal(inputs[marked] - byte_vocab.BYTE_OFFSET, queries)
    np.testing.assert_array_equal(targets[marked] - byte_vocab.BYTE_OFFSET, answers)
    assert set(np.unique(weights)) <= {0.0, 1.0}
    np.testing.assert_array_equal(targets[:-1][:real - 1], inputs[1:real])  # next-token targets
    np.testing.assert_array_equal(batch["segment_ids"][r], np.arange(seq_len) < real)
    np.testing.assert_array_equal(batch["positions"][r], np.where(np.arange(seq_len) < real,
                                                                  np.arange(seq_len), 0))
    assert np.all(inputs[real:] == byte_vocab.PAD_ID) and np.all(targets[real:] == byte_vocab.PAD_ID)


def test_mqar_deterministic_per_example_and_stream():
  kw = dict(seed=5, num_pairs=(2, 4, 8), seq_len=40)
  whole = synthetic.mqar_batch(np.arange(8), **kw)
  _equal_batches(whole, synthetic.mqar_batch(np.arange(8), **kw))
  # example i depends on i only (not on its batch): any process can build any rows
  _equal_batches({k: v[3:6] for k, v in whole.items()}, synthetic.mqar_batch(np.arange(3, 6), **kw))
  other_seed = synthetic.mqar_batch(np.arange(8), **{**kw, "seed": 6})
  other_stream = synthetic.mqar_batch(np.arange(8), stream="valid", **kw)
  assert not np.array_equal(whole["inputs"], other_seed["inputs"])
  assert not np.array_equal(whole["inputs"], other_stream["inputs"])
  real_lengths = set(whole["segment_ids"].sum(axis=1).tolist())
  assert real_lengths <= {7, 15, 31} and len(real_lengths) > 1  # the number of pairs is mixed


def test_mqar_errors():
  with pytest.raises(ValueError, match="needs seq_len >= 31"):
    synthetic.mqar_batch(np.arange(2), seed=0, num_pairs=8, seq_len=30)
  with pytest.raises(ValueError, match=r"in \[1, 47\]"):
    synthetic.mqar_num_pairs((4, 48))
  with pytest.raises(ValueError, match="must be integers"):
    synthetic.mqar_num_pairs(("four",))
  assert synthetic.mqar_num_pairs(("4", "8")) == (4, 8)  # as a command line gives them
  assert synthetic.mqar_num_pairs(16) == (16,)


# --- the `mqar` data source -----------------------------------------------------------------------------

def _mqar_data_config(num_pairs=(2, 4), eval_examples=10):
  return ml_collections.ConfigDict({"source": "mqar", "paths": (), "mqar": {
      "num_pairs": num_pairs, "eval_examples": eval_examples}})


def test_mqar_train_iterator_contract():
  cfg = _mqar_data_config()
  kw = dict(seq_len=20, global_batch_size=4, seed=7)
  it = pipeline.make_train_iterator(cfg, **kw)
  first = [next(it) for _ in range(3)]
  for k, batch in enumerate(first):  # batch k = examples [4k, 4k + 4) of the seed's train stream
    _equal_batches(batch, synthetic.mqar_batch(4 * k + np.arange(4), seed=7, num_pairs=(2, 4), seq_len=20))
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  restored = pipeline.make_train_iterator(cfg, **kw)
  restored.set_state(state)
  for a, b in zip(expected, [next(restored) for _ in range(4)]):
    _equal_batches(a, b)
  parts = [pipeline.make_train_iterator(cfg, process_index=p, process_count=2, **kw) for p in range(2)]
  for k in range(3):  # process-major sharding: the processes' rows concatenate to the 1-process batch
    local = [next(part) for part in parts]
    for key in KEYS:
      np.testing.assert_array_equal(np.concatenate([local[0][key], local[1][key]]), first[k][key])
  other_seed = next(pipeline.make_train_iterator(cfg, **{**kw, "seed": 8}))
  assert not np.array_equal(other_seed["inputs"], first[0]["inputs"])


def test_mqar_eval_batches():
  cfg = _mqar_data_config(eval_examples=10)
  valid = list(pipeline.eval_batches(cfg, "valid", seq_len=16, batch_size=4))
  assert len(valid) == 3
  assert [int((b["weights"].sum(axis=1) > 0).sum()) for b in valid] == [4, 4, 2]  # last batch padded
  assert np.all(valid[-1]["segment_ids"][2:] == 0)
  test = next(pipeline.eval_batches(cfg, "test", seq_len=16, batch_size=4))
  assert not np.array_equal(test["inputs"], valid[0]["inputs"])  # splits are different streams
  assert len(list(pipeline.eval_batches(cfg, "valid", seq_len=16, batch_size=4, max_batches=2))) == 2


def test_mqar_source_errors():
  with pytest.raises(corpora.DataError, match="needs seq_len >= 15"):
    pipeline.make_train_iterator(_mqar_data_config(), seq_len=14, global_batch_size=2, seed=0)
  with pytest.raises(corpora.DataError, match="data.mqar.num_pairs"):
    pipeline.make_train_iterator(_mqar_data_config(num_pairs=(0,)), seq_len=64, global_batch_size=2, seed=0)
  with pytest.raises(corpora.DataError, match="is synthetic"):
    corpora.open_split(_mqar_data_config(), "train")


@pytest.mark.parametrize("seq_len", [256, 300])
def test_copy_probes_score_exactly_the_copied_bytes(seq_len):
  """passkey_repeat / passkey_answer: the weights mark the key's five digits at its second occurrence / in
  the answer; repeat_*: the second copy of the random string after its first byte."""
  for probe in ("passkey_repeat", "passkey_answer"):
    batch = synthetic.copy_probe_batch(probe, np.arange(6), seed=3, seq_len=seq_len)
    for row in range(6):
      real = batch["segment_ids"][row] > 0
      text = byte_vocab.decode(batch["inputs"][row][real]) + byte_vocab.decode(batch["targets"][row][real][-1:])
      key = str(synthetic.first_key(text.encode()))
      scored = np.flatnonzero(batch["weights"][row])
      assert byte_vocab.decode(batch["targets"][row][scored]) == key and np.all(np.diff(scored) == 1)
      before = text[:scored[0] + 1]  # the target at input position t is text[t + 1]
      assert before.endswith("Remember it. " if probe == "passkey_repeat" else "The pass key is ")
      assert before.count(key) == (1 if probe == "passkey_repeat" else 2)
  for probe, alphabet in (("repeat_digits", "0123456789"), ("repeat_letters", "abcdefghijklmnopqrstuvwxyz")):
    batch = synthetic.copy_probe_batch(probe, np.arange(4), seed=3, seq_len=seq_len)
    half = seq_len // 2 + 1
    window = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    assert np.array_equal(window[:, half:], window[:, :seq_len + 1 - half])
    assert set(byte_vocab.decode(window[0])) <= set(alphabet)
    assert np.array_equal(np.flatnonzero(batch["weights"][0]), np.arange(half, seq_len))
    assert np.all(batch["segment_ids"] == 1)
  rows_2_3 = synthetic.copy_probe_batch("repeat_letters", np.array([2, 3]), seed=3, seq_len=seq_len)
  _equal_batches(rows_2_3, {k: v[2:4] for k, v in batch.items()})  # a row is a function of its index


def test_copy_probe_errors():
  with pytest.raises(ValueError, match="unknown copy probe 'nope'"):
    synthetic.copy_probe_batch("nope", np.arange(2), seed=0, seq_len=256)
  with pytest.raises(ValueError, match=r"need seq_len >= 254 .*got 128"):
    synthetic.copy_probe_batch("passkey_answer", np.arange(2), seed=0, seq_len=128)
  assert synthetic.copy_probe_batch("repeat_letters", np.arange(2), seed=0, seq_len=16)["inputs"].shape == (2, 16)
