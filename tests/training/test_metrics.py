"""Tests for MetricsLogger, ProgressBar, progress() and format_table."""

import glob
import io
import json
import math
import os
import re
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from training import metrics


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


def _events_files(workdir):
  return sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))


def _next_second():
  """Waits for the next wall-clock second. TensorBoard reads event files in name order, and a name is
  events.out.tfevents.<second>.<host>.<pid>.<per-process counter>: two files of one process in the same
  second sort by that counter as text (10 before 9), which a resumed run in a new process never hits."""
  start = int(time.time())
  while int(time.time()) == start:
    time.sleep(0.02)


def _tb_scalars(workdir):
  """{tag: [(step, value), ...]} as TensorBoard itself reads the directory."""
  acc = event_accumulator.EventAccumulator(workdir)
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
          for tag in acc.Tags()["scalars"]}


# ----------------------------------------------------------------------------
# MetricsLogger.
# ----------------------------------------------------------------------------


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path / "run")
  with metrics.MetricsLogger(workdir) as logger:
    logger.write(10, {"loss": 2.5, "lr": np.float32(0.001),
                      "tokens": np.int64(7)})
    logger.write(20, {"loss": 2.0})
    # The JSONL is flushed after each write: readable before close.
    assert _read_jsonl(workdir)[0] == {
        "step": 10, "loss": 2.5, "lr": pytest.approx(0.001), "tokens": 7}
  rows = _read_jsonl(workdir)
  assert rows[1] == {"step": 20, "loss": 2.0}
  assert isinstance(rows[0]["tokens"], int)
  assert len(_events_files(workdir)) == 1
  scalars = _tb_scalars(workdir)
  assert scalars["loss"] == [(10, 2.5), (20, 2.0)]
  assert scalars["lr"] == [(10, pytest.approx(0.001))]
  assert scalars["tokens"] == [(10, 7.0)]


def test_logger_non_finite_values_and_strings(tmp_path):
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
  scalars = {t: v[0][1] for t, v in _tb_scalars(workdir).items()}
  assert set(scalars) == {"loss", "gnorm", "neg", "arr"}
  assert math.isnan(scalars["loss"]) and math.isnan(scalars["arr"])
  assert scalars["gnorm"] == math.inf and scalars["neg"] == -math.inf


def test_logger_opens_files_lazily(tmp_path):
  workdir = str(tmp_path / "run")
  with metrics.MetricsLogger(workdir) as logger:
    logger.write(1, {})
    assert not os.path.exists(workdir)  # Nothing logged, nothing created.
    logger.write(1, {"note": "strings only"})
    assert _read_jsonl(workdir) == [{"step": 1, "note": "strings only"}]
    assert _events_files(workdir) == []  # No scalar yet: no events file.
    logger.write(2, {"loss": 1.0})
    assert len(_events_files(workdir)) == 1


def test_logger_rerun_does_not_duplicate(tmp_path):
  workdir = str(tmp_path)
  records = [(1, {"loss": 3.0}), (2, {"loss": 2.0}),
             (2, {"eval/bpb": 1.5, "eval/split": "valid"})]
  for _ in range(2):  # A finished run, then the same run again.
    with metrics.MetricsLogger(workdir) as logger:
      for step, record in records:
        logger.write(step, record)
  assert _read_jsonl(workdir) == [
      {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
      {"step": 2, "eval/bpb": 1.5, "eval/split": "valid"}]
  assert len(_events_files(workdir)) == 1  # The re-run opened no events file.
  assert _tb_scalars(workdir) == {"loss": [(1, 3.0), (2, 2.0)],
                                  "eval/bpb": [(2, 1.5)]}


def test_logger_resume_keeps_new_keys_only(tmp_path):
  workdir = str(tmp_path)
  with metrics.MetricsLogger(workdir) as logger:
    logger.write(1, {"loss": 3.0})
    logger.write(2, {"loss": 2.0})
    logger.write(2, {"loss": 9.0})  # Same logger, same (step, key): dropped.
  # A crash cut the last line short (no newline).
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 3, "lo')
  _next_second()
  with metrics.MetricsLogger(workdir) as logger:  # Resumed from step 1.
    logger.write(2, {"loss": 2.1, "eval/bpb": 1.4})  # Only eval/bpb is new.
    logger.write(3, {"loss": 1.0})
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = f.read().splitlines()
  assert lines[2] == '{"step": 3, "lo'  # Left alone, but terminated.
  rows = [json.loads(line) for i, line in enumerate(lines) if i != 2]
  assert rows == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
                  {"step": 2, "eval/bpb": 1.4}, {"step": 3, "loss": 1.0}]
  assert len(_events_files(workdir)) == 2  # New scalars: a second file.
  assert _tb_scalars(workdir) == {"loss": [(1, 3.0), (2, 2.0), (3, 1.0)],
                                  "eval/bpb": [(2, pytest.approx(1.4))]}


