"""Experiment runner: trains a named list of configs at one budget through `train.py`, with seeds, in
sequence; skips the runs already finished; writes one results table (JSON, CSV, markdown) and plots.

    python -m benchmarks.experiments hierarchical                     # every hierarchical config + flat LM
    python -m benchmarks.experiments hierarchical --seeds=0,1 --out=experiments
    python -m benchmarks.experiments hierarchical --list              # the runs and their commands only
    python -m benchmarks.experiments hierarchical --steps=40          # a quick smoke budget

Each run is `python train.py --config=<file> --workdir=<out>/<experiment>/runs/<run>_s<seed>
--config.train.seed=<seed> <budget> <run overrides>` in a fresh process, its output in `train.log` beside
it. A run counts as finished when its metrics.jsonl holds the final evaluation at the budget's last step;
an interrupted sweep resumes (an interrupted run resumes from its checkpoint, train.py's own behaviour).
Everything in the table is read back from the run directories: the final whole-split bpb with gzip -9 /
xz -9e on the same bytes, bytes per patch (hierarchical models), the training FLOPs per byte from
config.json's "compute", the parameter count from the start-up line, and the wall time of the process
(from runner.json, written when a run finishes in one go). With several seeds the table gives the mean and
the spread (min - max) per config. Plots (matplotlib, `pip install -e '.[plots]'`): valid bpb against
training FLOPs (FLOPs per byte x bytes seen) and against wall time.
"""

import argparse
import csv
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  config: str  # path under the repo root
  overrides: tuple[str, ...] = ()  # "key=value" under --config.


@dataclasses.dataclass(frozen=True)
class Experiment:
  description: str
  runs: tuple[Run, ...]
  budget: tuple[str, ...]  # "key=value" applied to every run
  seeds: tuple[int, ...] = (0,)


_HIERARCHICAL_RUNS = (
    Run("hourglass", "configs/hourglass.py"),
    Run("dynamic_pooling", "configs/dynamic_pooling.py"),
    Run("dynamic_pooling_learned", "configs/dynamic_pooling.py", ("model.hierarchical.boundaries=learned",)),
    Run("dynamic_pooling_entropy", "configs/dynamic_pooling.py", ("model.hierarchical.boundaries=entropy",)),
    *(Run(n, f"configs/{n}.py") for n in ("megabyte", "spacebyte", "hat", "lyt", "byte2word", "toucan")))
# 600 steps of 16 x 256 bytes: 2.46M training bytes, about 4-8 minutes a run on 2 cores.
_BYTES_BUDGET = ("train.steps=600", "train.eval_every=0", "checkpoint.every=600")

EXPERIMENTS = {
    "hierarchical": Experiment(
        description="Every hierarchical config and the flat byte Transformer at one training budget "
                    "(the same bytes seen) on the bundled corpus (issue: hierarchical byte LMs, item 7).",
        runs=(Run("flat", "configs/base.py"), *_HIERARCHICAL_RUNS),
        budget=_BYTES_BUDGET),
    "lm-variants": Experiment(
        description="Every token mixer in the flat byte LM (configs/base.py with the mixer's config) and every "
                    "hierarchical config at one training budget (the same bytes seen) on the bundled corpus.",
        runs=(Run("softmax", "configs/base.py"),
              *(Run(n, f"configs/{n}.py") for n in ("gla", "landmark", "cog", "ssa", "selective")),
              *_HIERARCHICAL_RUNS),
        budget=_BYTES_BUDGET, seeds=(0, 1)),
}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("experiment", choices=sorted(EXPERIMENTS))
  p.add_argument("--out", default="experiments", help="output root; runs go to <out>/<experiment>/runs")
  p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the experiment's)")
  p.add_argument("--runs", default=None, help="comma-separated run names to keep (default: all)")
  p.add_argument("--steps", type=int, default=None, help="override the budget's train.steps")
  p.add_argument("--list", action="store_true", help="print the runs and their commands; train nothing")
  return p.parse_args(argv)


