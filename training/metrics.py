"""Metric logging (JSONL + TensorBoard), a console progress bar, and tables."""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TextIO

from training.tensorboard import EventWriter

__all__ = ["MetricsLogger", "ProgressBar", "format_table"]

METRICS_FILENAME = "metrics.jsonl"
_BAR_WIDTH = 20


def _to_python(value: Any) -> Any:
  """Converts numpy/JAX 0-d arrays and scalars to Python scalars."""
  if isinstance(value, (str, bool, int, float)) or value is None:
    return value
  if getattr(value, "shape", None) == () and hasattr(value, "item"):
    return value.item()  # Also forces a device->host transfer for JAX arrays.
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  return value


def _json_value(value: Any) -> Any:
  """A JSON-safe value; non-finite floats become "nan"/"inf"/"-inf" strings."""
  value = _to_python(value)
  if value is None or isinstance(value, (str, bool, int)):
    return value
  if isinstance(value, float):
    if math.isnan(value):
      return "nan"
    if math.isinf(value):
      return "inf" if value > 0 else "-inf"
    return value
  return str(value)


class MetricsLogger:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard event files.

  With enabled=False (non-zero JAX processes) every method is a no-op and no
  files are created.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._jsonl: TextIO | None = None
    self._events: EventWriter | None = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      # Append so a resumed run continues the same file.
      self._jsonl = open(os.path.join(workdir, METRICS_FILENAME), "a",
                         encoding="utf-8")
      self._events = EventWriter(workdir)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs `metrics` at `step` to both sinks and flushes them."""
    if not self.enabled:
      return
    if self._jsonl is None or self._events is None:
      raise ValueError("MetricsLogger is closed.")
    step = int(step)
    record = {"step": step}
    record.update((str(k), _json_value(v)) for k, v in metrics.items())
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    # Flush every write: cheap at log frequency, keeps files usable on crash.
    self._jsonl.flush()
    self._events.scalars(step, {k: _to_python(v) for k, v in metrics.items()})
    self._events.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._events is not None:
      self._events.close()
      self._events = None

  def __enter__(self) -> MetricsLogger:
    return self

  def __exit__(self, exc_type: type[BaseException] | None,
               exc: BaseException | None, tb: TracebackType | None) -> None:
    self.close()


def _format_si(value: float) -> str:
  """1234 -> "1.2k", 3.4e6 -> "3.4M"."""
  for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= threshold:
      return f"{value / threshold:.1f}{suffix}"
  return f"{value:.0f}"


def _format_duration(seconds: float) -> str:
  """h:mm:ss; hours grow past 24 rather than adding a day field."""
  seconds = max(0, int(round(seconds)))
  hours, rem = divmod(seconds, 3600)
  minutes, secs = divmod(rem, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


def _format_field(value: Any) -> str:
  value = _to_python(value)
  if isinstance(value, float):
    return f"{value:.3g}"
  return str(value)


class ProgressBar:
  """Training progress on the console.

  On a TTY, redraws a single line with "\\r" (rate-limited by min_interval_s).
  Elsewhere (log files, CI) prints a plain line only on update(force=True),
  which the training loop passes at its log steps.

  Args:
    total_steps: last step of the run (the bar's 100%).
    start_step: step the run (re)starts from; informational, the rate/ETA
      reference is the first update() since it includes compilation.
    stream: text stream; defaults to sys.stderr at construction time.
    enabled: False on non-zero JAX processes; every method is then a no-op.
    min_interval_s: minimum seconds between TTY redraws (unless forced).
    clock: monotonic time source, injectable for tests.
  """

  def __init__(self, total_steps: int, *, start_step: int = 0,
               stream: TextIO | None = None, enabled: bool = True,
               min_interval_s: float = 0.2,
               clock: Callable[[], float] = time.monotonic):
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    # Resolved at call time so pytest capture/redirection of stderr works.
    self.stream = stream if stream is not None else sys.stderr
    self.enabled = enabled
    self.min_interval_s = min_interval_s
    self._clock = clock
    isatty = getattr(self.stream, "isatty", None)
    self._tty = bool(isatty and isatty())
    # Rate reference: the first update (it includes compilation time).
    self._first_time: float | None = None
    self._first_step: int | None = None
    self._last_draw: float | None = None
    self._line = ""  # Last line drawn on the TTY ("" when none visible).
    self._closed = False

  def _eta_s(self, step: int, now: float) -> float | None:
    if self._first_step is None or step <= self._first_step:
      return None
    rate = (step - self._first_step) / max(now - self._first_time, 1e-9)
    return max(self.total_steps - step, 0) / rate

  def _render(self, step: int, fields: Mapping[str, Any], now: float,
              width: int | None) -> str:
    """One status line; width=None renders the plain (non-TTY) variant."""
    if width is None:
      pct = 100.0 * step / max(self.total_steps, 1)
      parts = [f"step {step}/{self.total_steps} ({pct:.1f}%)"]
    else:
      parts = [f"{step}/{self.total_steps}"]
    fields = dict(fields)
    loss = fields.pop("loss", None)
    if loss is not None:
      parts.append(f"loss {_to_python(loss):.3f}")
    tps = fields.pop("tokens_per_s", None)
    if tps is not None:
      parts.append(f"{_format_si(_to_python(tps))} tok/s")
    for name, value in fields.items():
      if value is not None:
        parts.append(f"{name} {_format_field(value)}")
    eta = self._eta_s(step, now)
    parts.append("eta " + ("?" if eta is None else _format_duration(eta)))
    text = " | ".join(parts)
    if width is None:
      return text
    # TTY: fixed-width bar (so redraws don't jitter) when the line fits.
    bar_width = _BAR_WIDTH
    if len(text) + bar_width + 3 < width:
      frac = min(max(step / max(self.total_steps, 1), 0.0), 1.0)
      filled = int(round(frac * bar_width))
      text = f"[{'#' * filled}{'.' * (bar_width - filled)}] {text}"
    return text[:width - 1]  # Never wrap, or "\r" stops working.

  def update(self, step: int, *, force: bool = False, **fields: Any) -> None:
    """Reports progress at `step`; fields such as loss=, tokens_per_s=."""
    if not self.enabled or self._closed:
      return
    step = int(step)
    now = self._clock()
    if self._first_time is None:
      self._first_time, self._first_step = now, step
    if self._tty:
      due = (force or self._last_draw is None or step >= self.total_steps or
             now - self._last_draw >= self.min_interval_s)
      if due:
        width = shutil.get_terminal_size().columns
        self._draw(self._render(step, fields, now, width))
        self._last_draw = now
    elif force:
      self.stream.write(self._render(step, fields, now, None) + "\n")
      self.stream.flush()

  def _draw(self, line: str) -> None:
    # Pad with spaces to erase leftovers of a longer previous line.
    pad = max(len(self._line) - len(line), 0)
    self.stream.write("\r" + line + " " * pad)
    self.stream.flush()
    self._line = line

  def write(self, msg: str) -> None:
    """Prints a message on its own line without corrupting the bar."""
    if not self.enabled:
      return
    if self._tty and self._line:
      line = self._line
      self.stream.write("\r" + " " * len(line) + "\r" + msg + "\n")
      self._line = ""
      self._draw(line)  # Bring the bar back below the message.
    else:
      self.stream.write(msg + "\n")
      self.stream.flush()

  def close(self) -> None:
    """Ends the bar's line; further updates are ignored."""
    if not self.enabled or self._closed:
      return
    self._closed = True
    if self._tty and self._line:
      self.stream.write("\n")
      self.stream.flush()
      self._line = ""

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, exc_type: type[BaseException] | None,
               exc: BaseException | None, tb: TracebackType | None) -> None:
    self.close()


