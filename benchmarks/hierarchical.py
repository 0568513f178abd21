"""Hierarchical byte LMs against the flat byte Transformer: train-step time, FLOPs per byte, compression.

    python -m benchmarks.hierarchical                                    # every config + flat, own sizes
    python -m benchmarks.hierarchical --config.train.batch_size=8 --out=hierarchical.md
    python -m benchmarks.hierarchical --configs=hourglass,spacebyte --rounds=3

For each hierarchical config (`--configs`: configs/hourglass.py, dynamic_pooling.py, spacebyte.py, hat.py,
megabyte.py, lyt.py, byte2word.py)
and for the flat byte Transformer (configs/base.py with `model.num_layers` set so that its parameter count
is nearest the hierarchical configs' median, or `--flat_layers`), in one run:
  * params, and the compiled train step (forward, backward, clipping, AdamW) built and timed as
    benchmarks/train_step.py does (benchmarks/timing.py: compiled once, warm-up, median); with --rounds > 1
    every row is timed once per round, in turn, and the median of the rounds is reported, so a change of
    load on a shared machine falls on every row alike;
  * bytes/s, and training FLOPs per byte from models/flops.py (conventions there: 6 x matmul MACs, causal
    attention as the full square) at the static capacity the step runs and at the realised compression,
    and the model FLOP/s they imply;
  * realised compression: the family's loss metric sums real_bytes / patches over --compression_batches
    train batches of the configured corpus (bytes per patch), and the share of bytes whose patch overflowed
    the capacity (masked from the loss);
  * step time and FLOPs per byte as ratios to the flat baseline's.
Every `--config.*` override applies to every config (to the flat baseline only where it has the key).
"""

import os
import statistics
import sys

from absl import flags
import flax.linen as nn
import jax
import ml_collections

from benchmarks import timing
from data import pipeline
from models import flops
from training import cli
from training import host_allocator
from training import runtime
from training import sharding
from training import train_step as ts
from training.errors import ConfigError

HIERARCHICAL_CONFIGS = ("hourglass", "dynamic_pooling", "spacebyte", "hat", "megabyte", "lyt", "byte2word")
FLAT_CONFIG = "base"


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_list("configs", list(HIERARCHICAL_CONFIGS), "hierarchical configs (names under configs/)",
                    flag_values=fv)
  flags.DEFINE_integer("flat_layers", 0, "layers of the flat baseline (0: nearest the median params)",
                       flag_values=fv)
  flags.DEFINE_integer("warmup", 1, "untimed runs before timing", flag_values=fv)
  flags.DEFINE_integer("repeats", 3, "timed runs (median) per round", flag_values=fv)
  flags.DEFINE_integer("rounds", 3, "rounds over all rows (median of the rounds' medians)", flag_values=fv)
  flags.DEFINE_integer("compression_batches", 4, "train batches the realised compression is measured on",
                       flag_values=fv)
  flags.DEFINE_string("out", None, "also write the markdown table to this path", flag_values=fv)


def _config_path(name: str) -> str:
  return os.path.join(cli.REPO_ROOT, "configs", f"{name}.py")


def _has_key(config: ml_collections.ConfigDict, override: str) -> bool:
  """Whether `--config.a.b=v` names a key of config."""
  node = config
  for part in override.lstrip("-").split("=", 1)[0].split(".")[1:]:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def load_configs(argv: list[str], define_flags=None) -> tuple[dict[str, ml_collections.ConfigDict],
                                                              flags.FlagValues]:
  """({row name: resolved run config}, flag values): the hierarchical configs, then the flat baseline.
  define_flags: this script's flags by default (benchmarks/generation.py adds its own to them)."""
  overrides = [a for a in argv[1:] if a.lstrip("-").startswith("config.")]
  if any(a.lstrip("-").split("=", 1)[0] == "config" for a in argv[1:]):
    raise ConfigError("benchmarks/hierarchical.py takes --configs (names), not --config.")
  _, fv = cli.parse([argv[0], f"--config={_config_path(HIERARCHICAL_CONFIGS[0])}", *argv[1:]],
                    define_flags or _define_flags)
  configs = {}
  for name in fv["configs"].value:
    if not os.path.exists(_config_path(name)):
      raise ConfigError(f"--configs: no configs/{name}.py.")
    configs[name] = runtime.resolve_config(cli.parse([argv[0], f"--config={_config_path(name)}", *overrides])[0])
    if configs[name].model.name != "hierarchical":
      raise ConfigError(f"--configs: configs/{name}.py is not a hierarchical config.")
  flat_path = f"--config={_config_path(FLAT_CONFIG)}"
  flat_keys = cli.parse([argv[0], flat_path])[0]
  flat = cli.parse([argv[0], flat_path, *[a for a in overrides if _has_key(flat_keys, a)]])[0]
  flat.model.num_layers = fv["flat_layers"].value or matched_layers(
      flat.model, statistics.median(flops.param_count(c.model) for c in configs.values()))
  configs[f"flat ({flat.model.num_layers} layers)"] = runtime.resolve_config(flat)
  return configs, fv


def matched_layers(model_config: ml_collections.ConfigDict, params: float) -> int:
  """The flat layer count whose parameter count is nearest `params`."""
  def count(layers):
    model = ml_collections.ConfigDict(model_config.to_dict())
    model.num_layers = layers
    return flops.param_count(model)
  return min(range(1, 65), key=lambda layers: abs(count(layers) - params))


