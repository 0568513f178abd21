"""Evaluation tasks run by evaluate.py: name -> function(ctx) -> result dict.

A task module registers itself with `@register_task("name")` and is imported below; a model family lists
the tasks it supports (`ModelFamily.eval_tasks`). A result is {"metrics": {...}} for one row, or
{"rows": [{...}, ...]} for a table (e.g. accuracy per length), plus any extra JSON-able keys, and "data":
a short string naming what was scored (split, file, task options), under which evaluate.py files the result
in eval/<task>_step<N>.json, so results on different data never replace each other.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

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

  @functools.cached_property
  def eval_counts(self) -> Callable:
    """The family's jitted eval step (metric sums of one batch), compiled once per shape for this context."""
    from training import train_step as ts
    return jax.jit(lambda params, batch: ts.eval_step(params, batch, family=self.family))


def scored_totals(ctx: EvalContext, make_batch: Callable[[np.ndarray], dict], num_examples: int,
                  batch_size: int, bar: Any = None) -> dict[str, float]:
  """Sums of "correct", "weight" and "nll" over examples 0..num_examples-1, in batches of batch_size rows
  from make_batch(example ids); the last batch is padded to one shape with zero-weight rows."""
  from training import sharding
  sums = []
  for start in range(0, num_examples, batch_size):
    ids = start + np.arange(batch_size)
    batch = make_batch(ids)
    batch["weights"][ids >= num_examples] = 0.0
    sums.append(ctx.eval_counts(ctx.params, sharding.global_batch(sharding.process_rows(batch), ctx.mesh)))
    if bar is not None:
      bar.update(min(batch_size, num_examples - start))
  return {k: sum(float(s[k]) for s in jax.device_get(sums)) for k in ("correct", "weight", "nll")}


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


# Imported for their registration.
from training.tasks import bpb, copy_probes, encoder_ablation, generate, mqar, passkey  # noqa: E402,F401
