"""Tests for MetricsLogger, ProgressBar and format_table."""

import glob
import io
import json
import math
import os

import numpy as np
import pytest

from training import metrics
from training.tensorboard import read_scalars


class FakeTty(io.StringIO):

  def isatty(self):
    return True


class FakeClock:

  def __init__(self, t=0.0):
    self.t = t

  def __call__(self):
    return self.t


def _read_jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _all_scalars(workdir):
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    out.extend(read_scalars(path))
  return out


# ----------------------------------------------------------------------------
# MetricsLogger.
# ----------------------------------------------------------------------------


def test_logger_writes_jsonl_and_events(tmp_path):
  workdir = str(tmp_path / "run")
  with metrics.MetricsLogger(workdir) as logger:
    logger.write(10, {"loss": 2.5, "lr": np.float32(0.001),
                      "tokens": np.int64(7)})
    # Flushed after each write: readable before close.
    assert _read_jsonl(workdir) == [
        {"step": 10, "loss": 2.5, "lr": pytest.approx(0.001), "tokens": 7}]
    assert sorted(t for _, t, _ in _all_scalars(workdir)) == ["loss", "lr",
                                                              "tokens"]
  rows = _read_jsonl(workdir)
  assert isinstance(rows[0]["tokens"], int)


def test_logger_appends_across_instances(tmp_path):
  workdir = str(tmp_path)
  with metrics.MetricsLogger(workdir) as logger:
    logger.write(1, {"loss": 3.0})
    logger.write(2, {"loss": 2.0})
  with metrics.MetricsLogger(workdir) as logger:  # Resumed run.
    logger.write(3, {"loss": 1.0})
  assert [(r["step"], r["loss"]) for r in _read_jsonl(workdir)] == [
      (1, 3.0), (2, 2.0), (3, 1.0)]
  assert sorted((s, v) for s, _, v in _all_scalars(workdir)) == [
      (1, 3.0), (2, 2.0), (3, 1.0)]


def test_logger_non_finite_values_stay_valid_json(tmp_path):
  workdir = str(tmp_path)
  with metrics.MetricsLogger(workdir) as logger:
    logger.write(1, {"loss": math.nan, "gnorm": math.inf, "neg": -math.inf,
                     "arr": np.array(np.nan, np.float32), "note": "warmup"})
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    text = f.read()
  assert "NaN" not in text and "Infinity" not in text
  (row,) = [json.loads(line) for line in text.splitlines()]
  assert row == {"step": 1, "loss": "nan", "gnorm": "inf", "neg": "-inf",
                 "arr": "nan", "note": "warmup"}
  # TensorBoard keeps the real non-finite values and skips the string.
  scalars = {t: v for _, t, v in _all_scalars(workdir)}
  assert set(scalars) == {"loss", "gnorm", "neg", "arr"}
  assert math.isnan(scalars["loss"]) and scalars["neg"] == -math.inf


def test_logger_disabled_is_noop(tmp_path):
  workdir = str(tmp_path / "never")
  logger = metrics.MetricsLogger(workdir, enabled=False)
  logger.write(1, {"loss": 1.0})
  logger.close()
  assert not os.path.exists(workdir)


def test_logger_write_after_close_raises(tmp_path):
  logger = metrics.MetricsLogger(str(tmp_path))
  logger.close()
  logger.close()
  with pytest.raises(ValueError):
    logger.write(1, {"loss": 1.0})


# ----------------------------------------------------------------------------
# ProgressBar.
# ----------------------------------------------------------------------------


def test_progress_non_tty_writes_only_when_forced():
  stream, clock = io.StringIO(), FakeClock()
  bar = metrics.ProgressBar(100, stream=stream, clock=clock)
  bar.update(1, loss=3.0)  # First update: includes compilation.
  clock.t = 10.0
  bar.update(11, loss=2.5, tokens_per_s=1234.0)
  assert stream.getvalue() == ""
  bar.update(11, force=True, loss=2.3456, tokens_per_s=1234.0)
  out = stream.getvalue()
  assert out.count("\n") == 1 and "\r" not in out
  assert "11/100" in out
  assert "loss 2.346" in out
  assert "1.2k tok/s" in out
  # 10 steps in 10 s (first update excluded) -> 89 steps left -> 89 s.
  assert "eta 0:01:29" in out
  bar.close()
  assert stream.getvalue() == out


def test_progress_eta_unknown_on_first_update():
  stream = io.StringIO()
  bar = metrics.ProgressBar(50, start_step=10, stream=stream, clock=FakeClock())
  bar.update(10, force=True, loss=1.0)
  assert "eta ?" in stream.getvalue()