def _prepare(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, compression_batches: int) -> dict:
  """The row's train step and operands (as benchmarks/train_step.py builds them) and its compression sums."""
  t = config.train
  family = runtime.family(config)
  tx, schedule = ts.make_optimizer(config.optimizer, t.steps)
  # Random weights only set the operands (boundaries do not read them): an rbg key compiles the init in
  # a third of threefry's time (benchmarks/mrt5.py).
  state = jax.jit(lambda r: nn.unbox(ts.init_train_state(family, tx, r, t.seq_len)))(
      jax.random.key(t.seed, impl="rbg"))
  batches = pipeline.make_train_iterator(config.data, seq_len=t.seq_len, global_batch_size=t.batch_size,
                                         seed=t.seed, batch_format=family.batch_format)
  batch = sharding.global_batch(next(batches), mesh)
  train_fn, eval_fn = ts.make_step_fns(family, tx, schedule, t.grad_accum, seed=t.seed)
  row = {"config": config, "fn": train_fn, "operands": (state, batch),
         "params": runtime.param_count(state.params)}
  if "patches" in family.count_keys:
    sums = jax.jit(eval_fn)
    totals = [sums(state.params, batch)]
    totals += [sums(state.params, sharding.global_batch(next(batches), mesh))
               for _ in range(compression_batches - 1)]
    total = {k: float(sum(s[k] for s in totals)) for k in ("real_bytes", "patches", "overflow_bytes", "weight")}
    row["bytes_per_patch"] = total["real_bytes"] / max(total["patches"], 1.0)
    row["overflow"] = total["overflow_bytes"] / max(total["weight"] + total["overflow_bytes"], 1.0)
  return row


def _row_cells(name: str, row: dict, flat: dict) -> list[str]:
  t = row["config"].train
  bytes_per_s = t.batch_size * t.seq_len / (row["ms"] * 1e-3)
  static = flops.training_flops_per_byte(row["config"].model, t.seq_len,
                                         patches_per_byte=1 / row["bytes_per_patch"] if "bytes_per_patch" in row
                                         else None)
  realised = static.get("realised", static)["total"]
  flat_flops = flops.training_flops_per_byte(flat["config"].model, flat["config"].train.seq_len)["total"]
  compression = (f"{row['bytes_per_patch']:.2f} ({static['slots']} slots) | {row['overflow']:.1%}"
                 if "bytes_per_patch" in row else "— | —")
  return [name, f"{row['params']:,}", f"{row['ms']:.1f}", f"{bytes_per_s:,.0f}", f"{static['total'] / 1e6:.2f}M",
          f"{realised / 1e6:.2f}M", f"{static['total'] * bytes_per_s / 1e9:.1f}", compression,
          f"{row['ms'] / flat['ms']:.2f}", f"{static['total'] / flat_flops:.2f}"]


def run(configs: dict[str, ml_collections.ConfigDict], fv: flags.FlagValues, command: str = "") -> str:
  timing_args = {"warmup": fv["warmup"].value, "repeats": fv["repeats"].value}
  first = next(iter(configs.values()))
  with runtime.mesh_context(first) as mesh:  # every config has base.py's mesh and axis rules
    rows = {name: _prepare(config, mesh, fv["compression_batches"].value) for name, config in configs.items()}
    timed = timing.interleaved({name: (row["fn"], row["operands"]) for name, row in rows.items()},
                               fv["rounds"].value, **timing_args)
  for name, row in rows.items():
    row.update(timed[name])
  flat = list(rows.values())[-1]
  t = first.train
  device = jax.devices()[0]
  lines = [
      "# Hierarchical byte LMs vs the flat byte Transformer: train step, FLOPs per byte, compression",
      "",
      f"- {jax.device_count()} x {device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores, "
      f"jax {jax.__version__}; `{command or 'python -m benchmarks.hierarchical'}`",
      f"- batch {t.batch_size} x {t.seq_len} bytes, compute {t.compute_dtype}; step ms: median of "
      f"{timing_args['repeats']} runs after {timing_args['warmup']} warm-up (benchmarks/timing.py)"
      + (f", median over {fv['rounds'].value} interleaved rounds" if fv["rounds"].value > 1 else ""),
      "- FLOPs/byte: models/flops.py training FLOPs (6 x matmul MACs, causal attention as the full square) at "
      "the static capacity the step runs and at the realised compression (S = patches + null slot); "
      f"bytes/patch and overflow over {fv['compression_batches'].value} train batches of data.source="
      f"{first.data.source}",
      "",
      "| model | params | step ms | bytes/s | FLOPs/byte (static) | FLOPs/byte (realised) | GFLOP/s (static) "
      "| bytes/patch | overflow bytes | step / flat | FLOPs / flat |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  lines += ["| " + " | ".join(_row_cells(name, row, flat)) + " |" for name, row in rows.items()]
  per_round = "; ".join(f"{name} {' / '.join(f'{ms:.1f}' for ms in row['round_ms'])}" for name, row in rows.items())
  compile_s = ", ".join(f"{name} {row['compile_s']:.1f}" for name, row in rows.items())
  return "\n".join(lines + ["", f"Step ms per round: {per_round}. Compile s: {compile_s}.", ""])


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  command = " ".join(["python -m benchmarks.hierarchical", *argv[1:]])

  def body():
    configs, fv = load_configs(argv)
    timing.emit(run(configs, fv, command), fv["out"].value)

  return cli.run_main(body)


if __name__ == "__main__":
  host_allocator.reexec_if_needed()
  sys.exit(main())