def _format_cell(value: Any) -> str:
  value = _to_python(value)
  if value is None:
    return ""
  if isinstance(value, float):
    if not math.isfinite(value):
      return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
      return f"{value:.3e}"
    return f"{value:.4f}"
  return str(value)


def _is_number(value: Any) -> bool:
  value = _to_python(value)
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[str] | None = None) -> str:
  """Formats rows as an aligned plain-text table.

  Args:
    rows: one mapping per row; missing keys render as empty cells.
    columns: column order; defaults to keys in first-seen order.

  Returns:
    Header, a dashed rule and one line per row; numeric columns right-aligned.
  """
  if columns is None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
  columns = [str(c) for c in columns]
  if not columns:
    return ""
  cells = [[_format_cell(row.get(c)) for c in columns] for row in rows]
  widths = [max([len(c)] + [len(r[i]) for r in cells])
            for i, c in enumerate(columns)]
  numeric = []
  for c in columns:
    present = [row[c] for row in rows if row.get(c) is not None]
    numeric.append(bool(present) and all(_is_number(v) for v in present))

  def line(values: Sequence[str]) -> str:
    out = [v.rjust(w) if num else v.ljust(w)
           for v, w, num in zip(values, widths, numeric)]
    return "  ".join(out).rstrip()

  lines = [line(columns), "  ".join("-" * w for w in widths)]
  lines.extend(line(r) for r in cells)
  return "\n".join(lines)
