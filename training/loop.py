"""The training loop: `run(config, workdir)` (called by train.py) and the setup it shares with evaluate.py."""

import contextlib
import json
import math
import os
import signal
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import models
from data import pipeline
from models import layers
from training import checkpoint as ckpt_lib
from training import sharding
from training import train_step as ts
from training.errors import ConfigError, NonFiniteLossError
from training.metrics import MetricsLogger, ProgressBar


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates cross-field constraints and fills derived values (model.dtype from train.compute_dtype)."""
  config = ml_collections.ConfigDict(config.to_dict())
  t = config.train
  if t.steps <= 0 or t.batch_size <= 0 or t.seq_len <= 0:
    raise ConfigError(f"train.steps, train.batch_size and train.seq_len must be positive, got "
                      f"{t.steps}, {t.batch_size}, {t.seq_len}.")
  if t.grad_accum <= 0 or t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum "
                      f"({t.grad_accum}).")
  if t.compute_dtype not in layers.DTYPES:
    raise ConfigError(f"train.compute_dtype must be one of {sorted(layers.DTYPES)}, got {t.compute_dtype!r}.")
  config.model.dtype = t.compute_dtype
  if isinstance(config.data.paths, str):  # --config.data.paths=a.txt gives a string
    config.data.paths = (config.data.paths,)
  _check_kernels_can_run(config.model)
  try:
    models.get_model(config.model)  # unknown model/mixer names fail here, before any work
    for name in set(models.transformer.layer_mixers(config.model)):
      models.get_mixer(name)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return config


def _check_kernels_can_run(model_config: ml_collections.ConfigDict) -> None:
  """A Pallas impl on CPU needs interpret mode: say so before anything compiles (else it fails mid-trace)."""
  if jax.default_backend() in ("gpu", "tpu") or model_config.interpret:
    return
  chosen = {"model.attention_impl": model_config.attention_impl}
  for name, section in model_config.items():
    if isinstance(section, ml_collections.ConfigDict) and "impl" in section:
      chosen[f"model.{name}.impl"] = section.impl
  for key, impl in chosen.items():
    if isinstance(impl, str) and impl.startswith("pallas"):
      raise ConfigError(f"{key}={impl!r} needs a TPU or GPU (this backend is {jax.default_backend()!r}); "
                        f"add --config.model.interpret=true to run the kernels in interpret mode on CPU.")


@contextlib.contextmanager
def mesh_context(config: ml_collections.ConfigDict) -> Iterator[jax.sharding.Mesh]:
  """The device mesh plus Flax's logical-axis rules, active for tracing and running."""
  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.axis_rules(config.mesh)):
    yield mesh


def state_shardings(model: nn.Module, tx: Any, config: ml_collections.ConfigDict, mesh: Any) -> Any:
  """(abstract unboxed TrainState, its NamedShardings), without allocating anything."""
  boxed = jax.eval_shape(lambda r: ts.init_train_state(model, tx, r, config.train.seq_len),
                         jax.random.key(0))
  specs = ts.state_partition_specs(boxed, tx)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, sharding.axis_rules(config.mesh))
  return ts.strip_boxes(boxed), shardings


def evaluate_bpb(eval_fn: Any, params: Any, config: ml_collections.ConfigDict, mesh: Any,
                 data_config: Any = None, split: str | None = None, max_batches: int | None = None
                 ) -> dict[str, float]:
  """Bits per byte over fixed non-overlapping windows of a split (real bytes only)."""
  data_config = data_config or config.data
  split = split or config.eval.split
  max_batches = config.eval.max_batches if max_batches is None else max_batches
  nll_sum, count = 0.0, 0.0
  for batch in pipeline.eval_batches(data_config, split, seq_len=config.train.seq_len,
                                     batch_size=config.eval.batch_size, max_batches=max_batches):
    out = jax.device_get(eval_fn(params, sharding.global_batch(sharding.process_rows(batch), mesh)))
    nll_sum += float(out["nll_sum"])
    count += float(out["count"])
  return {"bpb": ts.bits_per_byte(nll_sum, count), "loss": nll_sum / max(count, 1.0), "bytes": count}


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step (save, then exit cleanly)."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. under some test runners): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@jax.jit
def _finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.inexact)]))


def _all_finite(tree: Any) -> bool:
  return bool(jax.device_get(_finite(tree)))


