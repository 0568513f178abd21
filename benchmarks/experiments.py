"""Experiment runner: trains a named list of configs at one budget through `train.py`, with seeds, in
sequence; skips the runs already finished; writes one results table (JSON, CSV, markdown) and plots
(benchmarks/experiment_report.py).

    python -m benchmarks.experiments hierarchical                     # every hierarchical config + flat LM
    python -m benchmarks.experiments hierarchical --seeds=0,1 --out=experiments
    python -m benchmarks.experiments hierarchical --list              # the runs and their commands only
    python -m benchmarks.experiments hierarchical --steps=40          # a quick smoke budget
    python -m benchmarks.experiments hierarchical --table_only        # the table of what is finished so far
    python -m benchmarks.experiments lm-variants                      # every mixer + hierarchical, 2 seeds
    python -m benchmarks.experiments lm-variants-wall                 # the same at one wall-time budget
    python -m benchmarks.experiments mqar-recall                      # MQAR accuracy vs pairs per mixer
    python -m benchmarks.experiments length-generalization            # passkey accuracy at 1-16x training length
    python -m benchmarks.experiments mrt5-deletion                    # ByT5 vs MrT5 at 3 target deletion rates
    python -m benchmarks.experiments mrt5-deletion-short-spans        # the same where the encoder matters

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

A run may set its own steps and seeds and start from another run's checkpoint (`Run.init_from`, as MrT5
continues a trained ByT5); such a base run is trained first and tabulated, not plotted. An experiment with
a `measure` (mrt5-deletion: runtime of the trained checkpoints) calls it once on every other run after
training, so all of them are measured in one process against the same baseline; its values are columns of
the table and may be plot axes (`Experiment.plots`).

`--reuse=<results.json>[,...]` tabulates rows that an earlier sweep of the same experiment wrote (say the
committed benchmarks/results/<experiment>/results.json) instead of retraining them, when their run
directories are gone: a row counts as that run and seed finished when its config, overrides and steps are
the planned ones. Under a wall-time budget the reused rows also fix each run's steps (so a new seed trains
as long as the reused one) where the source experiment's run directories are gone too.

An experiment with a `task` (mqar-recall) also runs `evaluate.py --tasks=<task>` on each finished run
(output in eval.log; skipped when its eval/<task>_step<N>.json exists) and tabulates and plots that task's
accuracy per x (e.g. the number of MQAR pairs) instead, mean and min - max over the seeds. A `probe_task`
(length-generalization: copy; mrt5-deletion: encoder_ablation) is evaluated in the same call; its per-probe
accuracies or its metrics are table columns.
"""

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

from benchmarks import experiment_report as report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  config: str  # path under the repo root ("file.py" or "file.py:arg")
  overrides: tuple[str, ...] = ()  # "key=value" under --config. (after the budget; may set train.steps)
  task_args: tuple[str, ...] = ()  # this run's own evaluate.py flags (after the experiment's)
  seeds: tuple[int, ...] | None = None  # this run's seeds instead of the experiment's
  # An earlier run of the experiment whose checkpoint initialises this one (train.init_from): its run of
  # the same seed, or of its first seed when it has no such seed. Such a base run is tabulated, not plotted.
  init_from: str = ""


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Runs trained at one budget. With a `task`, each trained run is also scored by `evaluate.py --tasks=<task>`
  and the table holds that task's accuracy per `x` (a key of its result rows) instead of bpb alone."""
  description: str
  runs: tuple[Run, ...]
  budget: tuple[str, ...]  # "key=value" applied to every run
  seeds: tuple[int, ...] = (0,)
  task: str = ""  # e.g. "mqar" or "passkey"
  task_args: tuple[str, ...] = ()  # evaluate.py flags, e.g. "--passkey.lengths=1,2,4"
  x: str = ""  # the result rows' key on the x axis, e.g. "num_pairs"
  # A second evaluate.py task run beside `task`: every probe's accuracy of its result rows (copy) becomes
  # the row key "<probe_task>/<probe>", every number of its metrics (encoder_ablation) "<probe_task>/<name>",
  # tabulated where `columns` lists it.
  probe_task: str = ""
  # "module:function" called once all runs are trained, with their run directories, in one process (a
  # same-run measurement such as runtime): it returns {workdir: {column: value}} for the rows.
  measure: str = ""
  columns: tuple[tuple[str, str, str], ...] = ()  # more table columns: (row key, header, format spec)
  plots: tuple[tuple[str, str], ...] = (("train_flops", "valid_bpb"), ("wall_s", "valid_bpb"))  # (x, y) panels
  zero_when_absent: tuple[str, ...] = ()  # row keys that are 0 for a run without them (ByT5 deletes nothing)
  # (experiment, seconds): a wall-time budget. Every seed of a run trains for the steps that `seconds` of
  # training take at that run's throughput in the source experiment: the highest of its seeds' median
  # logged training bytes/s (a busy machine only slows a run down), so the seeds differ by seed alone and
  # every learning-rate schedule completes.
  wall_budget: tuple[str, float] | None = None


