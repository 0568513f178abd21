"""Where a config's training step spends its time, measured in one run against same-run baselines.

    python -m benchmarks.train_step                                         # configs/base.py
    python -m benchmarks.train_step --config=configs/base.py --config.train.compute_dtype=bfloat16
    python -m benchmarks.train_step --config=configs/tiny.py --repeats=3 --out=step.md

For the config (any `--config.*` override applies) it reports, each a median after warm-up over --rounds
rounds that time the step, its parts and the matmuls in turn (benchmarks/timing.py `interleaved`):
  * the compiled train step (forward, backward, clipping, AdamW), the forward alone (the family's loss) and
    forward + backward (its value_and_grad): the forward / backward split;
  * model FLOP/s, counting 6 x params FLOPs per byte (the usual 2 forward + 4 backward per parameter, so
    attention scores and the embedding lookup are not counted; the tied output matmul is), and XLA's own
    FLOP count of the compiled step (cost analysis, all ops) beside it;
  * the matmul rate XLA reaches at the model's own matmul shapes ([B*T, d] x [d, mlp] and its transpose,
    f32 and bf16), and the step's model FLOP/s as a fraction of the f32 rate (and, for bf16 compute, of
    the bf16 rate), each ratio taken within a round and then the median, with the rounds' range;
  * the top ops of the compiled step by time, from a jax.profiler trace of --profile_steps steps (summed
    over the threads that ran each op; the trace stays in --trace_dir for TensorBoard's profile plugin or
    Perfetto).
"""

import collections
import glob
import os
import re
import statistics
import sys
import tempfile

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from data import pipeline
from models import layers
from training import cli
from training import host_allocator
from training import runtime
from training import sharding
from training import train_step as ts


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("warmup", 2, "untimed runs before timing", flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "timed runs (median)", flag_values=fv)
  flags.DEFINE_integer("rounds", 3, "rounds that time the step and the matmuls in turn (median of the rounds)",
                       flag_values=fv)
  flags.DEFINE_integer("profile_steps", 3, "steps traced for the op breakdown (0: no trace)", flag_values=fv)
  flags.DEFINE_integer("top_ops", 12, "ops listed in the breakdown", flag_values=fv)
  flags.DEFINE_string("trace_dir", None, "where the trace is written (default: a temporary directory)",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "also write the markdown report to this path", flag_values=fv)


def _matmul_case(m: int, k: int, n: int, dtype) -> tuple:
  """(fn, operands) of one [m, k] x [k, n] matmul in `dtype` (f32 accumulation for bf16, as the model's)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), dtype)
  b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), dtype)
  return lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32), (a, b)


def op_kind(name: str) -> str:
  """'copy_bitcast_fusion.31' -> 'copy_bitcast_fusion' (XLA numbers every instance of an op kind)."""
  return re.sub(r"(\.\d+)+$", "", name)


def top_ops(trace_dir: str, count: int, by=lambda name: name) -> list[tuple[str, float, float]]:
  """[(op name, total ms, share of all op time)] of the newest trace in trace_dir, slowest first; `by`
  maps an op name to the key it is summed under (e.g. `op_kind`)."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  if not paths:
    return []
  totals = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(paths[-1]).planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" in stats:
          totals[by(str(stats["hlo_op"]))] += event.duration_ns
  all_ns = sum(totals.values()) or 1.0
  return [(name, ns / 1e6, ns / all_ns) for name, ns in totals.most_common(count)]


def _rest(ms: float) -> str:
  """The step minus forward + backward. Below zero XLA has fused the update into the backward, which a
  separately compiled value_and_grad (it must write every gradient out) cannot."""
  return f"{ms:.1f} ms" if ms >= 0 else f"{ms:.1f} ms (the step is faster than value_and_grad alone)"


def _shown_path(path: str) -> str:
  """A config file as a report names it: relative to the repo when inside it."""
  inside = os.path.abspath(path).startswith(cli.REPO_ROOT + os.sep)
  return os.path.relpath(os.path.abspath(path), cli.REPO_ROOT) if inside else path


