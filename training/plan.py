"""Dry-run planner: how a config would lay out on N devices, without the hardware.

    python -m training.plan --config=configs/pod/lm_1b_v5e64.py --num_devices=64
    python -m training.plan --config=configs/pod/byt5_large_v5e64.py --num_devices=64 --nocompile
    python -m training.plan --config=configs/tiny.py --num_devices=8 --config.mesh.fsdp=2 --json=plan.json

It runs on N fake CPU devices (jax_num_cpu_devices, so it needs a fresh process) and allocates nothing:
the train state is `jax.eval_shape`d and placed with the run's own logical-axis rules (the same
`train_step.state_shardings` as training/loop.py). It prints the mesh, the sharding of every parameter group
(layers that differ only in their index are one group), the per-device bytes of params, optimizer state
and gradients, XLA's memory estimate for one compiled train step (XLA:CPU's, per device: TPU and GPU
compilers fuse and lay out differently, so read it as an order of magnitude) and the FLOPs per step
(models/flops.py's count where the family has one, and XLA's cost analysis of the partitioned step).
"""

import json
import re
import sys
from typing import Any

from absl import flags
from etils import epath
import flax.linen as nn
import jax
import numpy as np

from data import span_corruption
from training import checkpoint as ckpt_lib
from training import cli
from training import runtime
from training import sharding
from training import train_step as ts
from training.errors import ConfigError


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("num_devices", 64, "Fake CPU devices to plan for (the pod's chip count).",
                       flag_values=fv)
  flags.DEFINE_bool("compile", True, "Compile one train step for XLA's memory and FLOP estimates.",
                    flag_values=fv)
  flags.DEFINE_string("json", "", "Also write the plan as JSON to this path.", flag_values=fv)


def _use_fake_devices(num_devices: int) -> None:
  if num_devices < 1:
    raise ConfigError(f"--num_devices must be positive, got {num_devices}.")
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", num_devices)
  except RuntimeError:
    pass  # this process already started JAX: fine if it has the right device count
  if len(jax.devices()) != num_devices:
    raise ConfigError(f"--num_devices={num_devices} needs a fresh process: this one already runs JAX on "
                      f"{len(jax.devices())} device(s).")


def _group(path: str) -> str:
  return re.sub(r"_\d+(?=/|$)", "_*", path)


def _path(key_path: Any) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _tree_bytes(tree: Any, shardings: Any) -> tuple[int, int]:
  """(total bytes, bytes on one device) of an abstract tree placed with `shardings`."""
  pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
  sizes = [(_nbytes(x.shape, x.dtype), _nbytes(s.shard_shape(x.shape), x.dtype)) for x, s in pairs]
  return sum(t for t, _ in sizes), sum(d for _, d in sizes)


def abstract_batch(family: Any, config: Any) -> dict[str, Any]:
  """ShapeDtypeStructs of one global train batch (nothing is read from the data)."""
  t = config.train
  batch = jax.eval_shape(lambda: family.example_batch(t.batch_size, t.seq_len))
  if family.batch_format == "span_corruption":  # the decoder side is as long as span corruption makes it
    options = config.data.span_corruption
    length = span_corruption.lengths(t.seq_len, options.noise_density, options.mean_noise_span_length)
    batch = {k: v if k == "inputs" else jax.ShapeDtypeStruct((t.batch_size, length.targets_length), v.dtype)
             for k, v in batch.items()}
  return batch


def plan(config: Any, *, compile_step: bool = True) -> dict[str, Any]:
  """The plan of `config` on the current (fake) devices, as plain numbers and strings."""

  config = runtime.resolve_config(config)
  t = config.train
  family = runtime.family(config)
  tx, schedule = ts.make_optimizer(config.optimizer, t.steps)
  with runtime.mesh_context(config) as mesh:
    sharding.check_batch_splits(mesh, {"train.batch_size": t.batch_size})
    boxed = jax.eval_shape(lambda r: ts.init_train_state(family, tx, r, t.seq_len), jax.random.key(0))
    logical = nn.get_partition_spec(boxed.params)
    state, shardings = ts.state_shardings(family, tx, config, mesh)

    groups: dict[str, dict[str, Any]] = {}
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    flat_logical = jax.tree_util.tree_flatten_with_path(logical, is_leaf=is_spec)[0]
    for (key_path, names), x, s in zip(flat_logical, jax.tree.leaves(state.params),
                                       jax.tree.leaves(shardings.params)):
      group = groups.setdefault(_group(_path(key_path)), {
          "shape": list(x.shape), "dtype": str(x.dtype), "count": 0, "logical": list(names),
          "mesh": [a if a is None or isinstance(a, str) else list(a) for a in s.spec],
          "shard_shape": list(s.shard_shape(x.shape)), "bytes": 0, "bytes_per_device": 0})
      group["count"] += 1
      group["bytes"] += _nbytes(x.shape, x.dtype)
      group["bytes_per_device"] += _nbytes(s.shard_shape(x.shape), x.dtype)

    params, params_device = _tree_bytes(state.params, shardings.params)
    opt, opt_device = _tree_bytes(state.opt_state, shardings.opt_state)
    result = {
        "model": config.model.name, "num_devices": len(jax.devices()), "mesh": dict(mesh.shape),
        "num_params": runtime.param_count(state.params), "compute_dtype": t.compute_dtype,
        "batch_size": t.batch_size, "seq_len": t.seq_len, "grad_accum": t.grad_accum,
        "remat": config.model.get("remat", "none"), "groups": groups,
        # gradients have the params' shapes, dtypes and shardings (train_step.py)
        "bytes": {"params": params, "opt_state": opt, "grads": params},
        "bytes_per_device": {"params": params_device, "opt_state": opt_device, "grads": params_device},
    }
    compute = family.flops_per_byte(t.seq_len)
    bytes_per_step = t.batch_size * t.seq_len
    result["flops_per_step"] = None if compute is None else compute["total"] * bytes_per_step
    if compile_step:
      result["compiled"] = _compiled_estimates(ts.make_step_fns(family, tx, schedule, t.grad_accum,
                                                                seed=t.seed)[0],
                                               state, shardings, abstract_batch(family, config),
                                               sharding.batch_sharding(mesh))
  return result


