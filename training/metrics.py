"""Metric logging (JSONL + TensorBoard), console progress, and tables.

Public API:

  MetricsLogger(workdir, *, enabled=True)
      .write(step, metrics)        appends {"step": step, **metrics} to
                                   <workdir>/metrics.jsonl and the numeric
                                   values as TensorBoard scalars (tensorboardX)
      .close(), context manager
    Files are opened at the first write that has something new, so a run that
    logs nothing creates no files. Keys already in metrics.jsonl at a step
    (from an earlier or finished run in the same workdir) are dropped, and a
    write with nothing left writes nothing: re-runs never duplicate records.

  ProgressBar(total_steps, *, start_step=0, stream=None, enabled=True,
              min_interval_s=0.2, clock=time.monotonic)
      .update(step, *, force=False, **fields)   fields e.g. loss=, tokens_per_s=
      .write(msg), .close(), context manager
    Training progress by absolute step.

  progress(iterable=None, *, total, unit="it", desc="", unit_scale=None,
           enabled=True, stream=None, clock=time.monotonic) -> Progress
      .update(n=1), iter(...) when given an iterable, .write(msg), .close(),
      context manager
    Progress for evaluation loops, e.g.
      with metrics.progress(total=num_bytes, unit="B", desc="bpb valid") as bar:
        ...; bar.update(bytes_in_batch)
    unit="B" scales by default (kB/s, MB/s).

  format_table(rows, columns=None) -> str

Both progress kinds go to `stream` (default sys.stderr). On a terminal tqdm
redraws one line with rate and ETA. Off a terminal (log files, CI, pytest
capture) they never write tqdm's "\\r" output; they print a plain line instead
about every 5% of the total (and, for ProgressBar, on update(force=True); for
progress(), once more at the end). enabled=False (non-zero JAX processes) makes
every one of these a complete no-op: no output and no files.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TextIO

import tensorboardX
import tqdm
from etils import epath

from training import paths

__all__ = ["MetricsLogger", "Progress", "ProgressBar", "format_table", "progress"]

METRICS_FILENAME = "metrics.jsonl"
# Off a terminal, a plain progress line every this fraction of the total.
_PLAIN_FRACTION = 0.05
# Distinguishes event files opened by one process within the same second
# (tensorboardX names them by the second and truncates an existing file).
_EVENTS_COUNTER = itertools.count()


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


def _scalar_value(value: Any) -> float | None:
  """The TensorBoard scalar for `value` (non-finite kept), None if not a number."""
  value = _to_python(value)
  if isinstance(value, (int, float)):  # bool is an int: logged as 0/1.
    return float(value)
  return None


def _logged_keys(path: epath.Path) -> dict[int, set[str]]:
  """Per step, the metric keys already in the JSONL file at `path`."""
  logged: dict[int, set[str]] = {}
  if not path.exists():
    return logged
  with path.open("r", encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # e.g. a line cut short by a crash.
        continue
      if isinstance(record, dict) and isinstance(record.get("step"), int):
        logged.setdefault(record["step"], set()).update(
            k for k in record if k != "step")
  return logged


class _JsonlFile:
  """Appends lines to a JSONL file: a local file opened for appending (a resumed run continues it, each
  line flushed); a remote object (object stores have no append) rewritten whole through a temporary
  object on every append, which at log frequency is cheap. A line a crash left unterminated is ended
  first, so the next record starts on its own line."""

  def __init__(self, path: epath.Path):
    self._path = path
    self._file: TextIO | None = None
    self._text = ""
    if paths.is_local(path):
      unterminated = False
      if path.exists() and path.stat().length > 0:
        with path.open("rb") as f:
          f.seek(-1, 2)
          unterminated = f.read(1) != b"\n"
      self._file = path.open("a", encoding="utf-8")
      if unterminated:
        self._file.write("\n")
    elif path.exists():
      self._text = path.read_text()
      if self._text and not self._text.endswith("\n"):
        self._text += "\n"

  def append(self, line: str) -> None:
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._text += line
      paths.write_text(self._path, self._text)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class MetricsLogger:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard event files.

  Every write is flushed (cheap at log frequency, keeps files usable after a
  crash). Strings go to the JSONL only; numbers (finite or not) to both. Keys
  already logged at a step, by this logger or by an earlier run found in
  metrics.jsonl, are dropped. With enabled=False (non-zero JAX processes)
  every method is a no-op and no files are created.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._path = paths.run_path(workdir) / METRICS_FILENAME
    self._jsonl: _JsonlFile | None = None
    self._tb: tensorboardX.SummaryWriter | None = None
    self._closed = False
    self._logged = _logged_keys(self._path) if enabled else {}

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs the keys of `metrics` not yet logged at `step`, if any."""
    if not self.enabled:
      return
    if self._closed:
      raise ValueError("MetricsLogger is closed.")
    step = int(step)
    seen = self._logged.setdefault(step, set())
    new = {str(k): v for k, v in metrics.items() if str(k) not in seen}
    if not new:
      return
    record = {"step": step}
    record.update((k, _json_value(v)) for k, v in new.items())
    line = json.dumps(record, allow_nan=False) + "\n"
    scalars = {k: s for k, v in new.items() if (s := _scalar_value(v)) is not None}
    self._jsonl_file().append(line)
    if scalars:
      tb = self._tb_writer()
      for tag, value in scalars.items():
        tb.add_scalar(tag, value, step)
      tb.flush()
    seen.update(new)

  def _jsonl_file(self) -> _JsonlFile:
    if self._jsonl is None:
      paths.make_dir(self._path.parent)
      self._jsonl = _JsonlFile(self._path)
    return self._jsonl

  def _tb_writer(self) -> tensorboardX.SummaryWriter:
    # A resumed run gets a new events file next to the old ones; TensorBoard
    # merges a directory's files. No purge_step: the logger does not know the
    # restored step, and write() never repeats a (step, key) pair from
    # metrics.jsonl, so there is nothing to purge; purging steps >= the
    # restored one would instead hide the kept first values of re-run steps.
    if self._tb is None:
      self._tb = tensorboardX.SummaryWriter(  # gs:// too: tensorboardX writes GCS itself
          os.fspath(paths.run_path(self.workdir)), flush_secs=10,
          filename_suffix=f".{os.getpid()}.{next(_EVENTS_COUNTER)}")
    return self._tb

  def close(self) -> None:
    self._closed = True
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsLogger:
    return self

  def __exit__(self, exc_type: type[BaseException] | None,
               exc: BaseException | None, tb: TracebackType | None) -> None:
    self.close()


