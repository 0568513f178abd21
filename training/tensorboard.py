"""Dependency-free TensorBoard event-file writer and reader for scalars.

Encodes the few protobuf messages needed (Event, Summary, Summary.Value) by
hand and frames them as TFRecords, so logging needs no tensorflow, tensorboardX
or protobuf install. The reader parses the same subset back for tests/tooling.

Record framing (TFRecord):
  uint64 length (LE) | uint32 masked_crc32c(length bytes) |
  data | uint32 masked_crc32c(data)
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, BinaryIO

__all__ = ["EventWriter", "crc32c", "masked_crc32c", "read_scalars"]

_FILE_VERSION = "brain.Event:2"
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF

# Protobuf wire types.
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _make_crc32c_table() -> tuple[int, ...]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`; pure Python, fine for small records."""
  crc = _U32
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ _U32


def masked_crc32c(data: bytes) -> int:
  """TFRecord-style masked CRC (masking avoids CRCs of CRCs being weak)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


# ----------------------------------------------------------------------------
# Protobuf encoding.
# ----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
  value &= _U64  # Negative int64 -> 10-byte two's complement, as protobuf does.
  out = bytearray()
  while value >= 0x80:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
  return _key(field, _LEN) + _varint(len(payload)) + payload


def _pack_float32(value: float) -> bytes:
  try:
    return struct.pack("<f", value)
  except OverflowError:  # Finite doubles beyond float32 range saturate to inf.
    return struct.pack("<f", math.copysign(math.inf, value))


def _encode_value(tag: str, value: float) -> bytes:
  return (_len_field(1, tag.encode("utf-8")) + _key(2, _FIXED32) +
          _pack_float32(value))


def _encode_event(wall_time: float, step: int, *,
                  file_version: str | None = None,
                  summary: bytes | None = None) -> bytes:
  out = _key(1, _FIXED64) + struct.pack("<d", wall_time)
  if step:
    out += _key(2, _VARINT) + _varint(step)
  if file_version is not None:
    out += _len_field(3, file_version.encode("utf-8"))
  if summary is not None:
    out += _len_field(5, summary)
  return out


def _frame(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data +
          struct.pack("<I", masked_crc32c(data)))


def _as_float(value: Any) -> float | None:
  """float(value), or None for values that are not numeric scalars."""
  if isinstance(value, (str, bytes)):  # float("1.5") works but is not a metric.
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


# ----------------------------------------------------------------------------
# Writer.
# ----------------------------------------------------------------------------


class EventWriter:
  """Writes scalar summaries to `<logdir>/events.out.tfevents.<time>.<host>`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
    self.path = os.path.join(logdir, name)
    # Append: a writer re-created within the same second must not truncate
    # the previous file; a repeated file_version record is harmless.
    self._file: BinaryIO | None = open(self.path, "ab")
    self._write_record(_encode_event(now, 0, file_version=_FILE_VERSION))
    self.flush()

  def _write_record(self, data: bytes) -> None:
    if self._file is None:
      raise ValueError("EventWriter is closed.")
    self._file.write(_frame(data))

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """Writes one Event at `step` with one Value per numeric entry."""
    summary = b""
    for tag, value in values.items():
      fvalue = _as_float(value)
      if fvalue is not None:
        summary += _len_field(1, _encode_value(str(tag), fvalue))
    if summary:
      self._write_record(
          _encode_event(time.time(), int(step), summary=summary))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.flush()
      self._file.close()
      self._file = None

  def __enter__(self) -> EventWriter:
    return self

  def __exit__(self, exc_type: type[BaseException] | None,
               exc: BaseException | None, tb: TracebackType | None) -> None:
    self.close()


# ----------------------------------------------------------------------------
# Reader.
# ----------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError("Truncated varint.")
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7
    if shift >= 70:
      raise ValueError("Varint too long.")


def _fields(buf: bytes):
  """Yields (field_number, wire_type, value) for each field in a message."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    field, wire_type = key >> 3, key & 7
    if wire_type == _VARINT:
      value, pos = _read_varint(buf, pos)
    elif wire_type in (_FIXED64, _FIXED32):
      size = 8 if wire_type == _FIXED64 else 4
      value = buf[pos:pos + size]
      pos += size
    elif wire_type == _LEN:
      size, pos = _read_varint(buf, pos)
      value = buf[pos:pos + size]
      pos += size
    else:
      raise ValueError(f"Unsupported wire type {wire_type}.")
    if pos > len(buf):
      raise ValueError("Truncated protobuf field.")
    yield field, wire_type, value


def _decode_scalar_tensor(buf: bytes) -> float | None:
  """Scalar from a TensorProto (TF2-style summaries); float/double only."""
  dtype, values = 0, []
  for field, wire_type, value in _fields(buf):
    if field == 1 and wire_type == _VARINT:
      dtype = value
    elif field == 4 and wire_type == _LEN:  # tensor_content
      values.append(("content", value))
    elif field == 5:  # float_val (packed or not)
      values.append(("f", value))
    elif field == 6:  # double_val
      values.append(("d", value))
  for kind, raw in values:
    if kind == "f" or (kind == "content" and dtype == 1):
      if len(raw) >= 4:
        return struct.unpack_from("<f", raw)[0]
    elif kind == "d" or (kind == "content" and dtype == 2):
      if len(raw) >= 8:
        return struct.unpack_from("<d", raw)[0]
  return None


def _iter_records(data: bytes):
  pos = 0
  while pos < len(data):
    if pos + 12 > len(data):
      raise ValueError(f"Truncated record header at offset {pos}.")
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack_from("<I", data, pos + 8)
    if header_crc != masked_crc32c(header):
      raise ValueError(f"Length CRC mismatch at offset {pos}.")
    start = pos + 12
    end = start + length
    if end + 4 > len(data):
      raise ValueError(f"Truncated record at offset {pos}.")
    payload = data[start:end]
    (data_crc,) = struct.unpack_from("<I", data, end)
    if data_crc != masked_crc32c(payload):
      raise ValueError(f"Data CRC mismatch at offset {pos}.")
    yield payload
    pos = end + 4


def read_scalars(path: str) -> list[tuple[int, str, float]]:
  """Parses an event file into (step, tag, value) tuples in file order.

  Raises:
    ValueError: on a CRC mismatch, truncation or malformed protobuf.
  """
  with open(path, "rb") as f:
    data = f.read()
  out = []
  for record in _iter_records(data):
    step, summaries = 0, []
    for field, wire_type, value in _fields(record):
      if field == 2 and wire_type == _VARINT:
        step = value - (1 << 64) if value >= (1 << 63) else value
      elif field == 5 and wire_type == _LEN:
        summaries.append(value)
    for summary in summaries:
      for field, wire_type, value_msg in _fields(summary):
        if field != 1 or wire_type != _LEN:
          continue
        tag, scalar = None, None
        for vfield, vwire, v in _fields(value_msg):
          if vfield == 1 and vwire == _LEN:
            tag = v.decode("utf-8")
          elif vfield == 2 and vwire == _FIXED32:
            scalar = struct.unpack("<f", v)[0]
          elif vfield == 8 and vwire == _LEN and scalar is None:
            scalar = _decode_scalar_tensor(v)
        if tag is not None and scalar is not None:
          out.append((step, tag, scalar))
  return out