def _compiled_estimates(train_fn: Any, state: Any, shardings: Any, batch: dict[str, Any],
                        batch_sharding: Any) -> dict[str, Any]:
  """XLA's per-device memory analysis and FLOP count of one compiled (SPMD-partitioned) train step."""
  step = jax.jit(train_fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                 donate_argnums=0)
  abstract_batch_ = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in batch.items()}
  compiled = step.lower(ckpt_lib.abstract_like(state, shardings), abstract_batch_).compile()
  out: dict[str, Any] = {}
  memory = compiled.memory_analysis()
  if memory is not None:
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    out.update({f.removesuffix("_size_in_bytes"): int(getattr(memory, f)) for f in fields})
    # donated state buffers are reused for the new state (alias): they count once
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and "flops" in cost:
    out["flops_per_device"] = float(cost["flops"])
  return out


def _size(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:,.1f} {unit}"
  return f"{int(n)} B"


def _axes(spec: list) -> str:
  return "(" + ", ".join("-" if a is None else "x".join(a) if isinstance(a, list) else a for a in spec) + ")"


def format_plan(result: dict[str, Any]) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in result["mesh"].items())
  shards = result["mesh"]["data"] * result["mesh"]["fsdp"]
  lines = [
      f"{result['model']}: {result['num_params']:,} params (float32, {result['compute_dtype']} compute), "
      f"remat {result['remat']}; {result['num_devices']} devices, mesh {mesh}",
      f"global batch {result['batch_size']} x {result['seq_len']} = {result['batch_size'] * result['seq_len']:,} "
      f"bytes per step, {result['batch_size'] // shards} sequences per batch shard (data x fsdp = {shards})"
      + (f", {result['grad_accum']} micro-batches" if result["grad_accum"] > 1 else ""),
      "",
  ]
  header = ("parameter group", "x", "shape", "logical axes", "mesh axes", "per device")
  rows = [header] + [(name, str(g["count"]), str(g["shape"]), _axes(g["logical"]), _axes(g["mesh"]),
                      _size(g["bytes_per_device"])) for name, g in result["groups"].items()]
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  for row in rows:
    cells = [c.rjust(w) if i in (1, 5) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
    lines.append("  ".join(cells).rstrip())
  b, d = result["bytes"], result["bytes_per_device"]
  lines += ["", "per device: " + ", ".join(
      f"{name} {_size(d[key])} (of {_size(b[key])})"
      for name, key in (("params", "params"), ("optimizer state", "opt_state"), ("gradients", "grads")))
      + f"; together {_size(sum(d.values()))}"]
  compiled = result.get("compiled")
  if compiled and "peak" in compiled:
    lines.append(f"XLA:CPU estimate of one compiled train step, per device: arguments {_size(compiled['argument'])}, "
                 f"outputs {_size(compiled['output'])} (aliased {_size(compiled['alias'])}), temporaries "
                 f"{_size(compiled['temp'])}; peak about {_size(compiled['peak'])}")
  elif compiled is not None:
    lines.append("XLA gave no memory analysis for this step on this backend.")
  flops = [f"{result['flops_per_step']:.3g} (models/flops.py), {result['flops_per_step'] / result['num_devices']:.3g} "
           f"per device" if result["flops_per_step"] is not None else "not counted for this family"]
  if compiled and "flops_per_device" in compiled:
    flops.append(f"XLA's cost analysis {compiled['flops_per_device']:.3g} per device (it counts a loop body, "
                 f"such as scanned layers or micro-batches, once)")
  lines.append("FLOPs per step: " + "; ".join(flops))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv

  def body():
    config, fv = cli.parse(argv, _define_flags)
    _use_fake_devices(fv["num_devices"].value)
    result = plan(config, compile_step=fv["compile"].value)
    print(format_plan(result), flush=True)
    if fv["json"].value:
      epath.Path(fv["json"].value).write_text(json.dumps(result, indent=2))

  return cli.run_main(body)


if __name__ == "__main__":
  sys.exit(main())