def test_logger_disabled_is_noop(tmp_path):
  workdir = str(tmp_path / "never")
  logger = metrics.MetricsLogger(workdir, enabled=False)
  logger.write(1, {"loss": 1.0})
  logger.close()
  logger.write(2, {"loss": 1.0})  # No-op even after close.
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


def test_progress_bar_non_tty_forced_line():
  stream, clock = io.StringIO(), FakeClock()
  bar = metrics.ProgressBar(100, stream=stream, clock=clock)
  bar.update(1, loss=3.0)  # First update: includes compilation.
  clock.t = 10.0
  bar.update(4, loss=2.5)  # Under 5% since the start: no line.
  assert stream.getvalue() == ""
  bar.update(11, force=True, loss=2.3456, tokens_per_s=4900.0)
  out = stream.getvalue()
  # 10 steps in 10 s (first update excluded) -> 89 steps left -> 89 s.
  assert out == "step 11/100 (11.0%) | loss 2.346 | 4.9k tok/s | eta 0:01:29\n"
  bar.close()
  bar.update(50, force=True)  # Ignored after close.
  assert stream.getvalue() == out


def test_progress_bar_non_tty_line_every_5_percent():
  stream, clock = io.StringIO(), FakeClock()
  with metrics.ProgressBar(1000, start_step=200, stream=stream,
                           clock=clock) as bar:
    for step in range(201, 1001):
      clock.t += 0.5
      bar.update(step, loss=1.0, force=step == 420)
  out = stream.getvalue()
  assert "\r" not in out
  steps = [int(m) for m in re.findall(r"^step (\d+)/1000", out, re.M)]
  # Every 50 steps (5% of 1000) since the last line; a forced line resets it.
  assert steps == [250, 300, 350, 400, 420, 470, 520, 570, 620, 670, 720, 770,
                   820, 870, 920, 970]
  first = out.splitlines()[0]
  # 49 steps in 24.5 s after the first update -> 750 left -> 375 s.
  assert first == "step 250/1000 (25.0%) | loss 1.000 | eta 0:06:15"


def test_progress_bar_fields_persist_and_eta_unknown_at_first():
  stream = io.StringIO()
  bar = metrics.ProgressBar(50, start_step=10, stream=stream, clock=FakeClock())
  bar.update(10, force=True, loss=1.0, tokens_per_s=2.5e6, grad_norm=0.5)
  bar.update(11, force=True, loss=0.9)
  first, second = stream.getvalue().splitlines()
  assert first.endswith("| 2.5M tok/s | grad_norm 0.5 | eta ?")
  assert "loss 0.900 | 2.5M tok/s" in second  # tokens_per_s kept.


def test_progress_bar_tty_uses_tqdm(monkeypatch):
  monkeypatch.setenv("COLUMNS", "120")
  stream = FakeTty()
  bar = metrics.ProgressBar(100, stream=stream, min_interval_s=0.0)
  bar.update(1, loss=3.0)
  bar.update(3, force=True, loss=2.8, tokens_per_s=2.5e6)
  out = stream.getvalue()
  assert out.startswith("\r") and "\n" not in out
  last = out.split("\r")[-1]
  assert "3/100" in last and "loss 2.800" in last and "2.5M tok/s" in last
  assert "step/s" in last
  start = len(out)
  bar.write("checkpoint saved")
  tail = stream.getvalue()[start:]
  msg_line, redraw = tail.split("\n")
  # The bar is cleared, the message gets its own line, the bar comes back.
  assert msg_line.endswith("\rcheckpoint saved")
  assert msg_line[:-len("checkpoint saved")].replace("\r", "").strip() == ""
  assert "3/100" in redraw
  bar.close()
  assert stream.getvalue().endswith("\n")


