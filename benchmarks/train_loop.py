"""Steady-state throughput of the whole training loop (`training.loop.run`: data, dispatch, logging).

    python -m benchmarks.train_loop                                   # configs/base.py, 80 steps, 2 runs
    python -m benchmarks.train_loop --config=configs/tiny.py --steps=60 --runs=3 --out=loop.md

Each run trains the config from scratch in a fresh temporary workdir for --steps steps (no periodic eval,
checkpoints only at the end) and reads the loop's own tokens_per_s from metrics.jsonl: the loop measures
it between log lines, with the first window starting after step 1, so compilation is excluded. A run's
step time is the median over its log windows but the first; the report gives every run and the median
over runs. Only `training.loop.run` and a config file are used, so an older checkout is measured by
running this same file from that checkout's root (`PYTHONPATH=. python /path/to/train_loop.py ...`), which
is how a before/after pair is taken in one sitting.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import time

import jax

from benchmarks import timing
from training import host_allocator
from training import loop


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/base.py", help="config file (get_config())")
  p.add_argument("--steps", type=int, default=80)
  p.add_argument("--log_every", type=int, default=10)
  p.add_argument("--runs", type=int, default=2)
  p.add_argument("--out", default=None, help="also write the markdown report to this path")
  return p.parse_args(argv)


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location("_benchmarked_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _one_run(args: argparse.Namespace) -> dict:
  config = _load_config(args.config)
  config.train.steps, config.train.log_every = args.steps, args.log_every
  config.train.eval_every, config.train.progress_bar = 0, False
  config.checkpoint.every = 0
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    loop.run(config, workdir)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rates = [r["tokens_per_s"] for r in map(json.loads, f) if "tokens_per_s" in r]
  bytes_per_step = config.train.batch_size * config.train.seq_len
  steady = rates[1:] or rates  # the first window may still hold a slow first step after compilation
  ms = [1e3 * bytes_per_step / r for r in steady]
  return {"ms_per_step": statistics.median(ms), "bytes_per_s": bytes_per_step / statistics.median(ms) * 1e3,
          "windows": len(steady), "wall_s": wall}


def _revision() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def run(args: argparse.Namespace) -> str:
  results = [_one_run(args) for _ in range(args.runs)]
  device = jax.devices()[0]
  lines = [f"# Training-loop throughput: {args.config}",
           "",
           f"revision {_revision()}, {jax.device_count()} x {device.platform} ({device.device_kind}), "
           f"jax {jax.__version__}; {args.steps} steps per run, tokens/s from the loop's log lines every "
           f"{args.log_every} steps (compilation and the first window excluded).",
           "",
           "| run | ms / step (median over windows) | bytes / s | windows | wall s (incl. compile) |",
           "| --- | --- | --- | --- | --- |"]
  for i, r in enumerate(results):
    lines.append(f"| {i + 1} | {r['ms_per_step']:.1f} | {r['bytes_per_s']:,.0f} | {r['windows']} | "
                 f"{r['wall_s']:.1f} |")
  ms = statistics.median(r["ms_per_step"] for r in results)
  lines += ["", f"median over runs: {ms:.1f} ms / step"]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  args = _parse_args(argv)
  timing.emit(run(args), args.out)


if __name__ == "__main__":
  host_allocator.reexec_if_needed()
  main()
