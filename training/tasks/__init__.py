"""Evaluation tasks run by evaluate.py: name -> function(ctx) -> result dict.

A task module registers itself with `@register_task("name")` and is imported below; a model family lists
the tasks it supports (`ModelFamily.eval_tasks`). A result is {"metrics": {...}} for one row, or
{"rows": [{...}, ...]} for a table (e.g. accuracy per length), plus any extra JSON-able keys, and "data":
a short string naming what was scored (split, file, task options), under which evaluate.py files the result
in eval/<task>_step<N>.json, so results on different data never replace each other.
"""

import dataclasses
from typing import Any, Callable

import ml_collections

from models.family import ModelFamily

_TASKS: dict[str, Callable[["EvalContext"], dict]] = {}


@dataclasses.dataclass
class EvalContext:
  config: ml_collections.ConfigDict  # the run's resolved config with command-line overrides applied
  family: ModelFamily  # the run's model family (models/family.py)
  params: Any  # restored parameters, sharded on `mesh`
  mesh: Any
  step: int
  options: dict  # task options from the command line (split, prompt, ...)
  progress: bool = True  # show progress (process 0 only)


def register_task(name: str):
  def wrap(fn):
    _TASKS[name] = fn
    return fn
  return wrap


def get_task(name: str) -> Callable[[EvalContext], dict]:
  if name not in _TASKS:
    from training.errors import ConfigError
    raise ConfigError(f"unknown evaluation task {name!r}; available: {', '.join(sorted(_TASKS))}.")
  return _TASKS[name]


def task_names() -> list[str]:
  return sorted(_TASKS)


from training.tasks import bpb, copy_probes, generate, mqar, passkey  # noqa: E402,F401  (registration)