# One Run per mixer on configs/mqar.py's 2-layer d_model 64 model: the same size and training for all (Cog
# in both layers: configs/cog.py's softmax first and last layer would leave no Cog layer here).
_MIXERS = ("softmax", "gla", "landmark", "cog", "ssa", "selective")
_MQAR_RUNS = tuple(Run(m, f"configs/mqar.py:{m}") for m in _MIXERS)

# Trained at 512 bytes on the corpus with a quarter of the windows starting with a passkey document, so
# retrieval is learned at the training length; passkey prompts of 1-16x that length at evaluation.
# Landmark retrieves the top-4 blocks when decoding (its paper's inference).
_PASSKEY_RUNS = (
    Run("softmax", "configs/base.py"),
    Run("landmark", "configs/landmark.py", task_args=("--model.landmark.inference=topk", "--model.landmark.top_k=4")),
    Run("gla", "configs/gla.py"),
    Run("ssa", "configs/ssa.py"))

_HIERARCHICAL_RUNS = (
    Run("hourglass", "configs/hourglass.py"),
    Run("dynamic_pooling", "configs/dynamic_pooling.py"),
    Run("dynamic_pooling_learned", "configs/dynamic_pooling.py", ("model.hierarchical.boundaries=learned",)),
    Run("dynamic_pooling_entropy", "configs/dynamic_pooling.py", ("model.hierarchical.boundaries=entropy",)),
    *(Run(n, f"configs/{n}.py") for n in ("megabyte", "spacebyte", "hat", "lyt", "byte2word", "toucan")))
_LM_VARIANT_RUNS = (Run("softmax", "configs/base.py"), *(Run(n, f"configs/{n}.py") for n in _MIXERS[1:]),
                    *_HIERARCHICAL_RUNS)
# 600 steps of 16 x 256 bytes: 2.46M training bytes, about 4-8 minutes a run on 2 cores.
# The committed rows were trained with bf16 matmuls (on AMX, where "auto" picks them): pinned, so that a
# rerun on a CPU without AMX trains the same recipe (slower) instead of switching to f32. MQAR is f32 (its config).
_BF16 = "train.compute_dtype=bfloat16"
_BYTES_BUDGET = ("train.steps=600", "train.eval_every=0", "checkpoint.every=600", _BF16)

# MrT5 as its paper trains it (spec §3.6): a trained ByT5 continued with the new delete gate, AdamW lr 1e-4,
# linear decay, no warmup; the ByT5 baseline continues the same way without the gate. softmax1 throughout
# (§3.3). configs/byt5.py's 1500 steps train the base (about 25 min on 2 cores), 300 steps each continuation.
_MRT5_CONTINUE = ("train.steps=300", "checkpoint.every=300", "optimizer.lr=1e-4", "optimizer.warmup_steps=0",
                  "optimizer.schedule=linear", "optimizer.min_lr_ratio=0")
_MRT5_RUNS = (
    Run("byt5_base", "configs/byt5.py", ("train.steps=1500", "checkpoint.every=1500", "model.byt5.softmax1=True"),
        seeds=(0,)),
    Run("byt5", "configs/byt5.py", ("model.byt5.softmax1=True", *_MRT5_CONTINUE), init_from="byt5_base"),
    *(Run(f"mrt5_{target}", "configs/mrt5.py", (f"model.byt5.delete_gate.target={target}", *_MRT5_CONTINUE),
          init_from="byt5_base") for target in ("0.3", "0.5", "0.7")))


