"""Timing helpers shared by the benchmark scripts (METHOD: compile first, warm up, report medians).

Every measurement compiles ahead of time (compile time is reported separately), runs `warmup` times, then
times up to `repeats` runs, each ended by `jax.block_until_ready`, stopping early once `cell_seconds` of
timed wall time is spent (at least one run). The result is the median.
"""

import os
import statistics
import time
from typing import Any, Callable

import jax


def _mib(stats: Any) -> float | None:
  if stats is None:
    return None
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
           - stats.alias_size_in_bytes)
  return total / 2**20


def measure(fn: Callable[..., Any], operands: tuple, *, warmup: int = 1, repeats: int = 5,
            cell_seconds: float = 30.0) -> dict[str, Any]:
  """{"ms": median ms, "runs": timed runs, "compile_s": s, "mib": XLA buffer estimate or None}.

  `fn` may be compiled already (`jax.stages.Compiled`, e.g. timed in several rounds): compile_s is then 0.
  """
  start = time.perf_counter()
  compiled = fn if isinstance(fn, jax.stages.Compiled) else jax.jit(fn).lower(*operands).compile()
  compile_s = time.perf_counter() - start
  try:
    memory = _mib(compiled.memory_analysis())
  except Exception:  # noqa: BLE001 - not every backend/version provides the analysis
    memory = None
  for _ in range(warmup):
    jax.block_until_ready(compiled(*operands))
  times, spent = [], 0.0
  while len(times) < max(repeats, 1) and (not times or spent < cell_seconds):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*operands))
    times.append(time.perf_counter() - start)
    spent += times[-1]
  return {"ms": 1e3 * statistics.median(times), "runs": len(times), "compile_s": compile_s,
          "mib": memory}


def interleaved(cases: dict[Any, tuple[Callable[..., Any], tuple]], rounds: int,
                **measure_args) -> dict[Any, dict[str, Any]]:
  """`measure` every case once per round, the cases in turn, `rounds` times (at least once).

  {name: {"ms": median over the rounds, "round_ms": each round's median, "compile_s": of the one compile,
  "compiled": the compiled program, for callers that use it further (a trace, a cost analysis)}}.
  On a shared machine whose speed drifts over minutes, a drift falls on every case alike, and ratios taken
  within a round compare cases timed seconds apart.
  """
  compiled, out = {}, {}
  for name, (fn, operands) in cases.items():
    start = time.perf_counter()
    compiled[name] = fn if isinstance(fn, jax.stages.Compiled) else jax.jit(fn).lower(*operands).compile()
    out[name] = {"round_ms": [], "compile_s": time.perf_counter() - start, "compiled": compiled[name]}
  for _ in range(max(rounds, 1)):
    for name, (_, operands) in cases.items():
      out[name]["round_ms"].append(measure(compiled[name], operands, **measure_args)["ms"])
  for row in out.values():
    row["ms"] = statistics.median(row["round_ms"])
  return out


def fmt(value: float | None, digits: int = 1) -> str:
  return "n/a" if value is None else f"{value:,.{digits}f}"


def emit(report: str, out: str | None) -> None:
  """Prints the markdown report and, with `out`, also writes it there (creating the directory)."""
  print(report)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(report)
