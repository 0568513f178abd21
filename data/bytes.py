"""Byte-level vocabulary (ByT5 convention): no tokenizer, byte b is id b + 3.

ids: 0 pad, 1 eos, 2 unk, 3..258 the 256 byte values. Extra special ids (landmark
token, sentinels) are allocated above 258 by the code that needs them.
"""

from typing import Any

import numpy as np

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET  # 259


def encode(text: str | bytes) -> np.ndarray:
  """Returns int32 ids [len(utf8 bytes)]; str is utf-8 encoded first."""
  if isinstance(text, str):
    text = text.encode("utf-8")
  return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32) + BYTE_OFFSET


def is_byte_id(ids: Any) -> np.ndarray:
  """Returns bool array (same shape as ids): True where id encodes a byte."""
  ids = np.asarray(ids)
  return (ids >= BYTE_OFFSET) & (ids < VOCAB_SIZE)


def decode(ids: Any) -> str:
  """Decodes a 1-D id sequence to text; special and out-of-range ids are dropped.

  Invalid utf-8 (e.g. a multi-byte char cut by a window edge) is ignored.
  """
  ids = np.asarray(ids).reshape(-1)
  byte_values = (ids[is_byte_id(ids)] - BYTE_OFFSET).astype(np.uint8)
  return byte_values.tobytes().decode("utf-8", errors="ignore")