# ----------------------------------------------------------------------------
# Progress.
# ----------------------------------------------------------------------------


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


def _format_fields(fields: Mapping[str, Any]) -> list[str]:
  """loss= as "loss 2.346", tokens_per_s= as "4.9k tok/s", others "name value"."""
  fields = dict(fields)
  parts = []
  loss = fields.pop("loss", None)
  if loss is not None:
    parts.append(f"loss {_to_python(loss):.3f}")
  tps = fields.pop("tokens_per_s", None)
  if tps is not None:
    parts.append(f"{_format_si(_to_python(tps))} tok/s")
  parts.extend(f"{k} {_format_field(v)}" for k, v in fields.items() if v is not None)
  return parts


def _is_tty(stream: TextIO) -> bool:
  isatty = getattr(stream, "isatty", None)
  try:
    return bool(isatty and isatty())
  except ValueError:  # closed stream
    return False


def _plain_every(total: int | None) -> int:
  """Items between plain (non-terminal) lines: ~5% of the total, at least 1."""
  if not total or total <= 0:
    return 0  # unknown total: no periodic lines
  return max(1, math.ceil(_PLAIN_FRACTION * total))


def _write_line(stream: TextIO, bar: "tqdm.tqdm | None", msg: str) -> None:
  """msg on its own line: through tqdm when a bar is drawn (it clears the bar and redraws it below)."""
  if bar is not None:
    tqdm.tqdm.write(msg, file=stream)
  else:
    stream.write(msg + "\n")
  stream.flush()