def _last_good(checkpointer: ckpt_lib.Checkpointer) -> str:
  latest = checkpointer.latest_step()
  return "no checkpoint had been saved yet" if latest is None else (
      f"the last good checkpoint (step {latest}) is intact")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the final metrics."""
  config = resolve_config(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  config_dict = config.to_dict()

  t = config.train
  model = models.get_model(config.model)
  tx, schedule = ts.make_optimizer(config.optimizer, t.steps)
  train_fn, eval_fn = ts.make_step_fns(model, tx, schedule, t.grad_accum)
  logger = MetricsLogger(workdir, enabled=is_main)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
  rng = jax.random.key(t.seed)
  with mesh_context(config) as mesh:
    abstract_state, shardings = state_shardings(model, tx, config, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    data_iter = pipeline.make_train_iterator(
        config.data, seq_len=t.seq_len, global_batch_size=t.batch_size, seed=t.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    start = checkpointer.latest_step()
    if start is None:
      init = jax.jit(lambda r: nn.unbox(ts.init_train_state(model, tx, r, t.seq_len)),
                     out_shardings=shardings)
      state, start = init(rng), 0
    else:
      state = checkpointer.restore(start, ckpt_lib.abstract_like(abstract_state, shardings), data_iter)
    # out_shardings pins the new state to the same layout; left to propagation, GSPMD may return e.g. a
    # norm scale split over "tensor", and the next call would reject it as a committed mismatch.
    train_jit = jax.jit(train_fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                        donate_argnums=0)
    eval_jit = jax.jit(eval_fn, in_shardings=(shardings.params, batch_sharding))

    if is_main:  # only once setup (data, checkpoint restore) succeeded: a failed start leaves it as it was
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, default=list)

    progress = ProgressBar(t.steps, start_step=start, enabled=is_main and t.progress_bar)
    if start and is_main:  # printed even without a progress bar: a resume should never be silent
      print(f"resumed from the checkpoint at step {start} in {checkpointer.directory}", flush=True)
    last_log_time, last_log_step = None, start
    stopped_by = None

    def save(step):
      if step not in checkpointer.all_steps() and not _all_finite(state):
        checkpointer.wait()  # an earlier async save in flight is the last good checkpoint
        raise NonFiniteLossError(f"the train state (params or optimizer state) became non-finite at step {step}; "
                                 f"stopped without saving, {_last_good(checkpointer)}.")
      checkpointer.save(step, state, data_iter, config_dict)

    with _StopSignal() as stop:
      step = start
      while step < t.steps:
        batch = sharding.global_batch(next(data_iter), mesh)
        state, metrics = train_jit(state, batch)
        step += 1
        # Two scalars per step; also the NaN guard before any save. A non-finite gradient norm poisons the
        # update (so the saved params) one step before the loss shows it.
        loss, grad_norm = map(float, jax.device_get((metrics["loss"], metrics["grad_norm"])))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
          checkpointer.wait()
          what = (f"the training loss became {loss}" if not math.isfinite(loss) else
                  f"the gradient norm became {grad_norm} (loss {loss:.4f})")
          raise NonFiniteLossError(f"{what} at step {step}; stopped without saving, "
                                   f"{_last_good(checkpointer)}.")
        if step == start + 1 or last_log_time is None:
          last_log_time, last_log_step = time.perf_counter(), step  # exclude compilation from tokens/s
        if step % t.log_every == 0 or step == t.steps:
          now = time.perf_counter()
          tokens_per_s = (step - last_log_step) * t.batch_size * t.seq_len / max(now - last_log_time, 1e-9)
          last_log_time, last_log_step = now, step
          logged = {"loss": loss, "lr": float(metrics["lr"]), "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s}
          logger.write(step, logged)
          progress.update(step, loss=loss, tokens_per_s=tokens_per_s, force=True)
        else:
          progress.update(step, loss=loss)
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
          result = evaluate_bpb(eval_jit, state.params, config, mesh)
          logger.write(step, {f"eval/{k}": v for k, v in result.items()})
          progress.write(f"step {step}: eval/bpb {result['bpb']:.4f}")
        if config.checkpoint.every and step % config.checkpoint.every == 0:
          save(step)
        if stop.received:
          stopped_by = stop.received
          break
      save(step)
      checkpointer.wait()

    if stopped_by:
      progress.close()
      print(f"stopped by {stopped_by} at step {step}; checkpoint saved in {checkpointer.directory}. "
            f"Re-run the same command to resume.", flush=True)
      final_metrics = {"step": step, "stopped_by": stopped_by}
    else:
      result = evaluate_bpb(eval_jit, state.params, config, mesh)
      logger.write(step, {f"eval/{k}": v for k, v in result.items()})
      progress.close()
      final_metrics = {"step": step, **{f"eval/{k}": v for k, v in result.items()}}
      if is_main:
        print(f"final {config.eval.split} bits-per-byte: {result['bpb']:.4f} "
              f"(step {step}, {int(result['bytes'])} bytes)", flush=True)
  checkpointer.close()
  logger.close()
  return final_metrics