def _budget(experiment: Experiment, steps: int | None) -> list[str]:
  budget = [b for b in experiment.budget if not (steps and b.split("=", 1)[0] in ("train.steps",
                                                                                   "checkpoint.every"))]
  if steps:
    budget += [f"train.steps={steps}", f"checkpoint.every={steps}"]
  return budget


def _steps(budget: list[str]) -> int:
  return int(next(b.split("=", 1)[1] for b in budget if b.startswith("train.steps=")))


def command(run: Run, seed: int, workdir: str, budget: list[str]) -> list[str]:
  return [sys.executable, os.path.join(REPO_ROOT, "train.py"), f"--config={os.path.join(REPO_ROOT, run.config)}",
          f"--workdir={workdir}", f"--config.train.seed={seed}", "--config.train.progress_bar=false",
          *(f"--config.{o}" for o in (*budget, *run.overrides))]


def _metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def final_eval(workdir: str, steps: int) -> dict[str, Any] | None:
  """The end-of-run evaluation line (at the last step), or None if the run has not finished."""
  evals = [m for m in _metrics(workdir) if m.get("step") == steps and "eval/bpb" in m]
  return evals[-1] if evals else None


def train_once(run: Run, seed: int, workdir: str, budget: list[str]) -> float:
  """Runs train.py for one run (output to workdir/train.log); returns the wall seconds."""
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  with open(os.path.join(workdir, "train.log"), "a") as log:
    proc = subprocess.run(command(run, seed, workdir, budget), stdout=log, stderr=subprocess.STDOUT,
                          cwd=REPO_ROOT)
  wall = time.time() - start
  if proc.returncode != 0:
    raise RuntimeError(f"run {os.path.basename(workdir)} failed (exit {proc.returncode}); see "
                       f"{os.path.join(workdir, 'train.log')}.")
  return wall


def collect(run: Run, seed: int, workdir: str, steps: int) -> dict[str, Any]:
  """One row of the results table, read back from the run directory."""
  result = final_eval(workdir, steps)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  compute = config.get("compute") or {}
  train = config["train"]
  bytes_seen = steps * train["batch_size"] * train["seq_len"]
  row = {"run": run.name, "seed": seed, "config": run.config, "overrides": " ".join(run.overrides),
         "steps": steps, "bytes_seen": bytes_seen, "valid_bpb": result["eval/bpb"],
         "gzip_bpb": result.get("eval/gzip_bpb"), "xz_bpb": result.get("eval/xz_bpb"),
         "eval_bytes": result.get("eval/bytes"), "bytes_per_patch": result.get("eval/bytes_per_patch"),
         "train_flops_per_byte": compute.get("total"),
         "train_flops": compute["total"] * bytes_seen if compute.get("total") else None}
  log = os.path.join(workdir, "train.log")
  if os.path.exists(log):
    with open(log, errors="replace") as f:
      found = re.search(r"\(([\d,]+) params", f.read())
    if found:
      row["params"] = int(found.group(1).replace(",", ""))
  runner = os.path.join(workdir, "runner.json")
  if os.path.exists(runner):
    with open(runner) as f:
      row["wall_s"] = json.load(f).get("wall_s")
  return row