class ProgressBar:
  """Training progress by step, on tqdm.

  On a terminal, a tqdm bar (created at the first update(), so its rate and
  ETA exclude what came before, e.g. compilation) with the fields as postfix,
  redrawn at most every min_interval_s unless forced. Off a terminal, a plain
  line "step 11/100 (11.0%) | loss 2.346 | 1.2k tok/s | eta 0:01:29" on
  update(force=True) and whenever ~5% of total_steps passed since the last one.
  A field keeps its last value until passed again.

  Args:
    total_steps: last step of the run (the bar's 100%).
    start_step: step the run (re)starts from.
    stream: text stream; defaults to sys.stderr at construction time.
    enabled: False on non-zero JAX processes; every method is then a no-op.
    min_interval_s: minimum seconds between terminal redraws (unless forced).
    clock: monotonic time source for the plain lines' ETA (tests inject one).
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
    self._tty = enabled and _is_tty(self.stream)
    self._bar: tqdm.tqdm | None = None
    self._every = _plain_every(self.total_steps)
    self._last_plain_step = self.start_step
    # Rate reference for plain lines: the first update (it includes compilation).
    self._first: tuple[float, int] | None = None
    self._fields: dict[str, Any] = {}
    self._closed = False

  def update(self, step: int, *, force: bool = False, **fields: Any) -> None:
    """Reports progress at `step`; fields such as loss=, tokens_per_s=."""
    if not self.enabled or self._closed:
      return
    step = int(step)
    # Fields persist until given again: tokens_per_s (passed at log steps only)
    # stays on the line between them.
    self._fields.update(fields)
    fields = self._fields
    if self._tty:
      self._update_tty(step, force, fields)
      return
    now = self._clock()
    if self._first is None:
      self._first = (now, step)
    if force or (self._every and step - self._last_plain_step >= self._every):
      self._last_plain_step = step
      self.stream.write(self._plain_line(step, fields, now) + "\n")
      self.stream.flush()

  def _update_tty(self, step: int, force: bool, fields: Mapping[str, Any]) -> None:
    if self._bar is None:
      self._bar = tqdm.tqdm(total=self.total_steps, initial=step, unit="step",
                            file=self.stream, dynamic_ncols=True,
                            mininterval=self.min_interval_s)
    self._bar.set_postfix_str(", ".join(_format_fields(fields)), refresh=False)
    if step > self._bar.n:
      self._bar.update(step - self._bar.n)
    elif step < self._bar.n:
      self._bar.n = step
      force = True
    if force:
      self._bar.refresh()

  def _plain_line(self, step: int, fields: Mapping[str, Any], now: float) -> str:
    pct = 100.0 * step / max(self.total_steps, 1)
    parts = [f"step {step}/{self.total_steps} ({pct:.1f}%)"]
    parts.extend(_format_fields(fields))
    t0, step0 = self._first
    eta = None
    if step > step0:
      rate = (step - step0) / max(now - t0, 1e-9)
      eta = max(self.total_steps - step, 0) / rate
    parts.append("eta " + ("?" if eta is None else _format_duration(eta)))
    return " | ".join(parts)

  def write(self, msg: str) -> None:
    """Prints a message on its own line without corrupting the bar."""
    if self.enabled:
      _write_line(self.stream, self._bar, msg)

  def close(self) -> None:
    """Ends the bar's line; further updates are ignored."""
    if not self.enabled or self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, exc_type: type[BaseException] | None,
               exc: BaseException | None, tb: TracebackType | None) -> None:
    self.close()