def _mrt5_experiment(description: str, data: tuple[str, ...]) -> Experiment:
  """The ByT5 / MrT5 deletion sweep on span corruption with the data overrides `data`: bpb, deletion rate,
  the bits the decoder loses when every input byte is blanked (evaluate.py --tasks=encoder_ablation) and the
  runtime of the trained checkpoints."""
  return Experiment(
      description=description, runs=_MRT5_RUNS, budget=("train.eval_every=0", _BF16, *data), seeds=(0, 1),
      measure="benchmarks.mrt5:trained_runtime", probe_task="encoder_ablation",
      columns=(("eval/deletion_rate", "deletion rate (valid, hard)", ".3f"),
               ("eval/soft_bpb", "soft-deletion bpb", ".4f"),
               ("encoder_ablation/encoder_bits", "bits lost with blank inputs", ".3f"),
               ("encoder_ms", "encoder ms", ".1f"), ("encoder_decrease", "encoder vs ByT5", ".1%"),
               ("forward_ms", "forward ms", ".1f"), ("forward_decrease", "forward vs ByT5", ".1%")),
      plots=(("eval/deletion_rate", "valid_bpb"), ("eval/deletion_rate", "encoder_ms"),
             ("eval/deletion_rate", "forward_ms")), zero_when_absent=("eval/deletion_rate",))


EXPERIMENTS = {
    "hierarchical": Experiment(
        description="Every hierarchical config and the flat byte Transformer at one training budget "
                    "(the same bytes seen) on the bundled corpus (issue: hierarchical byte LMs, item 7).",
        runs=(Run("flat", "configs/base.py"), *_HIERARCHICAL_RUNS),
        budget=_BYTES_BUDGET),
    "lm-variants": Experiment(
        description="Every token mixer in the flat byte LM (configs/base.py with the mixer's config) and every "
                    "hierarchical config at one training budget (the same bytes seen) on the bundled corpus.",
        runs=_LM_VARIANT_RUNS, budget=_BYTES_BUDGET, seeds=(0, 1)),
    "lm-variants-wall": Experiment(
        description="lm-variants at one wall-time budget instead of one byte budget: every mixer and "
                    "hierarchical config trains for the steps that fill 180 s of training at the throughput "
                    "of its own lm-variants runs (the faster of its seeds).",
        runs=_LM_VARIANT_RUNS, budget=("train.eval_every=0", _BF16), seeds=(0, 1), wall_budget=("lm-variants", 180.0),
        columns=(("steps", "steps of 16 x 256 bytes", ".0f"),)),
    "mqar-recall": Experiment(
        description="MQAR recall accuracy against the number of key-value pairs for every mixer at the same "
                    "model size (configs/mqar.py: trained on 1-4 pairs; 8 or more pairs are never seen).",
        runs=_MQAR_RUNS, budget=("train.steps=1000", "checkpoint.every=1000"), seeds=(0, 1),
        task="mqar", x="num_pairs"),
    # Every window starts with a passkey document (the rest is corpus text): a one-seed softmax pilot learned
    # no retrieval with 25% of the windows even in 2400 steps, and 30% at 1x after 1600 steps with all of them.
    "length-generalization": Experiment(
        description="Passkey retrieval accuracy at 1-16x the training length (512 bytes) after training on "
                    "windows that each start with a passkey document and continue with bundled corpus text.",
        runs=_PASSKEY_RUNS,
        budget=("train.steps=2400", "train.seq_len=512", "train.batch_size=8", "data.passkey_fraction=1.0",
                "train.eval_every=0", "checkpoint.every=2400", _BF16),
        seeds=(0, 1), task="passkey", task_args=("--passkey.lengths=1,2,4,8,16",), x="length_x_train",
        # Does the model copy at all? The key where the key line repeats it, ~20 bytes on; the answer; a
        # repeated random digit string (induction). Rows reused from before the probe show "-".
        probe_task="copy",
        columns=(("copy/passkey_repeat", "copy: key repeat", ".3f"), ("copy/passkey_answer", "copy: answer", ".3f"),
                 ("copy/repeat_digits", "copy: random digits", ".3f"))),
    "mrt5-deletion": _mrt5_experiment(
        "ByT5 and MrT5 at target deletion rates 0.3 / 0.5 / 0.7, each continued for 300 steps from one ByT5 "
        "trained for 1500 steps (the paper's recipe, spec §3.6), span corruption on the bundled corpus; runtime "
        "of the trained checkpoints on the same valid batches.", ()),
    # A variation of mrt5-deletion's data: T5's own mean span of 3 (14 spans per 256 input bytes instead of 2)
    # leaves each target byte few target-side neighbours, which was meant to make the decoder read the encoder
    # more. At this budget it reads it less (encoder_ablation: 0.16 bits against 1.11); see the README.
    "mrt5-deletion-short-spans": _mrt5_experiment(
        "mrt5-deletion with span corruption's mean noise span at 3 bytes (T5's default) instead of ByT5's 20, "
        "so that the targets depend on the encoder: does the PI controller then hold the target rate?",
        ("data.span_corruption.mean_noise_span_length=3.0",)),
}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("experiment", choices=sorted(EXPERIMENTS))
  p.add_argument("--out", default="experiments", help="output root; runs go to <out>/<experiment>/runs")
  p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the experiment's)")
  p.add_argument("--runs", default=None, help="comma-separated run names to keep (default: all)")
  p.add_argument("--steps", type=int, default=None, help="override the budget's train.steps")
  p.add_argument("--reuse", default=None, help="comma-separated results.json files of earlier sweeps of this "
                 "experiment: their rows are tabulated, not retrained")
  p.add_argument("--list", action="store_true", help="print the runs and their commands; train nothing")
  p.add_argument("--table_only", action="store_true", help="tabulate the finished and reused runs (evaluating "
                 "a finished one where its task result is missing); train nothing, leave the rest out")
  return p.parse_args(argv)