def _mean_spread(values: list[float]) -> tuple[float, float, float]:
  return statistics.fmean(values), min(values), max(values)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One line per run name: mean (and min / max over seeds) of bpb and wall time."""
  out = []
  for name in dict.fromkeys(r["run"] for r in rows):
    group = [r for r in rows if r["run"] == name]
    bpb = _mean_spread([r["valid_bpb"] for r in group])
    walls = [r["wall_s"] for r in group if r.get("wall_s")]
    first = group[0]
    out.append({"run": name, "seeds": len(group), "valid_bpb": bpb[0], "bpb_min": bpb[1], "bpb_max": bpb[2],
                "gzip_bpb": first["gzip_bpb"], "xz_bpb": first["xz_bpb"],
                "bytes_per_patch": first.get("bytes_per_patch"), "params": first.get("params"),
                "train_flops_per_byte": first["train_flops_per_byte"], "train_flops": first["train_flops"],
                "wall_s": statistics.fmean(walls) if walls else None, "bytes_seen": first["bytes_seen"]})
  return out


def _fmt(value: Any, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def markdown(experiment: str, summary: list[dict[str, Any]]) -> str:
  lines = [f"# {experiment}: {EXPERIMENTS[experiment].description}", "",
           "| run | seeds | valid bpb (min - max) | gzip -9 / xz -9e | bytes/patch | params | train FLOPs/byte "
           "| wall |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for s in summary:
    spread = f" ({s['bpb_min']:.4f} - {s['bpb_max']:.4f})" if s["seeds"] > 1 else ""
    lines.append(f"| {s['run']} | {s['seeds']} | {s['valid_bpb']:.4f}{spread} | {_fmt(s['gzip_bpb'], '.3f')} / "
                 f"{_fmt(s['xz_bpb'], '.3f')} | {_fmt(s['bytes_per_patch'], '.2f')} | "
                 f"{_fmt(s['params'] and s['params'] / 1e6, '.2f')}M | "
                 f"{_fmt(s['train_flops_per_byte'] and s['train_flops_per_byte'] / 1e6, '.1f')}M | "
                 f"{_fmt(s['wall_s'], '.0f')} s |")
  return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: str) -> bool:
  """bpb against training FLOPs and against wall time, one point per run; False without matplotlib."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, key, label in ((axes[0], "train_flops", "training FLOPs"), (axes[1], "wall_s", "wall time (s)")):
    for s in summary:
      if s[key]:
        err = [[s["valid_bpb"] - s["bpb_min"]], [s["bpb_max"] - s["valid_bpb"]]]
        ax.errorbar(s[key], s["valid_bpb"], yerr=err, fmt="o", capsize=3)
        ax.annotate(s["run"], (s[key], s["valid_bpb"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(label)
    ax.set_ylabel("valid bpb (whole split)")
    ax.grid(alpha=0.3)
  axes[0].set_xscale("log")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(argv)
  experiment = EXPERIMENTS[args.experiment]
  seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(experiment.seeds)
  runs = [r for r in experiment.runs if not args.runs or r.name in args.runs.split(",")]
  if args.runs and not runs:
    print(f"error: --runs matched none of {', '.join(r.name for r in experiment.runs)}.", file=sys.stderr)
    return 1
  budget = _budget(experiment, args.steps)
  steps = _steps(budget)
  root = os.path.join(args.out, args.experiment)
  plan = [(run, seed, os.path.abspath(os.path.join(root, "runs", f"{run.name}_s{seed}")))
          for run in runs for seed in seeds]
  if args.list:
    for run, seed, workdir in plan:
      print(" ".join(command(run, seed, workdir, budget)))
    return 0
  rows = []
  for i, (run, seed, workdir) in enumerate(plan, 1):
    if final_eval(workdir, steps) is None:
      print(f"[{i}/{len(plan)}] training {run.name} seed {seed} -> {workdir}", flush=True)
      resumed = os.path.exists(os.path.join(workdir, "metrics.jsonl"))
      wall = train_once(run, seed, workdir, budget)
      if not resumed:  # a wall time only for a run done in one go
        with open(os.path.join(workdir, "runner.json"), "w") as f:
          json.dump({"wall_s": wall, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    else:
      print(f"[{i}/{len(plan)}] {run.name} seed {seed}: finished, skipped", flush=True)
    rows.append(collect(run, seed, workdir, steps))
    print(f"    valid bpb {rows[-1]['valid_bpb']:.4f}", flush=True)
  summary = summarize(rows)
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump({"experiment": args.experiment, "budget": budget, "rows": rows, "summary": summary}, f, indent=2)
  with open(os.path.join(root, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
    writer.writeheader()
    writer.writerows(rows)
  table = markdown(args.experiment, summary)
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write(table)
  plotted = plot(summary, os.path.join(root, "bpb.png"))
  print(table)
  print(f"wrote {root}/results.{{json,csv,md}}" + (" and bpb.png" if plotted else " (no plot: matplotlib "
                                                                                  "missing)"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
