"""The results files of benchmarks/experiments.py: the seeds' summary of each run, results.{json,csv,md} and
the plot (matplotlib, PNG; none without it)."""

from __future__ import annotations

import csv
import json
import os
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from benchmarks.experiments import Experiment


def _mean_spread(values: list[float]) -> tuple[float, float, float]:
  return statistics.fmean(values), min(values), max(values)


def summarize(rows: list[dict[str, Any]], experiment: Experiment) -> list[dict[str, Any]]:
  """One line per run name: mean, and min / max over seeds (as <key>_min / <key>_max), of bpb, wall time
  and the experiment's columns and plotted keys."""
  keys = dict.fromkeys(("valid_bpb", "wall_s", *(c[0] for c in experiment.columns),
                        *(k for panel in experiment.plots for k in panel)))
  out = []
  for name in dict.fromkeys(r["run"] for r in rows):
    group = [r for r in rows if r["run"] == name]
    first = group[0]
    line = {"run": name, "seeds": len(group), "gzip_bpb": first["gzip_bpb"], "xz_bpb": first["xz_bpb"],
            "bytes_per_patch": first.get("bytes_per_patch"), "params": first.get("params"),
            "train_flops_per_byte": first["train_flops_per_byte"], "bytes_seen": first["bytes_seen"],
            "base": first.get("base", False)}
    for key in keys:
      values = [r[key] for r in group if r.get(key) is not None]
      mean, low, high = _mean_spread(values) if values else (None, None, None)
      line.update({key: mean, f"{key}_min": low, f"{key}_max": high})
    if "accuracy" in first:  # a task experiment: mean, min and max over the seeds at each x
      line["accuracy"] = {x: _mean_spread([r["accuracy"][x] for r in group]) for x in first["accuracy"]}
    out.append(line)
  return out


