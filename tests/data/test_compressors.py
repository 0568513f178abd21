"""Tests for data/compressors.py."""

import gzip
import lzma

import numpy as np
import pytest

from data import compressors


def test_random_bytes_do_not_compress():
  data = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
  bpb = compressors.compressed_bits_per_byte(data)
  assert set(bpb) == {"gzip", "xz"}
  for value in bpb.values():
    assert 8.0 <= value < 8.1  # incompressible: a little container overhead


def test_repetitive_text_compresses_far_below_8():
  data = b"the quick brown fox jumps over the lazy dog.\n" * 2000
  bpb = compressors.compressed_bits_per_byte(data)
  assert bpb["gzip"] < 0.2 and bpb["xz"] < 0.1


def test_values_are_the_stated_formula():
  data = ("def f(x):\n  return x + 1  # héllo\n" * 50).encode("utf-8")
  bpb = compressors.compressed_bits_per_byte(data)
  assert bpb["gzip"] == 8 * len(gzip.compress(data, compresslevel=9, mtime=0)) / len(data)
  xz = lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
  assert bpb["xz"] == 8 * len(xz) / len(data)
  assert lzma.decompress(xz) == data
  assert compressors.compressed_bits_per_byte(bytearray(data)) == bpb  # deterministic, any buffer


def test_empty_input_raises():
  with pytest.raises(ValueError, match="needs at least one byte"):
    compressors.compressed_bits_per_byte(b"")