def test_progress_bar_write_non_tty_and_disabled():
  stream = io.StringIO()
  metrics.ProgressBar(10, stream=stream).write("hello")
  assert stream.getvalue() == "hello\n"
  for stream in (FakeTty(), io.StringIO()):
    with metrics.ProgressBar(10, stream=stream, enabled=False) as bar:
      bar.update(1, force=True, loss=1.0)
      bar.update(10, loss=1.0)
      bar.write("x")
    assert stream.getvalue() == ""


# ----------------------------------------------------------------------------
# progress() for evaluation loops.
# ----------------------------------------------------------------------------


def test_eval_progress_bytes_non_tty_lines():
  stream, clock = io.StringIO(), FakeClock()
  with metrics.progress(total=10_000_000, unit="B", desc="bpb valid",
                        stream=stream, clock=clock) as bar:
    for _ in range(40):
      clock.t += 0.25
      bar.update(250_000)  # 1 MB/s.
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue()
  assert len(lines) == 20  # 19 at 5%, 10%, ..., 95%, then the final one.
  assert lines[0] == ("bpb valid: 500kB/10.0MB (5%) | 1.00MB/s | eta 0:00:10")
  assert lines[9].startswith("bpb valid: 5.00MB/10.0MB (50%) |")
  assert lines[9].endswith("| eta 0:00:05")
  assert lines[-1] == ("bpb valid: 10.0MB/10.0MB (100%) | 1.00MB/s | "
                       "done in 0:00:10")


def test_eval_progress_iterable_non_tty():
  stream, clock = io.StringIO(), FakeClock()

  def batches():
    for i in range(7):
      clock.t += 2.0
      yield i

  items = list(metrics.progress(batches(), total=7, unit="batch", desc="eval",
                                stream=stream, clock=clock))
  assert items == list(range(7))  # Closed at the end of the iteration.
  lines = stream.getvalue().splitlines()
  assert lines[0] == "eval: 1/7 batch (14%) | 0.5 batch/s | eta 0:00:12"
  assert len(lines) == 7
  assert lines[-1] == "eval: 7/7 batch (100%) | 0.5 batch/s | done in 0:00:14"
  # len() gives the total; unknown totals print only the final line.
  stream = io.StringIO()
  list(metrics.progress(range(3), unit="seq", stream=stream, clock=FakeClock()))
  assert stream.getvalue().splitlines()[-1].startswith("3/3 seq (100%) |")
  stream = io.StringIO()
  with metrics.progress(unit="seq", stream=stream, clock=FakeClock()) as bar:
    bar.update(5)
  assert stream.getvalue() == "5 seq | ? seq/s | done in 0:00:00\n"


def test_eval_progress_tty_uses_tqdm(monkeypatch):
  monkeypatch.setenv("COLUMNS", "120")
  stream = FakeTty()
  with metrics.progress(total=3_000_000, unit="B", desc="bpb valid",
                        stream=stream) as bar:
    for _ in range(3):
      bar.update(1_000_000)
  out = stream.getvalue()
  assert out.startswith("\rbpb valid:")
  assert "3.00M/3.00M" in out and "B/s" in out and out.endswith("\n")


def test_eval_progress_disabled_is_noop():
  for stream in (FakeTty(), io.StringIO()):
    bar = metrics.progress(range(4), unit="batch", desc="eval", enabled=False,
                           stream=stream)
    assert list(bar) == [0, 1, 2, 3]  # Still iterates.
    with metrics.progress(total=10, unit="B", enabled=False,
                          stream=stream) as bar:
      bar.update(10)
      bar.write("x")
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