def run(config, fv, config_file: str = cli.DEFAULT_CONFIG) -> str:
  config = runtime.resolve_config(config)
  t = config.train
  family = runtime.family(config)
  tx, schedule = ts.make_optimizer(config.optimizer, t.steps)
  timing_args = {"warmup": fv["warmup"].value, "repeats": fv["repeats"].value}
  with runtime.mesh_context(config) as mesh:
    state = jax.jit(lambda r: nn.unbox(ts.init_train_state(family, tx, r, t.seq_len)))(jax.random.key(0))
    local = next(pipeline.make_train_iterator(config.data, seq_len=t.seq_len, global_batch_size=t.batch_size,
                                              seed=t.seed, batch_format=family.batch_format))
    batch = sharding.global_batch(local, mesh)
    train_fn, _ = ts.make_step_fns(family, tx, schedule, t.grad_accum, seed=t.seed)
    forward = lambda p, b: family.loss(p, b)[0]
    forward_backward = jax.value_and_grad(forward)
    d, mlp = config.model.d_model, config.model.mlp_dim or layers.default_mlp_dim(config.model.d_model)
    bytes_per_step = t.batch_size * t.seq_len  # also the matmuls' rows
    cases = {"step": (train_fn, (state, batch)), "forward": (forward, (state.params, batch)),
             "forward_backward": (forward_backward, (state.params, batch))}
    for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
      cases[f"{name} up"] = _matmul_case(bytes_per_step, d, mlp, dtype)
      cases[f"{name} down"] = _matmul_case(bytes_per_step, mlp, d, dtype)
    timed = timing.interleaved(cases, fv["rounds"].value, **timing_args)
    step, fwd, fwd_bwd = timed["step"], timed["forward"], timed["forward_backward"]
    compiled = step["compiled"]
    try:
      xla_flops = float(compiled.cost_analysis()["flops"])
    except Exception:  # noqa: BLE001 - not every backend reports a cost analysis
      xla_flops = None

    trace_dir = fv["trace_dir"].value or tempfile.mkdtemp(prefix="train_step_trace_")
    ops = kinds = []
    if fv["profile_steps"].value > 0:
      jax.block_until_ready(compiled(state, batch))
      with jax.profiler.trace(trace_dir):
        for _ in range(fv["profile_steps"].value):
          jax.block_until_ready(compiled(state, batch))
      ops = top_ops(trace_dir, fv["top_ops"].value)
      kinds = top_ops(trace_dir, fv["top_ops"].value, by=op_kind)

  num_params = runtime.param_count(state.params)
  model_flops = 6 * num_params * bytes_per_step
  step_s = step["ms"] * 1e-3
  matmul_flops = 2 * bytes_per_step * d * mlp

  def rate(name: str, i: int) -> float:  # GFLOP/s in round i: the mean rate of the two matmul shapes
    return sum(matmul_flops / (timed[f"{name} {way}"]["round_ms"][i] * 1e-3) / 1e9 for way in ("up", "down")) / 2

  num_rounds = len(step["round_ms"])
  rates = {name: statistics.median(rate(name, i) for i in range(num_rounds)) for name in ("f32", "bf16")}
  compute = "bf16" if t.compute_dtype == "bfloat16" else "f32"
  model_rate = model_flops / step_s / 1e9
  # The ratios are taken within each round (the step and the matmuls timed seconds apart), then the median.
  ratios = {name: [model_flops / (step["round_ms"][i] * 1e-3) / 1e9 / rate(name, i) for i in range(num_rounds)]
            for name in ("f32", "bf16")}

  def ratio_cell(name: str) -> str:
    spread = f" (rounds {min(ratios[name]):.2f} - {max(ratios[name]):.2f})" if num_rounds > 1 else ""
    return f"{statistics.median(ratios[name]):.2f}{spread}"
  device = jax.devices()[0]
  lines = [
      f"# Train step: {_shown_path(config_file)}",
      "",
      f"{jax.device_count()} x {device.platform} ({device.device_kind}), jax {jax.__version__}; "
      f"{config.model.name}, {num_params:,} params, batch {t.batch_size} x {t.seq_len} bytes, "
      f"compute {t.compute_dtype}; medians of {timing_args['repeats']} runs after {timing_args['warmup']} warm-up"
      + (f", median over {num_rounds} rounds that time every row in turn." if num_rounds > 1 else "."),
      "",
      "| what | value |",
      "| --- | --- |",
      f"| train step (compiled) | {step['ms']:.1f} ms ({bytes_per_step / step_s:,.0f} bytes/s; compile "
      f"{step['compile_s']:.1f} s) |",
      f"| forward (loss) | {fwd['ms']:.1f} ms |",
      f"| forward + backward | {fwd_bwd['ms']:.1f} ms (backward / forward {fwd_bwd['ms'] / fwd['ms'] - 1:.2f}) |",
      f"| optimizer and the rest | {_rest(step['ms'] - fwd_bwd['ms'])} |",
      f"| model FLOP/s (6 x params per byte: {model_flops / 1e9:.1f} GFLOP per step) | {model_rate:.1f} GFLOP/s |",
      f"| XLA cost-analysis FLOPs of the step | "
      f"{'n/a' if xla_flops is None else f'{xla_flops / 1e9:.1f} GFLOP ({xla_flops / step_s / 1e9:.1f} GFLOP/s)'} |",
      f"| matmul rate at [{bytes_per_step}, {d}] x [{d}, {mlp}] and back, f32 | {rates['f32']:.1f} GFLOP/s |",
      f"| same, bf16 inputs, f32 accumulation | {rates['bf16']:.1f} GFLOP/s (bf16 / f32 {rates['bf16'] / rates['f32']:.2f}) |",
      f"| model FLOP/s / f32 matmul rate | {ratio_cell('f32')} |",
      *([f"| model FLOP/s / bf16 matmul rate | {ratio_cell('bf16')} |"] if compute == "bf16" else []),
      "",
  ]
  if ops:
    lines += [f"Top ops of the compiled step ({fv['profile_steps'].value} traced steps, trace in {trace_dir}):", "",
              "| op | ms per step | share |", "| --- | --- | --- |"]
    lines += [f"| {name} | {ms / fv['profile_steps'].value:.1f} | {share:.1%} |" for name, ms, share in ops]
    lines += ["", "The same time by op kind:", "", "| op kind | ms per step | share |", "| --- | --- | --- |"]
    lines += [f"| {name} | {ms / fv['profile_steps'].value:.1f} | {share:.1%} |" for name, ms, share in kinds]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv

  def body():
    config, fv = cli.parse(argv, _define_flags)
    timing.emit(run(config, fv, cli.config_file(argv)), fv["out"].value)

  return cli.run_main(body)


if __name__ == "__main__":
  host_allocator.reexec_if_needed()
  sys.exit(main())