def settings(experiment: Experiment, run: Run, steps: int | None) -> list[str]:
  """The run's "key=value" overrides: the budget, then its own; `steps` (a smoke budget) replaces both's
  train.steps and checkpoint.every."""
  out = [o for o in (*experiment.budget, *run.overrides)
         if not (steps and o.split("=", 1)[0] in ("train.steps", "checkpoint.every"))]
  return out + ([f"train.steps={steps}", f"checkpoint.every={steps}"] if steps else [])


def _steps(overrides: list[str]) -> int:
  return int([o.split("=", 1)[1] for o in overrides if o.startswith("train.steps=")][-1])


def command(run: Run, seed: int, workdir: str, overrides: list[str], init_from: str = "") -> list[str]:
  return [sys.executable, os.path.join(REPO_ROOT, "train.py"), f"--config={os.path.join(REPO_ROOT, run.config)}",
          f"--workdir={workdir}", f"--config.train.seed={seed}", "--config.train.progress_bar=false",
          *(f"--config.{o}" for o in overrides), *([f"--config.train.init_from={init_from}"] if init_from else [])]


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


def train_once(cmd: list[str], workdir: str) -> float:
  """Runs one train.py command (output to workdir/train.log); returns the wall seconds."""
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  with open(os.path.join(workdir, "train.log"), "a") as log:
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
  wall = time.time() - start
  if proc.returncode != 0:
    raise RuntimeError(f"run {os.path.basename(workdir)} failed (exit {proc.returncode}); see "
                       f"{os.path.join(workdir, 'train.log')}.")
  return wall


