"""Tests for data/bytes.py."""

import numpy as np

from data import bytes as byte_vocab


def test_constants_follow_byt5():
  assert (byte_vocab.PAD_ID, byte_vocab.EOS_ID, byte_vocab.UNK_ID) == (0, 1, 2)
  assert byte_vocab.BYTE_OFFSET == 3 and byte_vocab.VOCAB_SIZE == 259


def test_encode_maps_byte_to_id_plus_three():
  ids = byte_vocab.encode(b"\x00A\xff")
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [3, 65 + 3, 255 + 3])
  assert byte_vocab.encode("").shape == (0,)


def test_round_trip_ascii_and_non_ascii():
  for text in ["hello, world\n", "naïve café — 日本語 🙂", ""]:
    ids = byte_vocab.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert byte_vocab.decode(ids) == text
    assert byte_vocab.decode(ids.tolist()) == text


def test_decode_drops_special_and_out_of_range_ids():
  ids = np.concatenate([[0, 1, 2], byte_vocab.encode("ab"), [1, 259, 300], byte_vocab.encode("c")])
  assert byte_vocab.decode(ids) == "abc"


def test_decode_ignores_cut_multibyte_chars():
  ids = byte_vocab.encode("é")[:1]  # first byte of a 2-byte char
  assert byte_vocab.decode(ids) == ""


def test_is_byte_id():
  mask = byte_vocab.is_byte_id(np.array([[0, 1, 2, 3], [100, 258, 259, 400]]))
  np.testing.assert_array_equal(mask, [[False, False, False, True], [True, True, False, False]])
