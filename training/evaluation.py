"""evaluate.py's library side: load a run's config, restore params only, run tasks, write JSON."""

import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections

import models
from configs import base as base_config
from training import checkpoint as ckpt_lib
from training import cli
from training import tasks as task_lib
from training import train_step as ts
from training.errors import CheckpointError, ConfigError
from training.loop import mesh_context, resolve_config
from training.metrics import format_table


def load_run_config(workdir: str, checkpointer: ckpt_lib.Checkpointer, step: int) -> ml_collections.ConfigDict:
  """The resolved config the run saved (config.json, else the copy inside the checkpoint)."""
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    with open(path) as f:
      try:
        return ml_collections.ConfigDict(json.load(f))
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}).") from None
  return ml_collections.ConfigDict(checkpointer.restore_config(step))


# Sections only evaluation reads: a run saved before one existed gets the current defaults, so its
# `--<section>.*` overrides work too.
_EVAL_SECTIONS = ("generate", "passkey", "mqar")


def fill_eval_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  defaults = base_config.get_config()
  for name in _EVAL_SECTIONS:
    if name not in config and name in defaults:
      config[name] = defaults[name]
  return config


def restore_params(config: ml_collections.ConfigDict, checkpointer: ckpt_lib.Checkpointer, step: int,
                   mesh: Any) -> Any:
  model = models.get_model(config.model)
  tx, _ = ts.make_optimizer(config.optimizer, config.train.steps)
  boxed = jax.eval_shape(lambda r: ts.init_train_state(model, tx, r, config.train.seq_len),
                         jax.random.key(0))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed.params), mesh,
                                          tuple(map(tuple, config.mesh.logical_axis_rules)))
  abstract = ckpt_lib.abstract_like(ts.strip_boxes(boxed.params), shardings)
  return checkpointer.restore_params(step, abstract)


def evaluate(workdir: str, *, step: int | None = None, tasks: Sequence[str] = ("bpb",),
             overrides: Sequence[str] = (), options: dict | None = None) -> dict[str, tuple[dict, str]]:
  """Runs `tasks` on a checkpoint of `workdir`; returns {task: (result, json_path)}."""
  options = dict(options or {})
  for name in tasks:
    task_lib.get_task(name)  # fail on a typo before restoring anything
  if not os.path.isdir(workdir):
    raise CheckpointError(f"workdir {workdir} does not exist.")
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  steps = checkpointer.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint found in {ckpt_lib.checkpoint_dir(workdir)}; train first with "
                          f"`python train.py --workdir={workdir}`.")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {checkpointer.directory}; available steps: "
                          f"{', '.join(map(str, steps))}.")
  config = fill_eval_sections(load_run_config(workdir, checkpointer, step))
  config.eval.max_batches = 0  # evaluate.py reads whole splits unless --eval.max_batches caps it
  cli.apply_overrides(config, overrides)
  if options.get("text_file"):
    if not os.path.isfile(options["text_file"]):
      raise ConfigError(f"--text_file {options['text_file']} does not exist.")
    config.data.source, config.data.paths = "files", (options["text_file"],)
    options["split"] = options.get("split") or "all"
  config.train.progress_bar = False
  config = resolve_config(config)

  results = {}
  with mesh_context(config) as mesh:
    params = restore_params(config, checkpointer, step, mesh)
    ctx = task_lib.EvalContext(config=config, params=params, mesh=mesh, step=step, options=options)
    out_dir = os.path.join(workdir, "eval")
    for name in tasks:
      result = {"task": name, "step": step, **task_lib.get_task(name)(ctx)}
      path = os.path.join(out_dir, f"{name}_step{step}.json")
      if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w") as f:
          json.dump(result, f, indent=2, default=str)
      results[name] = (result, path)
  checkpointer.close()
  return results


def format_result(name: str, result: dict) -> str:
  rows = result.get("rows") or [result.get("metrics", {})]
  return f"== {name} (step {result['step']}) ==\n{format_table(rows)}"