def _fmt(value: Any, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def _millions(value: float | None) -> str:
  return "-" if value is None else f"{value / 1e6:.1f}M"


def _task_markdown(name: str, spec: Experiment, summary: list[dict[str, Any]]) -> str:
  xs = list(summary[0]["accuracy"])
  lines = [f"# {name}: {spec.description}", "",
           f"{spec.task} accuracy (mean over seeds, min - max) at each {spec.x}:", "",
           "| run | seeds | " + " | ".join(f"{spec.x} {x}" for x in xs) + " | final valid bpb | params | wall |"
           + "".join(f" {header} |" for _, header, _ in spec.columns),
           "| --- | --- | " + " | ".join("---" for _ in xs) + " | --- | --- | --- |" + " --- |" * len(spec.columns)]
  for s in summary:
    cells = [f"{m:.3f}" + (f" ({lo:.2f} - {hi:.2f})" if s["seeds"] > 1 else "")
             for m, lo, hi in (s["accuracy"][x] for x in xs)]
    extra = "".join(f" {_fmt(s[key], fmt)} |" for key, _, fmt in spec.columns)
    lines.append(f"| {s['run']} | {s['seeds']} | " + " | ".join(cells) + f" | {s['valid_bpb']:.4f} | "
                 f"{_fmt(s['params'] and s['params'] / 1e6, '.3f')}M | {_fmt(s['wall_s'], '.0f')} s |" + extra)
  return "\n".join(lines) + "\n"


def markdown(name: str, spec: Experiment, summary: list[dict[str, Any]]) -> str:
  """results.md of experiment `name`: a row per run of `summary`."""
  if spec.task:
    return _task_markdown(name, spec, summary)
  extra = "".join(f" {header} |" for _, header, _ in spec.columns)
  lines = [f"# {name}: {spec.description}", "",
           "| run | seeds | valid bpb (min - max) | gzip -9 / xz -9e | bytes/patch | params | train FLOPs/byte "
           "| wall |" + extra, "| --- " * (8 + len(spec.columns)) + "|"]
  for s in summary:
    spread = f" ({s['valid_bpb_min']:.4f} - {s['valid_bpb_max']:.4f})" if s["seeds"] > 1 else ""
    cells = "".join(f" {_fmt(s[key], fmt)} |" for key, _, fmt in spec.columns)
    lines.append(f"| {s['run']} | {s['seeds']} | {s['valid_bpb']:.4f}{spread} | {_fmt(s['gzip_bpb'], '.3f')} / "
                 f"{_fmt(s['xz_bpb'], '.3f')} | {_fmt(s['bytes_per_patch'], '.2f')} | "
                 f"{_fmt(s['params'] and s['params'] / 1e6, '.2f')}M | "
                 f"{_millions(s['train_flops_per_byte'])} | "
                 f"{_fmt(s['wall_s'], '.0f')} s |" + cells)
  return "\n".join(lines) + "\n"


def _pyplot() -> Any:
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return plt


def plot_task(experiment: Experiment, summary: list[dict[str, Any]], path: str) -> bool:
  """Task accuracy against x, one line per run with the seeds' min - max as error bars."""
  plt = _pyplot()
  if plt is None:
    return False
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for s in summary:
    xs = [float(x) for x in s["accuracy"]]
    mean, lo, hi = (list(v) for v in zip(*s["accuracy"].values()))
    ax.errorbar(xs, mean, yerr=[[m - l for m, l in zip(mean, lo)], [h - m for m, h in zip(mean, hi)]],
                marker="o", capsize=3, label=s["run"])
  ax.set_xscale("log", base=2)
  ax.set_xlabel(experiment.x)
  ax.set_ylabel(f"{experiment.task} accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


_LABELS = {"train_flops": "training FLOPs", "wall_s": "wall time (s)", "valid_bpb": "valid bpb (whole split)"}


def plot(experiment: Experiment, summary: list[dict[str, Any]], path: str) -> bool:
  """One panel per (x, y) of experiment.plots, a point per run (base runs left out) at the seeds' mean
  with their min - max as error bars; False without matplotlib."""
  plt = _pyplot()
  if plt is None:
    return False
  headers = {key: header for key, header, _ in experiment.columns}
  panels = experiment.plots
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
  for ax, (x, y) in zip(axes[0], panels):
    for s in summary:
      if s["base"] or s[x] is None or s[y] is None:
        continue
      err = lambda k: [[s[k] - s[f"{k}_min"]], [s[f"{k}_max"] - s[k]]]
      ax.errorbar(s[x], s[y], xerr=err(x), yerr=err(y), fmt="o", capsize=3)
      ax.annotate(s["run"], (s[x], s[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(_LABELS.get(x) or headers.get(x, x))
    ax.set_ylabel(_LABELS.get(y) or headers.get(y, y))
    if x == "train_flops":
      ax.set_xscale("log")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write(root: str, name: str, experiment: Experiment, rows: list[dict[str, Any]]) -> tuple[str, str | None]:
  """results.{json,csv,md} and the plot of `rows` under root: (the markdown table, the PNG's name or None
  without matplotlib)."""
  summary = summarize(rows, experiment)
  os.makedirs(root, exist_ok=True)  # every row may be reused
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump({"experiment": name, "budget": list(experiment.budget), "rows": rows,
               "summary": summary}, f, indent=2)
  with open(os.path.join(root, "results.csv"), "w", newline="") as f:
    flat = [{**{k: v for k, v in r.items() if k != "accuracy"},
             **{f"accuracy_{experiment.x}_{x}": a for x, a in r.get("accuracy", {}).items()}} for r in rows]
    writer = csv.DictWriter(f, fieldnames=sorted({k for r in flat for k in r}))
    writer.writeheader()
    writer.writerows(flat)
  table = markdown(name, experiment, summary)
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write(table)
  figure = f"{experiment.task}.png" if experiment.task else "bpb.png"
  plotted = (plot_task(experiment, summary, os.path.join(root, figure)) if experiment.task
             else plot(experiment, summary, os.path.join(root, figure)))
  return table, figure if plotted else None
