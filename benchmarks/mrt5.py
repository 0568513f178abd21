"""MrT5 hard deletion against ByT5 of the same size: teacher-forced encoder+decoder forward time.

    python -m benchmarks.mrt5                                         # configs/mrt5.py, its batch
    python -m benchmarks.mrt5 --out=benchmarks/results/mrt5_cpu_2core.md
    python -m benchmarks.mrt5 --batch=4 --sizes=config,small --small_batch=1   # also ByT5-Small's shape

For each size it times, in one run (benchmarks/timing.py: compiled once per shape, warm-up, median):
  * ByT5: the config with `model.byt5.delete_gate.enabled=False` (same sizes, softmax1 as the config),
    `module.apply({"params": p}, inputs, decoder_inputs)`;
  * MrT5 at each `--deletions` fraction f: `ByT5.forward_kept` with a seeded random keep mask that keeps
    exactly round((1 - f) T) positions of every row, in a static capacity of that count rounded up to 8:
    the hard-deletion path (compaction after the gate layer, the later encoder layers and the decoder's
    cross-attention on the compacted length). The gate itself is bypassed, so f is exact.
Inputs are random byte ids 3..258 ending in EOS; decoder inputs have the span-corruption target length of
train.seq_len (data/span_corruption.py), so this is the paper's "one teacher-forced forward pass" (spec
§3.7) at this codebase's sizes.

`trained_runtime(workdirs)` times trained runs instead (the mrt5-deletion experiment of
benchmarks/experiments.py): each run's own checkpoint on the same valid batches, MrT5 with its learned gate
and hard deletion (the evaluation path), ByT5 as trained; rounds interleave the runs.

Beside each measured decrease stand the expected one from MrT5's MACs count (spec §1.3, the authors'
compute_savings): per layer, attention T d d 4 + T d T 2 and FFN T d_ff d 2, with d the attention inner
dim (heads x head_dim) where it meets the attention (the projections are d_model x inner). The encoder is
split at the gate layer and the keep ratio applies to T after it; decoder cross-attention counts its
queries on the target length U and its keys and values on the kept length (2 U d_model inner +
2 T' d_model inner + 2 U T' inner). Embeddings and lm_head are left out, as in that count; the
paper's own runtime decreases (spec §3.7: ByT5-Small, eager PyTorch, the learned gate trained to that
deletion rate) are the last column. (T5 v1.1's GeGLU has three FFN matrices where the count has two, and
the rows' capacity rounding is not counted: the expected column is the paper's formula as written.)
"""

import datetime
import functools
import itertools
import os
import platform
import statistics
import sys

from absl import flags
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from benchmarks import timing
from configs import byt5_small
from data import pipeline
from data import span_corruption
import models
from training import checkpoint
from training import cli
from training import evaluation
from training import host_allocator
from training import runtime
from training.errors import ConfigError

# Spec §3.7: MrT5 runtime decrease vs ByT5 (ByT5-Small scale, multilingual span corruption), by delta.
PAPER_DECREASE = {0.3: 21.0, 0.4: 27.9, 0.5: 32.3, 0.6: 36.2, 0.7: 44.7}
SHAPE_KEYS = ("d_model", "mlp_dim", "num_heads", "head_dim", "num_layers", "num_decoder_layers")
SIZES = ("config", "small")


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("warmup", 2, "untimed runs before timing", flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "timed runs (median) per round", flag_values=fv)
  flags.DEFINE_integer("rounds", 3, "rounds over all rows (median of the rounds' medians)", flag_values=fv)
  flags.DEFINE_integer("batch", None, "sequences per forward (default: train.batch_size)", flag_values=fv)
  flags.DEFINE_list("deletions", ["0", "0.3", "0.5", "0.7"], "hard-deletion fractions timed for MrT5",
                    flag_values=fv)
  flags.DEFINE_list("sizes", ["config"], "config: the config's own sizes; small: configs/byt5_small.py's "
                    "model shape and seq_len (with --small_batch)", flag_values=fv)
  flags.DEFINE_integer("small_batch", 1, "batch of the ByT5-Small shape", flag_values=fv)
  flags.DEFINE_string("out", None, "also write the markdown report to this path", flag_values=fv)