def task_result(workdir: str, task: str, steps: int) -> dict[str, Any] | None:
  """The latest evaluate.py result of `task` on the step-`steps` checkpoint, or None."""
  path = os.path.join(workdir, "eval", f"{task}_step{steps}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    entries = json.load(f).get("entries") or {}
  return list(entries.values())[-1] if entries else None


def missing_tasks(experiment: Experiment, workdir: str, steps: int) -> list[str]:
  """The experiment's evaluate.py tasks (task, probe_task) without a result on the step-`steps` checkpoint."""
  return [t for t in (experiment.task, experiment.probe_task) if t and task_result(workdir, t, steps) is None]


def evaluate_once(experiment: Experiment, run: Run, workdir: str, tasks: list[str]) -> None:
  """Runs evaluate.py --tasks=<tasks> on the run's latest checkpoint (output to workdir/eval.log)."""
  cmd = [sys.executable, os.path.join(REPO_ROOT, "evaluate.py"), f"--workdir={workdir}",
         f"--tasks={','.join(tasks)}", *experiment.task_args, *run.task_args]
  with open(os.path.join(workdir, "eval.log"), "a") as log:
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
  if proc.returncode != 0:
    raise RuntimeError(f"evaluate.py --tasks={','.join(tasks)} failed on {workdir} (exit {proc.returncode}); "
                       f"see {os.path.join(workdir, 'eval.log')}.")


def collect(run: Run, seed: int, workdir: str, steps: int, experiment: Experiment | None = None) -> dict[str, Any]:
  """One row of the results table, read back from the run directory."""
  result = final_eval(workdir, steps)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  compute = config.get("compute") or {}
  train = config["train"]
  bytes_seen = steps * train["batch_size"] * train["seq_len"]
  row = {"run": run.name, "seed": seed, "config": run.config, "overrides": " ".join(run.overrides),
         "steps": steps, "bytes_seen": bytes_seen, "compute_dtype": train["compute_dtype"],
         "valid_bpb": result["eval/bpb"],
         "gzip_bpb": result.get("eval/gzip_bpb"), "xz_bpb": result.get("eval/xz_bpb"),
         "eval_bytes": result.get("eval/bytes"), "bytes_per_patch": result.get("eval/bytes_per_patch"),
         "train_flops_per_byte": compute.get("total"),
         "train_flops": compute["total"] * bytes_seen if compute.get("total") else None,
         **{k: v for k, v in result.items() if k.startswith("eval/") and isinstance(v, (int, float))}}
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
  if experiment is not None and experiment.task:
    rows = task_result(workdir, experiment.task, steps)["rows"]
    row["accuracy"] = {str(r[experiment.x]): r["accuracy"] for r in rows}
  if experiment is not None and experiment.probe_task:
    probed = task_result(workdir, experiment.probe_task, steps)
    for r in probed.get("rows", ()):
      row[f"{experiment.probe_task}/{r['probe']}"] = r["accuracy"]
    row.update({f"{experiment.probe_task}/{k}": v for k, v in probed.get("metrics", {}).items()
                if isinstance(v, (int, float))})
  return row


def _plan(experiment: Experiment, runs: list[Run], seeds: list[int] | None, root: str, steps: int | None,
          reused: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
  """[{run, seed, workdir, overrides, steps, init_from, base}] in training order (a base before its users).
  Under a wall-time budget, a run with `reused` rows takes their steps."""
  by_name = {r.name: r for r in experiment.runs}
  bases = {r.init_from for r in experiment.runs if r.init_from}

  def workdir(run: Run, seed: int) -> str:
    return os.path.abspath(os.path.join(root, "runs", f"{run.name}_s{seed}"))

  plan = []
  for run in runs:
    for seed in seeds if seeds is not None and not run.seeds else (run.seeds or experiment.seeds):
      overrides = settings(experiment, run, steps)
      if experiment.wall_budget and not steps:
        source, seconds = experiment.wall_budget
        fill = next((r["steps"] for r in reused if r["run"] == run.name and r["config"] == run.config), None)
        fill = fill or wall_budget_steps([os.path.join(os.path.dirname(root), source, "runs", f"{run.name}_s{s}")
                                  for s in run.seeds or experiment.seeds], seconds)
        overrides += [f"train.steps={fill}", f"checkpoint.every={fill}"]
      init_from = ""
      if run.init_from:
        base = by_name[run.init_from]
        init_from = workdir(base, seed if seed in (base.seeds or experiment.seeds) else
                            (base.seeds or experiment.seeds)[0])
      plan.append({"run": run, "seed": seed, "workdir": workdir(run, seed), "overrides": overrides,
                   "steps": _steps(overrides), "init_from": init_from, "base": run.name in bases})
  return plan


def wall_budget_steps(workdirs: list[str], seconds: float) -> int:
  """The steps that `seconds` of training take at the highest of the median training throughputs that the
  finished runs in `workdirs` (one config, several seeds) logged: their tokens_per_s lines, bytes per step
  from config.json."""
  medians = []
  for workdir in workdirs:
    rates = sorted(m["tokens_per_s"] for m in _metrics(workdir) if "tokens_per_s" in m)
    if not rates or not os.path.exists(os.path.join(workdir, "config.json")):
      raise RuntimeError(f"a wall-time budget needs the finished run {workdir} for its throughput; run that "
                         "experiment first.")
    with open(os.path.join(workdir, "config.json")) as f:
      train = json.load(f)["train"]
    medians.append(rates[len(rates) // 2] / (train["batch_size"] * train["seq_len"]))
  return max(1, round(seconds * max(medians)))


def load_reused(paths: list[str], experiment_name: str) -> list[dict[str, Any]]:
  """The rows of earlier results.json files of `experiment_name` (one error sentence for another's file)."""
  rows = []
  for path in paths:
    with open(path) as f:
      results = json.load(f)
    if results.get("experiment") != experiment_name:
      raise RuntimeError(f"--reuse file {path} holds experiment {results.get('experiment')!r}, not "
                         f"{experiment_name!r}.")
    rows += results["rows"]
  return rows


def reused_row(reused: list[dict[str, Any]], p: dict[str, Any]) -> dict[str, Any] | None:
  """The reused row of a planned run and seed: the same config, own overrides and steps; else None."""
  run = p["run"]
  return next((r for r in reversed(reused) if (r["run"], r["seed"], r["config"], r["overrides"], r["steps"]) ==
               (run.name, p["seed"], run.config, " ".join(run.overrides), p["steps"])), None)


def _measure(experiment: Experiment, plan: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
  """Adds experiment.measure's columns to the rows of every non-base run (one call, so one baseline)."""
  module, name = experiment.measure.split(":")
  measured = [(p, r) for p, r in zip(plan, rows) if not p["base"]]
  print(f"measuring {len(measured)} runs ({experiment.measure})", flush=True)
  values = getattr(importlib.import_module(module), name)([p["workdir"] for p, _ in measured])
  for p, row in measured:
    row.update(values[p["workdir"]])


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(argv)
  experiment = EXPERIMENTS[args.experiment]
  seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
  runs = [r for r in experiment.runs if not args.runs or r.name in args.runs.split(",")]
  if args.runs and not runs:
    print(f"error: --runs matched none of {', '.join(r.name for r in experiment.runs)}.", file=sys.stderr)
    return 1
  root = os.path.join(args.out, args.experiment)
  reused = load_reused(args.reuse.split(","), args.experiment) if args.reuse else []
  if reused and experiment.measure:
    print(f"error: --reuse cannot be combined with {args.experiment}, which measures every trained checkpoint "
          "in one process.", file=sys.stderr)
    return 1
  plan = _plan(experiment, runs, seeds, root, args.steps, reused)
  if args.list:
    for p in plan:
      print(" ".join(command(p["run"], p["seed"], p["workdir"], p["overrides"], p["init_from"])))
    return 0
  rows = []
  for i, p in enumerate(plan, 1):
    run, seed, workdir, steps = p["run"], p["seed"], p["workdir"], p["steps"]
    finished = final_eval(workdir, steps) is not None
    earlier = None if finished else reused_row(reused, p)
    if earlier is not None:
      print(f"[{i}/{len(plan)}] {run.name} seed {seed}: reused from an earlier results file", flush=True)
      rows.append({**earlier, "base": p["base"]})
      continue
    if not finished and args.table_only:
      print(f"[{i}/{len(plan)}] {run.name} seed {seed}: not trained, left out (--table_only)", flush=True)
      continue
    if not finished:
      if p["init_from"] and not os.path.exists(os.path.join(p["init_from"], "checkpoints")):
        print(f"error: run {run.name} starts from {p['init_from']}, which is not trained; run the experiment "
              f"with {run.init_from} in --runs first.", file=sys.stderr)
        return 1
      print(f"[{i}/{len(plan)}] training {run.name} seed {seed} -> {workdir}", flush=True)
      resumed = os.path.exists(os.path.join(workdir, "metrics.jsonl"))
      wall = train_once(command(run, seed, workdir, p["overrides"], p["init_from"]), workdir)
      if not resumed:  # a wall time only for a run done in one go
        with open(os.path.join(workdir, "runner.json"), "w") as f:
          json.dump({"wall_s": wall, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    else:
      print(f"[{i}/{len(plan)}] {run.name} seed {seed}: finished, skipped", flush=True)
    tasks = missing_tasks(experiment, workdir, steps)
    if tasks:
      print(f"    evaluate.py --tasks={','.join(tasks)}", flush=True)
      evaluate_once(experiment, run, workdir, tasks)
    rows.append({**{k: 0.0 for k in experiment.zero_when_absent}, **collect(run, seed, workdir, steps, experiment),
                 "base": p["base"]})
    print(f"    valid bpb {rows[-1]['valid_bpb']:.4f}" + (
        f", {experiment.task} accuracy {rows[-1]['accuracy']}" if experiment.task else ""), flush=True)
  if not rows:
    print("error: no run is finished or reused, so there is no table.", file=sys.stderr)
    return 1
  if experiment.measure:
    _measure(experiment, [p for p in plan if final_eval(p["workdir"], p["steps"]) is not None], rows)
  table, figure = report.write(root, args.experiment, experiment, rows)
  print(table)
  print(f"wrote {root}/results.{{json,csv,md}}" + (f" and {figure}" if figure else " (no plot: matplotlib "
                                                                                   "missing)"))
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except RuntimeError as e:  # a failed run or a missing prerequisite: one line, the log path in it
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
