"""evaluate.py's library side: load a run's config, restore params only, run tasks, record the results.

Results are data and are never overwritten by a different evaluation: eval/<task>_step<N>.json holds one
entry per scored data ("entries", keyed by the task result's "data" string: the split or file, the sample,
the task options), so valid, test and every --text_file evaluation of a step all stay side by side. Running
the very same evaluation again replaces only its own entry.
"""

import json
import os
from typing import Any, Sequence

import jax
import ml_collections

from configs import base as base_config
from training import checkpoint as ckpt_lib
from training import cli
from training import distributed
from training import paths
from training import runtime
from training import tasks as task_lib
from training.errors import CheckpointError, ConfigError
from training.metrics import format_table


def load_run_config(workdir: str, checkpointer: ckpt_lib.Checkpointer, step: int) -> ml_collections.ConfigDict:
  """The resolved config the run saved (config.json, else the copy inside the checkpoint)."""
  saved = paths.read_json(paths.run_path(workdir) / "config.json")
  if saved is not None:
    saved.pop("compute", None)  # the run's FLOPs accounting, written beside the config for readers
    return ml_collections.ConfigDict(saved)
  return ml_collections.ConfigDict(checkpointer.restore_config(step))


# Sections only evaluation reads: a run saved before one existed gets the current defaults, so its
# `--<section>.*` overrides work too.
_EVAL_SECTIONS = ("generate", "passkey", "mqar", "copy")


def fill_eval_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  defaults = base_config.get_config()
  for name in _EVAL_SECTIONS:
    if name not in config and name in defaults:
      config[name] = defaults[name]
  return config


def restore_params(family: Any, config: ml_collections.ConfigDict, checkpointer: ckpt_lib.Checkpointer,
                   step: int, mesh: Any) -> Any:
  """The parameters of `step`, restored straight into their shardings (no optimizer state is read)."""
  abstract, shardings = runtime.abstract_params(family, config, mesh)
  return checkpointer.restore_params(step, ckpt_lib.abstract_like(abstract, shardings))


def record_result(path: Any, task: str, step: int, result: dict) -> None:
  """Adds `result` to eval/<task>_step<N>.json under its "data" key, keeping every other entry."""
  path = paths.run_path(path)
  record = paths.read_json(path, "; move it away to record new results") or {"task": task, "step": step,
                                                                              "entries": {}}
  record.setdefault("entries", {})[result["data"]] = result
  # Through a temporary file: a crash never leaves half a file in place of the earlier results.
  paths.write_text(path, json.dumps(record, indent=2, default=str))


def evaluate(workdir: str, *, step: int | None = None, tasks: Sequence[str] = ("bpb",),
             overrides: Sequence[str] = (), options: dict | None = None) -> dict[str, tuple[dict, str]]:
  """Runs `tasks` on a checkpoint of `workdir`; returns {task: (result, json_path)}."""
  options = dict(options or {})
  for name in tasks:
    task_lib.get_task(name)  # fail on a typo before restoring anything
  if not paths.run_path(workdir).is_dir():
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
    text_file = paths.run_path(options["text_file"])
    if not text_file.is_file():
      raise ConfigError(f"--text_file {options['text_file']} does not exist.")
    config.data.source, config.data.paths = "files", (os.fspath(text_file),)
    options["split"] = options.get("split") or "all"
  config.train.progress_bar = False
  config = runtime.resolve_config(config)
  runtime.use_compilation_cache(config)
  distributed.check_same_config(config.to_dict())
  family = runtime.family(config)
  unsupported = [name for name in tasks if name not in family.eval_tasks]
  if unsupported:
    raise ConfigError(f"model.name={config.model.name!r} does not support the task(s) {unsupported}; "
                      f"it supports {', '.join(family.eval_tasks)}.")

  distributed.prepare_data(config.data, (options.get("split") or config.eval.split,))
  results = {}
  is_main = jax.process_index() == 0
  with runtime.mesh_context(config) as mesh:
    params = restore_params(family, config, checkpointer, step, mesh)
    ctx = task_lib.EvalContext(config=config, family=family, params=params, mesh=mesh, step=step,
                               options=options, progress=is_main)
    out_dir = paths.run_path(workdir) / "eval"
    for name in tasks:
      result = {"task": name, "step": step, **task_lib.get_task(name)(ctx)}
      path = out_dir / f"{name}_step{step}.json"
      if is_main:
        paths.make_dir(out_dir)
        record_result(path, name, step, result)
      results[name] = (result, os.fspath(path))
  checkpointer.close()
  return results


def format_result(name: str, result: dict) -> str:
  rows = result.get("rows") or [result.get("metrics", {})]
  text = f"== {name} (step {result['step']}) ==\n{format_table(rows)}"
  return text + (f"\nscored: {result['sample']}" if "sample" in result else "")