def test_progress_tty_redraws_with_carriage_return(monkeypatch):
  monkeypatch.setenv("COLUMNS", "120")  # Line is cut to the terminal width.
  stream, clock = FakeTty(), FakeClock()
  bar = metrics.ProgressBar(100, stream=stream, clock=clock, min_interval_s=1.0)
  bar.update(1, loss=3.0)
  assert stream.getvalue().startswith("\r")
  clock.t = 0.5
  before = stream.getvalue()
  bar.update(2, loss=2.9)  # Rate-limited: within min_interval_s.
  assert stream.getvalue() == before
  clock.t = 2.0
  bar.update(3, loss=2.8, tokens_per_s=2.5e6)
  out = stream.getvalue()
  assert out.count("\r") == 2
  assert "\n" not in out
  last = out.split("\r")[-1]
  assert "3/100" in last and "loss 2.800" in last and "2.5M tok/s" in last
  assert "eta 0:01:37" in last  # 2 steps / 2 s -> 97 steps left.
  bar.close()
  assert stream.getvalue().endswith("\n")


def test_progress_tty_write_clears_line_and_redraws(monkeypatch):
  monkeypatch.setenv("COLUMNS", "120")
  stream = FakeTty()
  bar = metrics.ProgressBar(10, stream=stream, clock=FakeClock())
  bar.update(5, loss=1.0)
  start = len(stream.getvalue())
  bar.write("checkpoint saved")
  tail = stream.getvalue()[start:]
  # Clear the bar, print the message on its own line, then redraw the bar.
  assert tail.startswith("\r")
  msg_line, redraw = tail.split("\n")
  assert msg_line.endswith("\rcheckpoint saved")
  assert msg_line[1:-len("checkpoint saved") - 1].strip() == ""
  assert redraw.startswith("\r") and "5/10" in redraw


def test_progress_tty_line_fits_terminal(monkeypatch):
  monkeypatch.setenv("COLUMNS", "30")
  stream = FakeTty()
  bar = metrics.ProgressBar(1000, stream=stream, clock=FakeClock())
  bar.update(5, loss=1.0, tokens_per_s=5e4, grad_norm=0.5)
  line = stream.getvalue()[1:]
  assert len(line) <= 29 and "[" not in line  # No room left for the bar.
  monkeypatch.setenv("COLUMNS", "200")
  bar.update(500, force=True, loss=1.0)
  line = stream.getvalue().split("\r")[-1]
  assert line.startswith("[##########..........] 500/1000")


def test_progress_non_tty_write_and_disabled():
  stream = io.StringIO()
  metrics.ProgressBar(10, stream=stream).write("hello")
  assert stream.getvalue() == "hello\n"
  stream = FakeTty()
  bar = metrics.ProgressBar(10, stream=stream, enabled=False)
  bar.update(1, force=True, loss=1.0)
  bar.write("x")
  bar.close()
  assert stream.getvalue() == ""


# ----------------------------------------------------------------------------
# format_table.
# ----------------------------------------------------------------------------


def test_format_table_alignment():
  rows = [{"model": "mha", "loss": 2.5, "step": 100},
          {"model": "gqa-long-name", "loss": 12.25, "step": 5}]
  lines = metrics.format_table(rows).splitlines()
  assert lines[0].split() == ["model", "loss", "step"]
  assert set(lines[1].replace(" ", "")) == {"-"}
  assert lines[2].split() == ["mha", "2.5000", "100"]
  assert lines[3].split() == ["gqa-long-name", "12.2500", "5"]
  # Equal widths: text left-aligned, numbers right-aligned.
  assert len(lines[1]) == len(lines[2]) == len(lines[3])
  assert lines[2].startswith("mha ")
  assert lines[2].index("2.5000") + 6 == lines[3].index("12.2500") + 7
  assert lines[2].endswith("100") and lines[3].endswith("  5")


def test_format_table_columns_and_missing():
  rows = [{"a": 1, "b": float("nan")}, {"a": 2, "c": "x"}]
  table = metrics.format_table(rows, columns=["c", "a"])
  lines = table.splitlines()
  assert lines[0].split() == ["c", "a"]
  assert lines[2].split() == ["1"]  # Missing "c" -> empty cell.
  assert lines[3].split() == ["x", "2"]
  assert "nan" in metrics.format_table(rows)
  assert metrics.format_table([]) == ""
  assert metrics.format_table([], columns=["x"]).splitlines()[0] == "x"