class Progress:
  """Progress of an evaluation loop; made by progress(), see its docstring."""

  def __init__(self, iterable: Iterable[Any] | None, *, total: int | None,
               unit: str, desc: str, unit_scale: bool, enabled: bool,
               stream: TextIO | None, clock: Callable[[], float]):
    self.iterable = iterable
    self.total = total
    self.unit = unit
    self.desc = desc
    self.unit_scale = unit_scale
    self.enabled = enabled
    self.stream = stream if stream is not None else sys.stderr
    self.n = 0
    self._clock = clock
    self._start = clock()
    self._bar: tqdm.tqdm | None = None
    self._closed = False
    self._every = _plain_every(total)
    self._last_plain = 0
    if enabled and _is_tty(self.stream):
      # leave=None: kept on screen when it is the only bar, erased when nested
      # under e.g. the training ProgressBar.
      self._bar = tqdm.tqdm(total=total, unit=unit, unit_scale=unit_scale,
                            desc=desc or None, file=self.stream, leave=None,
                            dynamic_ncols=True, mininterval=0.2)

  def update(self, n: float = 1) -> None:
    """Adds `n` done items (bytes for unit="B")."""
    if not self.enabled or self._closed:
      return
    self.n += n
    if self._bar is not None:
      self._bar.update(n)
    elif (self._every and self.n - self._last_plain >= self._every
          and (self.total is None or self.n < self.total)):  # the end has its own line
      self._last_plain = self.n
      self._print_plain(final=False)

  def __iter__(self) -> Iterator[Any]:
    if self.iterable is None:
      raise TypeError("progress() was given no iterable to iterate over.")
    try:
      for item in self.iterable:
        yield item
        self.update(1)
    finally:
      self.close()

  def write(self, msg: str) -> None:
    """Prints a message on its own line without corrupting the bar."""
    if self.enabled:
      _write_line(self.stream, self._bar, msg)

  def _amount(self, n: float) -> str:
    if self.unit_scale:
      return tqdm.tqdm.format_sizeof(n, self.unit)
    return str(int(n)) if float(n).is_integer() else f"{n:.1f}"

  def _print_plain(self, *, final: bool) -> None:
    elapsed = max(self._clock() - self._start, 0.0)
    rate = self.n / elapsed if elapsed > 0 else None
    if self.total:
      done = f"{self._amount(self.n)}/{self._amount(self.total)}"
      done += "" if self.unit_scale else f" {self.unit}"
      done += f" ({100.0 * self.n / self.total:.0f}%)"
    else:
      done = self._amount(self.n) + ("" if self.unit_scale else f" {self.unit}")
    parts = [f"{self.desc}: {done}" if self.desc else done]
    if rate is None:
      parts.append(f"? {self.unit}/s")
    elif self.unit_scale:
      parts.append(tqdm.tqdm.format_sizeof(rate, self.unit) + "/s")
    else:
      parts.append(f"{_format_si(rate) if rate >= 1e3 else f'{rate:.3g}'} {self.unit}/s")
    if final:
      parts.append(f"done in {_format_duration(elapsed)}")
    elif self.total and rate:
      parts.append(f"eta {_format_duration(max(self.total - self.n, 0) / rate)}")
    else:
      parts.append("eta ?")
    self.stream.write(" | ".join(parts) + "\n")
    self.stream.flush()

  def close(self) -> None:
    """Ends the bar; off a terminal prints the final line. Idempotent."""
    if not self.enabled or self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    else:
      self._print_plain(final=True)

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, exc_type: type[BaseException] | None,
               exc: BaseException | None, tb: TracebackType | None) -> None:
    self.close()


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None,
             unit: str = "it", desc: str = "", unit_scale: bool | None = None,
             enabled: bool = True, stream: TextIO | None = None,
             clock: Callable[[], float] = time.monotonic) -> Progress:
  """Progress for an evaluation loop: an update(n) counter or iterator wrapper.

  On a terminal a tqdm bar with items/s (or kB/s, MB/s for unit="B") and ETA;
  off a terminal a plain line "desc: done/total (pct%) | rate | eta h:mm:ss"
  every ~5% of `total`, plus one "... | done in h:mm:ss" line at close().
  Iterating it counts one item per element and closes it at the end.

  Args:
    iterable: optional iterable to wrap; total defaults to its len() if it has one.
    total: expected number of items (bytes for unit="B"); None when unknown
      (then no percent, ETA or periodic plain lines).
    unit: what is counted, e.g. "batch", "seq", "B".
    desc: label at the start of the line, e.g. "bpb valid".
    unit_scale: SI-scale the counts and rate (1.2MB); defaults to unit == "B".
    enabled: False on non-zero JAX processes: no output at all (an iterable
      is still iterated).
    stream: text stream; defaults to sys.stderr.
    clock: monotonic time source for the plain lines (tests inject one).
  """
  if total is None and iterable is not None and hasattr(iterable, "__len__"):
    total = len(iterable)
  if unit_scale is None:
    unit_scale = unit == "B"
  return Progress(iterable, total=total, unit=unit, desc=desc,
                  unit_scale=unit_scale, enabled=enabled, stream=stream,
                  clock=clock)


# ----------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------


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
