"""General-purpose compressor baselines in bits per byte, to compare with a model's eval bpb.

compressed_bits_per_byte(data) compresses one byte string with Python's standard library:

* ``gzip``: gzip.compress(data, compresslevel=9, mtime=0) (DEFLATE level 9 in a gzip
  container: 18 bytes of header and trailer, fixed mtime so the result is deterministic);
* ``xz``: lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
  (what ``xz -9e`` writes, container overhead included);

and reports 8 * len(compressed) / len(data) for each. The model is scored on
scoring.eval_scored_bytes(...) (the weighted eval targets, EOS separators dropped), so pass
exactly those bytes: for a spread sample of separate windows, the windows' bytes concatenated in
scoring order, compressed as one string (the compressor may use earlier windows as context, as it
would for a whole file). Nothing is cached: each call compresses its input afresh (xz takes about a
second on 450 KB).
"""

import gzip
import lzma

GZIP_LEVEL = 9
XZ_PRESET = 9 | lzma.PRESET_EXTREME


def compressed_bits_per_byte(data: bytes) -> dict[str, float]:
  """Returns {"gzip": bpb, "xz": bpb}, each 8 * len(compressed) / len(data); see the module docstring."""
  data = bytes(data)
  if not data:
    raise ValueError("compressed_bits_per_byte needs at least one byte of data, got an empty input.")
  sizes = {
      "gzip": len(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)),
      "xz": len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=XZ_PRESET)),
  }
  return {name: 8.0 * size / len(data) for name, size in sizes.items()}
