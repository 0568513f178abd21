"""Tests for the dependency-free TensorBoard event writer/reader."""

import glob
import math
import os
import re
import socket
import struct
import time

import pytest

from training import tensorboard as tb


def _event_files(logdir):
  return sorted(glob.glob(os.path.join(str(logdir), "events.out.tfevents.*")))


def test_crc32c_known_vectors():
  assert tb.crc32c(b"123456789") == 0xE3069283
  assert tb.crc32c(b"") == 0
  assert tb.crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 B.4 vector.


def test_file_name(tmp_path):
  with tb.EventWriter(str(tmp_path)) as w:
    path = w.path
  assert os.path.dirname(path) == str(tmp_path)
  match = re.fullmatch(r"events\.out\.tfevents\.(\d+)\.(.+)",
                       os.path.basename(path))
  assert match is not None
  assert abs(int(match.group(1)) - time.time()) < 60
  assert match.group(2) == socket.gethostname()


def test_write_read_roundtrip(tmp_path):
  with tb.EventWriter(str(tmp_path)) as w:
    w.scalars(1, {"loss": 2.5, "lr": 3e-4})
    w.scalars(2, {"loss": 2.25, "tokens": 1024})  # int is cast to float.
    w.scalars(10**12, {"big_step": 1.0})
  (path,) = _event_files(tmp_path)
  got = tb.read_scalars(path)
  assert [(s, t) for s, t, _ in got] == [(1, "loss"), (1, "lr"), (2, "loss"),
                                         (2, "tokens"), (10**12, "big_step")]
  values = [v for _, _, v in got]
  assert values == pytest.approx([2.5, 3e-4, 2.25, 1024.0, 1.0], rel=1e-6)


def test_skips_non_numeric_and_keeps_non_finite(tmp_path):
  with tb.EventWriter(str(tmp_path)) as w:
    w.scalars(3, {"name": "run", "none": None, "list": [1, 2], "nan": math.nan,
                  "inf": math.inf, "huge": 1e300, "flag": True})
    w.scalars(4, {"only_text": "x"})  # Nothing numeric: no event at all.
  got = tb.read_scalars(_event_files(tmp_path)[0])
  tags = {t: v for _, t, v in got}
  assert set(tags) == {"nan", "inf", "huge", "flag"}
  assert math.isnan(tags["nan"])
  assert tags["inf"] == math.inf
  assert tags["huge"] == math.inf  # Saturates beyond float32 range.
  assert tags["flag"] == 1.0


def test_negative_step_roundtrip(tmp_path):
  with tb.EventWriter(str(tmp_path)) as w:
    w.scalars(-5, {"x": 1.0})
  assert tb.read_scalars(_event_files(tmp_path)[0]) == [(-5, "x", 1.0)]


def test_first_record_is_file_version(tmp_path):
  with tb.EventWriter(str(tmp_path)) as w:
    w.scalars(1, {"x": 1.0})
  with open(_event_files(tmp_path)[0], "rb") as f:
    data = f.read()
  (length,) = struct.unpack_from("<Q", data, 0)
  first = data[12:12 + length]
  assert b"brain.Event:2" in first
  assert tb.read_scalars(_event_files(tmp_path)[0]) == [(1, "x", 1.0)]


@pytest.mark.parametrize("where", ["length", "length_crc", "data", "data_crc"])
def test_corruption_detected(tmp_path, where):
  with tb.EventWriter(str(tmp_path)) as w:
    w.scalars(7, {"loss": 1.5})
  path = _event_files(tmp_path)[0]
  with open(path, "rb") as f:
    data = bytearray(f.read())
  (first_len,) = struct.unpack_from("<Q", data, 0)
  base = 12 + first_len + 4  # Start of the second (scalar) record.
  (length,) = struct.unpack_from("<Q", data, base)
  offset = {"length": base, "length_crc": base + 8, "data": base + 12 + 3,
            "data_crc": base + 12 + length}[where]
  data[offset] ^= 0x01
  with open(path, "wb") as f:
    f.write(bytes(data))
  with pytest.raises(ValueError):
    tb.read_scalars(path)


def test_truncated_file_raises(tmp_path):
  with tb.EventWriter(str(tmp_path)) as w:
    w.scalars(1, {"loss": 1.0})
  path = _event_files(tmp_path)[0]
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-3])
  with pytest.raises(ValueError):
    tb.read_scalars(path)


def test_write_after_close_raises(tmp_path):
  w = tb.EventWriter(str(tmp_path))
  w.close()
  w.close()  # Idempotent.
  with pytest.raises(ValueError):
    w.scalars(1, {"x": 1.0})


def test_cross_check_tensorboard_event_accumulator(tmp_path):
  ea_mod = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  with tb.EventWriter(str(tmp_path)) as w:
    for step in range(1, 4):
      w.scalars(step, {"train/loss": 1.0 / step, "train/lr": 0.1})
  acc = ea_mod.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr"}
  events = acc.Scalars("train/loss")
  assert [e.step for e in events] == [1, 2, 3]
  assert [e.value for e in events] == pytest.approx([1.0, 0.5, 1.0 / 3],
                                                    rel=1e-6)


def test_cross_check_tensorboardx_protobuf(tmp_path):
  """Our hand-encoded records parse with the real protobuf definitions."""
  pytest.importorskip("tensorboardX")
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  with tb.EventWriter(str(tmp_path)) as w:
    w.scalars(5, {"a": 0.25, "b": -1.5})
  with open(_event_files(tmp_path)[0], "rb") as f:
    data = f.read()
  events, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack_from("<Q", data, pos)
    events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
    pos += 12 + length + 4
  assert events[0].file_version == "brain.Event:2"
  assert events[0].wall_time > 0
  assert events[1].step == 5
  assert [(v.tag, v.simple_value) for v in events[1].summary.value] == [
      ("a", 0.25), ("b", -1.5)]


def test_reads_tensorboardx_written_file(tmp_path):
  tensorboardX = pytest.importorskip("tensorboardX")
  with tensorboardX.SummaryWriter(str(tmp_path)) as w:
    w.add_scalar("loss", 0.5, global_step=3)
    w.add_scalar("loss", 0.25, global_step=4)
  got = []
  for path in _event_files(tmp_path):
    got.extend(tb.read_scalars(path))
  assert got == [(3, "loss", 0.5), (4, "loss", 0.25)]