def _sized(config: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
  """The config (unchanged for "config"), or with configs/byt5_small.py's model shape and seq_len."""
  config = ml_collections.ConfigDict(config.to_dict())
  if size == "small":
    small = byt5_small.get_config()
    for key in SHAPE_KEYS:
      config.model[key] = small.model[key]
    config.train.seq_len = small.train.seq_len
  return config


def attention_macs(q_len: int, kv_len: int, d_model: int, inner: int) -> int:
  """q and o projections on the queries, k and v on the keys, scores and weighted values (spec §1.3's
  T d d 4 + T d T 2 when q_len == kv_len and inner == d_model)."""
  return 2 * q_len * d_model * inner + 2 * kv_len * d_model * inner + 2 * q_len * kv_len * inner


def forward_macs(model: ml_collections.ConfigDict, length: int, targets: int, kept: int) -> int:
  """MrT5's MACs count of one example's forward: `kept` of `length` encoder positions after the gate."""
  d, d_ff, inner = model.d_model, model.mlp_dim, model.num_heads * model.head_dim
  gate_layer = model.byt5.delete_gate.layer
  encoder = sum(attention_macs(t, t, d, inner) + 2 * t * d_ff * d
                for t in (length if i < gate_layer else kept for i in range(model.num_layers)))
  decoder = model.num_decoder_layers * (attention_macs(targets, targets, d, inner)
                                        + attention_macs(targets, kept, d, inner) + 2 * targets * d_ff * d)
  return encoder + decoder


def random_keep(rng: np.random.Generator, batch: int, length: int, kept: int) -> np.ndarray:
  """[batch, length] bool with exactly `kept` True positions per row, drawn at random."""
  keep = np.zeros((batch, length), bool)
  for row in keep:
    row[rng.choice(length, kept, replace=False)] = True
  return keep


def _cases(config: ml_collections.ConfigDict, batch: int, deletions: list[float]) -> list[dict]:
  """[{name, f, kept, capacity, macs, fn, operands}]: ByT5 first, then MrT5 at each deletion fraction."""
  t = config.train.seq_len
  u = span_corruption.lengths(t).targets_length
  rng = np.random.default_rng(config.train.seed)
  inputs = rng.integers(3, 259, (batch, t), dtype=np.int32)
  inputs[:, -1] = span_corruption.EOS_ID
  decoder_inputs = rng.integers(3, 259, (batch, u), dtype=np.int32)
  decoder_inputs[:, 0] = span_corruption.PAD_ID  # the decoder start id
  family = runtime.family(config)
  # Random weights only set the timing's operands: an rbg key compiles the init in a third of threefry's time.
  key = jax.random.key(config.train.seed, impl="rbg")
  params = nn.unbox(jax.jit(family.init)(key, family.example_batch(batch, t)))
  # ByT5: the same config and weights without the gate (its module leaves the gate's parameters unused).
  byt5_config = ml_collections.ConfigDict(config.to_dict())
  byt5_config.model.byt5.delete_gate.enabled = False
  byt5 = runtime.family(byt5_config).module()
  cases = [{"name": "ByT5", "f": None, "kept": t, "capacity": t, "macs": forward_macs(config.model, t, u, t),
            "fn": lambda p, x, y: byt5.apply({"params": p}, x, y)[0], "operands": (params, inputs, decoder_inputs)}]
  module = family.module()
  for f in deletions:
    kept = round((1 - f) * t)
    capacity = min(t, -(-kept // 8) * 8)
    forward = functools.partial(_forward_kept, module, capacity=capacity)
    cases.append({"name": f"MrT5 {f:.0%} deleted", "f": f, "kept": kept, "capacity": capacity,
                  "macs": forward_macs(config.model, t, u, kept), "fn": forward,
                  "operands": (params, inputs, decoder_inputs, random_keep(rng, batch, t, kept))})
  return cases


def _forward_kept(module: nn.Module, params, inputs, decoder_inputs, keep, *, capacity: int):
  return module.apply({"params": params}, inputs, decoder_inputs, keep, capacity,
                      method=models.byt5.ByT5.forward_kept)


def _time_size(config: ml_collections.ConfigDict, batch: int, deletions: list[float], rounds: int,
               timing_args: dict) -> list[dict]:
  """The cases with "ms" (median over `rounds` of each round's median; the rounds interleave the rows, so
  a change of load on a shared machine falls on every row alike) and "compile_s" (`timing.interleaved`)."""
  cases = _cases(config, batch, deletions)
  timed = timing.interleaved({i: (case["fn"], case["operands"]) for i, case in enumerate(cases)}, rounds,
                             **timing_args)
  for i, case in enumerate(cases):
    case.update(timed[i])
  return cases


def _table(config: ml_collections.ConfigDict, batch: int, rows: list[dict]) -> list[str]:
  m = config.model
  t = config.train.seq_len
  u = span_corruption.lengths(t).targets_length
  base = rows[0]
  lines = [
      f"d_model {m.d_model}, d_ff {m.mlp_dim}, {m.num_heads} heads x {m.head_dim}, {m.num_layers} encoder / "
      f"{m.num_decoder_layers} decoder layers, gate at encoder layer {m.byt5.delete_gate.layer}, softmax1 "
      f"{m.byt5.softmax1}, {config.train.compute_dtype}; batch {batch}, inputs {t} bytes, targets {u}.",
      "",
      "| model | encoder length after the gate (kept / capacity) | forward ms | decrease vs ByT5 | "
      "expected (MACs) | paper (§3.7) |",
      "| --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    is_base = r is base
    measured = "—" if is_base else f"{100 * (1 - r['ms'] / base['ms']):.1f}%"
    expected = "—" if is_base else f"{100 * (1 - r['macs'] / base['macs']):.1f}%"
    paper = PAPER_DECREASE.get(r["f"])
    lines.append(f"| {r['name']} | {r['kept']} / {r['capacity']} | {r['ms']:.1f} | {measured} | {expected} | "
                 f"{'—' if paper is None else f'{paper:.1f}%'} |")
  per_round = "; ".join(f"{r['name']} {' / '.join(f'{ms:.1f}' for ms in r['round_ms'])}" for r in rows)
  compile_s = ", ".join(f"{r['compile_s']:.1f}" for r in rows)
  return lines + ["", f"ms per round: {per_round}. Compile s per row: {compile_s}.", ""]


def _open_run(workdir: str) -> tuple[checkpoint.Checkpointer, int, ml_collections.ConfigDict]:
  """(read-only checkpointer, latest step, resolved config) of a run directory."""
  checkpointer = checkpoint.Checkpointer(workdir, read_only=True)
  step = checkpointer.all_steps()[-1]
  return checkpointer, step, runtime.resolve_config(evaluation.load_run_config(workdir, checkpointer, step))


def _restored_run(opened: tuple[checkpoint.Checkpointer, int, ml_collections.ConfigDict], mesh
                  ) -> tuple[ml_collections.ConfigDict, nn.Module, object, str]:
  """(config, module, params, gate) of an opened run's latest checkpoint (the checkpointer is closed after);
  gate is "hard" when the run is MrT5 with hard deletion at evaluation, else "none" (ByT5)."""
  checkpointer, step, config = opened
  family = runtime.family(config)
  params = evaluation.restore_params(family, config, checkpointer, step, mesh)
  checkpointer.close()
  gate = config.model.byt5.delete_gate
  return config, family.module(), params, "hard" if gate.enabled and gate.hard_eval else "none"


def _trained_cases(config: ml_collections.ConfigDict, module: nn.Module, params, gate: str,
                   batches: list[dict]) -> list[dict]:
  """One forward and one encoder case per batch: the run's evaluation forward (hard deletion with its gate
  for MrT5) and its encoder alone at the capacity that the hard path picks for that batch."""
  cases = []
  for batch in batches:
    inputs, decoder_inputs = batch["inputs"], batch["decoder_inputs"]
    if gate == "hard":
      kept = np.asarray(module.apply({"params": params}, inputs, method=models.byt5.ByT5.kept_counts))
      capacity = models.byt5.capacity_for(config.train.seq_len, config.model.byt5.delete_gate.capacity_buckets,
                                          int(kept.max()))
      encoder = functools.partial(_encode, module, capacity=capacity)
    else:
      kept, capacity = np.sum(inputs != span_corruption.PAD_ID, axis=1), inputs.shape[1]
      encoder = functools.partial(_encode, module, capacity=None)
    real = np.sum(inputs != span_corruption.PAD_ID)
    forward = functools.partial(_forward, module, hard=gate == "hard")
    cases.append({"forward": _compiled(forward, params, inputs, decoder_inputs),
                  "encoder": _compiled(encoder, params, inputs), "kept": int(kept.sum()), "real": int(real),
                  "capacity": capacity})
  return cases


def _compiled(fn, *operands) -> tuple[jax.stages.Compiled, tuple]:
  """(fn compiled for these operands, the operands): compiled once, timed in every round."""
  return jax.jit(fn).lower(*operands).compile(), operands


def _forward(module: nn.Module, params, inputs, decoder_inputs, *, hard: bool):
  return module.apply({"params": params}, inputs, decoder_inputs, hard=hard)[0]


def _encode(module: nn.Module, params, inputs, *, capacity: int | None):
  return module.apply({"params": params}, inputs, capacity=capacity, method=models.byt5.ByT5.encode)[0]


def trained_runtime(workdirs: list[str], *, num_batches: int = 2, rounds: int = 3, warmup: int = 1,
                    repeats: int = 3) -> dict[str, dict]:
  """{workdir: {"forward_ms", "encoder_ms", "forward_decrease", "encoder_decrease", "measured_deletion",
  "capacity"}} for trained ByT5 / MrT5 runs.

  Every run is timed on the same first `num_batches` batches of its valid split (span corruption, the
  eval batch size): "forward_ms" is the evaluation forward (MrT5: gate, hard deletion into the bucket
  capacity, later encoder layers and decoder), "encoder_ms" the encoder alone at the capacity that the
  hard path picks per batch, each summed over the batches, median over `rounds` rounds that interleave the
  runs (benchmarks/timing.py within a round). The decreases are against the mean of the gate-less (ByT5)
  runs among `workdirs` (absent without one). "measured_deletion" is the hard-deleted fraction of the real
  bytes of these batches.
  """
  opened = {w: _open_run(w) for w in workdirs}
  config = opened[workdirs[0]][2]
  batches = list(itertools.islice(pipeline.eval_batches(
      config.data, config.eval.split, seq_len=config.train.seq_len, batch_size=config.eval.batch_size,
      max_batches=num_batches, batch_format="span_corruption"), num_batches))
  times = {w: {"forward": [], "encoder": []} for w in workdirs}
  with runtime.mesh_context(config) as mesh:
    restored = {w: _restored_run(opened[w], mesh) for w in workdirs}
    gates = {w: restored[w][3] for w in workdirs}
    cases = {w: _trained_cases(*restored[w], batches) for w in workdirs}
    for _ in range(rounds):
      for w in workdirs:
        for kind in ("forward", "encoder"):
          times[w][kind].append(sum(timing.measure(*case[kind], warmup=warmup, repeats=repeats)["ms"]
                                    for case in cases[w]))
  out = {w: {"forward_ms": statistics.median(times[w]["forward"]),
             "encoder_ms": statistics.median(times[w]["encoder"]),
             "measured_deletion": 1 - sum(c["kept"] for c in cases[w]) / sum(c["real"] for c in cases[w]),
             "capacity": max(c["capacity"] for c in cases[w])} for w in workdirs}
  baselines = [out[w] for w in workdirs if gates[w] == "none"]
  for kind in ("forward", "encoder") if baselines else ():
    base_ms = statistics.fmean(b[f"{kind}_ms"] for b in baselines)
    for w in workdirs:
      out[w][f"{kind}_decrease"] = 1 - out[w][f"{kind}_ms"] / base_ms
  return out


def config_path(argv: list[str]) -> str | None:
  """The --config file named in argv (either spelling), or None."""
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition("=")
    if name.lstrip("-") == "config":
      return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def cpu_name() -> str:
  """The CPU model from /proc/cpuinfo (Linux), else platform.processor() or the machine type."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def run(config: ml_collections.ConfigDict, fv: flags.FlagValues, path: str, command: str = "") -> str:
  config = runtime.resolve_config(config)
  if not config.model.byt5.delete_gate.enabled:
    raise ConfigError("benchmarks/mrt5.py needs an MrT5 config (model.byt5.delete_gate.enabled=True).")
  sizes = fv["sizes"].value
  if not sizes or set(sizes) - set(SIZES):
    raise ConfigError(f"--sizes takes a comma-separated subset of {', '.join(SIZES)}, got {','.join(sizes)}.")
  deletions = [float(f) for f in fv["deletions"].value]
  if any(not 0 <= f < 1 for f in deletions):
    raise ConfigError(f"--deletions must lie in [0, 1), got {','.join(fv['deletions'].value)}.")
  timing_args = {"warmup": fv["warmup"].value, "repeats": fv["repeats"].value}
  device = jax.devices()[0]
  lines = [
      f"# MrT5 hard deletion vs ByT5: teacher-forced forward time ({os.path.relpath(path, cli.REPO_ROOT)})",
      "",
      f"- {datetime.date.today().isoformat()}, {os.cpu_count()}-core {device.platform} ({cpu_name()}), "
      f"jax {jax.__version__}",
      f"- `{command or 'python -m benchmarks.mrt5'}`",
      f"- forward ms: median over {fv['rounds'].value} rounds (each times every row in turn) of the median of "
      f"{timing_args['repeats']} runs after {timing_args['warmup']} warm-up, one compiled program per shape "
      "(benchmarks/timing.py)",
      "- MrT5 rows: `ByT5.forward_kept` with a random keep mask of exactly the kept count per row; expected: "
      "MrT5's MACs count (spec §1.3); paper: ByT5-Small in eager PyTorch, the learned gate at that target "
      "rate (spec §3.7)",
      "",
  ]
  with runtime.mesh_context(config):
    for size in sizes:
      sized = _sized(config, size)
      batch = fv["small_batch"].value if size == "small" else (fv["batch"].value or config.train.batch_size)
      title = "ByT5-Small's shape (configs/byt5_small.py)" if size == "small" else "The config's sizes"
      lines += [f"## {title}", ""]
      lines += _table(sized, batch, _time_size(sized, batch, deletions, fv["rounds"].value, timing_args))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  command = " ".join(["python -m benchmarks.mrt5", *argv[1:]])  # as typed (before the default --config)
  path = config_path(argv[1:])
  if path is None:
    path = os.path.join(cli.REPO_ROOT, "configs", "mrt5.py")
    argv = [argv[0], f"--config={path}", *argv[1:]]

  def body():
    config, fv = cli.parse(argv, _define_flags)
    timing.emit(run(config, fv, path, command), fv["out"].value)

  return cli.run_main(body)


if __name__ == "__main__":
  host_allocator.reexec_if_needed()
  sys.exit(main())
