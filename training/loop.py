"""The training loop: `run(config, workdir)`, called by train.py, for every model family.

The loop (after nanodo's train.py) dispatches step N+1 before it reads step N's loss and gradient norm, so
the host never waits for the device between steps; it syncs only to log, evaluate, save or stop. The NaN
guard still names the first non-finite step, and a state is saved only after the metrics of every step
up to it were read and found finite.
"""

import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from data import corpora
from data import pipeline
from models import flops
from training import checkpoint as ckpt_lib
from training import distributed
from training import paths
from training import runtime
from training import sharding
from training import train_step as ts
from training.errors import NonFiniteLossError
from training.metrics import MetricsLogger, ProgressBar
from training.tasks import bpb as bpb_task


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step (save, then exit cleanly).

  Only in a single-process run: with jax.distributed, JAX's preemption service owns SIGTERM and orbax's
  `reached_preemption` makes every host stop at the same step (Checkpointer.reached_preemption).
  """

  def __init__(self, install: bool):
    self.received: str | None = None
    self._install = install
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT) if self._install else ():
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


def _last_good(checkpointer: ckpt_lib.Checkpointer) -> str:
  latest = checkpointer.latest_step()
  return "no checkpoint had been saved yet" if latest is None else (
      f"the last good checkpoint (step {latest}) is intact")


def _split_bytes(data_config: Any) -> dict[str, int | None]:
  """Bytes per split for the start line (None for synthetic sources)."""
  synthetic = data_config.source in corpora.SYNTHETIC_SOURCES
  return {split: None if synthetic else
          corpora.open_split(data_config, split).num_bytes
          for split in ("train", "valid", "test")}


def _scored(result: dict) -> str:
  """'N bytes: <sample>; on the same bytes gzip -9 G, xz -9e X' (no compressors for synthetic data)."""
  text = f"{result['bytes']:,} bytes: {result['sample']}"
  if "xz_bpb" in result:
    on = (f"an even {result['compressor_bytes']:,}-byte sample of them" if "compressor_bytes" in result
          else "the same bytes")
    text += f"; on {on} gzip -9 {result['gzip_bpb']:.4f}, xz -9e {result['xz_bpb']:.4f}"
  return text


class _StepMetrics:
  """Reads each step's metrics one step late and applies the NaN guard to them (nanodo's pattern)."""

  def __init__(self, checkpointer: ckpt_lib.Checkpointer):
    self._checkpointer = checkpointer
    self._pending: tuple[int, Any] | None = None

  def push(self, step: int, metrics: Any) -> tuple[int, dict[str, float]] | None:
    """Queues step's (device) metrics; returns the previous step's, read now, if any."""
    previous, self._pending = self._pending, (step, metrics)
    return self._read(previous) if previous else None

  def flush(self) -> tuple[int, dict[str, float]] | None:
    """Reads the queued step now (before a save, an eval or the end)."""
    pending, self._pending = self._pending, None
    return self._read(pending) if pending else None

  def _read(self, item: tuple[int, Any]) -> tuple[int, dict[str, float]]:
    step, metrics = item
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    loss, grad_norm = values["loss"], values["grad_norm"]
    # A non-finite gradient norm poisons the update (so the saved params) one step before the loss shows it.
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      self._checkpointer.wait()
      what = (f"the training loss became {loss}" if not math.isfinite(loss) else
              f"the gradient norm became {grad_norm} (loss {loss:.4f})")
      raise NonFiniteLossError(f"{what} at step {step}; stopped without saving, "
                               f"{_last_good(self._checkpointer)}.")
    return step, values


def _init_params_from(state: ts.TrainState, source: str, tx: Any, mesh: Any, shardings: Any, *,
                      announce: bool) -> ts.TrainState:
  """The fresh state with every param that `source`'s latest checkpoint has (same path and shape) taken
  from it, and a fresh optimizer state (train.init_from: e.g. MrT5 from a trained ByT5, spec §3.1)."""
  reader = ckpt_lib.Checkpointer(source, read_only=True)
  try:
    step = reader.latest_step()
    if step is None:
      raise ckpt_lib.CheckpointError(f"train.init_from={source!r} holds no checkpoint.")
    source_config = runtime.resolve_config(ml_collections.ConfigDict(reader.restore_config(step)))
    source_family = runtime.family(source_config)
    source_tx, _ = ts.make_optimizer(source_config.optimizer, source_config.train.steps)
    abstract, source_shardings = ts.state_shardings(source_family, source_tx, source_config, mesh)
    loaded = reader.restore_params(step, ckpt_lib.abstract_like(abstract, source_shardings).params)
  finally:
    reader.close()
  params, reused, fresh = ckpt_lib.merge_params(state.params, loaded)
  if not reused:
    raise ckpt_lib.CheckpointError(f"train.init_from={source!r}: no parameter of its checkpoint (step {step}) "
                                   "matches this model's names and shapes.")
  params = jax.device_put(params, shardings.params)
  if announce:
    print(f"initialised {len(reused)} of {len(reused) + len(fresh)} parameter arrays from {source} (step "
          f"{step}); new: {', '.join(fresh) or 'none'}", flush=True)
  return state.replace(params=params, opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params))


def write_initial_run(config: ml_collections.ConfigDict, workdir: str, params: Any) -> None:
  """A step-0 run directory holding `params` (e.g. an imported checkpoint, models/convert_hf.py).

  config.json and a checkpoint of train.py's fresh state (step 0, the family's aux state, a fresh optimizer
  state for these params) with the run's data iterator, so train.py resumes it (fine-tuning) and
  evaluate.py restores it. `params` must match the family's (unboxed) param tree.
  """
  config = runtime.resolve_config(config)
  t = config.train
  family = runtime.family(config)
  tx, _ = ts.make_optimizer(config.optimizer, t.steps)
  config_dict = config.to_dict()
  with runtime.mesh_context(config) as mesh:
    _, shardings = ts.state_shardings(family, tx, config, mesh)
    data_iter = pipeline.make_train_iterator(
        config.data, seq_len=t.seq_len, global_batch_size=t.batch_size, seed=t.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        batch_format=family.batch_format)
    # The random init is unused (XLA drops it); only its step and aux state are kept.
    fresh = lambda p: nn.unbox(ts.init_train_state(family, tx, jax.random.key(t.seed), t.seq_len)).replace(
        params=p, opt_state=tx.init(p))
    state = jax.jit(fresh, out_shardings=shardings)(jax.device_put(params, shardings.params))
    paths.make_dir(paths.run_path(workdir))
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
    checkpointer.save(0, state, data_iter, config_dict)
    checkpointer.close()
  if jax.process_index() == 0:
    paths.write_json(paths.run_path(workdir) / "config.json", config_dict)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the final metrics."""
  config = runtime.resolve_config(config)
  runtime.use_compilation_cache(config)
  is_main = jax.process_index() == 0
  config_dict = config.to_dict()
  distributed.check_same_config(config_dict)  # processes started with different commands: one line each

  t = config.train
  family = runtime.family(config)
  tx, schedule = ts.make_optimizer(config.optimizer, t.steps)
  train_fn, eval_fn = ts.make_step_fns(family, tx, schedule, t.grad_accum, seed=t.seed)
  with runtime.mesh_context(config) as mesh:
    abstract_state, shardings = ts.state_shardings(family, tx, config, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    sharding.check_batch_splits(mesh, {"train.batch_size": t.batch_size, "eval.batch_size": config.eval.batch_size})
    distributed.prepare_data(config.data, ("train", "valid", "test"))
    data_iter = pipeline.make_train_iterator(
        config.data, seq_len=t.seq_len, global_batch_size=t.batch_size, seed=t.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        batch_format=family.batch_format)
    # Only now that the model and data settings are known to be valid is anything written.
    paths.make_dir(paths.run_path(workdir))
    logger = MetricsLogger(workdir, enabled=is_main)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save)
    compute = family.flops_per_byte(t.seq_len)
    if is_main:
      print(runtime.describe_run(workdir, config, mesh, runtime.param_count(abstract_state.params),
                                 _split_bytes(config.data)), flush=True)
      if compute is not None:
        print(flops.describe(compute), flush=True)
    start = checkpointer.latest_step()
    # JAX's preemption sync point is one past the largest step any process has reported (0 before the first
    # report): report the start now, so that a SIGTERM from here on (restoring, compiling) stops a resumed
    # run after its first step instead of waiting for a step that has already passed.
    preempted_before_start = checkpointer.reached_preemption(start or 0)
    if start is None:
      init = jax.jit(lambda r: nn.unbox(ts.init_train_state(family, tx, r, t.seq_len)),
                     out_shardings=shardings)
      state, start = init(jax.random.key(t.seed)), 0
      if t.get("init_from"):
        state = _init_params_from(state, t.init_from, tx, mesh, shardings, announce=is_main)
    else:
      state = checkpointer.restore(start, ckpt_lib.abstract_like(abstract_state, shardings), data_iter)
    # out_shardings pins the new state to the same layout; left to propagation, GSPMD may return e.g. a
    # norm scale split over "tensor", and the next call would reject it as a committed mismatch.
    train_jit = jax.jit(train_fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                        donate_argnums=0)
    eval_jit = jax.jit(eval_fn, in_shardings=(shardings.params, batch_sharding))

    if is_main:  # only once setup (data, checkpoint restore) succeeded: a failed start leaves it as it was
      paths.write_json(paths.run_path(workdir) / "config.json",  # + the compute accounting, for readers
                       {**config_dict, **({"compute": compute} if compute else {})})

    progress = ProgressBar(t.steps, start_step=start, enabled=is_main and t.progress_bar)
    if start and is_main:  # printed even without a progress bar: a resume should never be silent
      print(f"resumed from the checkpoint at step {start} in {checkpointer.directory}", flush=True)
    step_metrics = _StepMetrics(checkpointer)
    clock = {"time": None, "step": start}  # tokens/s since the last log line, compilation excluded

    def report(read):
      if read is None:
        return
      step, values = read
      if clock["time"] is None or step == start + 1:
        clock["time"], clock["step"] = time.perf_counter(), step
      if step % t.log_every == 0 or step == t.steps:
        now = time.perf_counter()
        tokens_per_s = (step - clock["step"]) * t.batch_size * t.seq_len / max(now - clock["time"], 1e-9)
        clock["time"], clock["step"] = now, step
        logged = {k: v for k, v in values.items() if k != "tokens"}
        logger.write(step, {**logged, "tokens_per_s": tokens_per_s})
        progress.update(step, loss=values["loss"], tokens_per_s=tokens_per_s, force=True)
      else:
        progress.update(step, loss=values["loss"])

    def save(step):
      report(step_metrics.flush())  # every step up to `step` was read and found finite
      if step not in checkpointer.all_steps() and not bool(jax.device_get(_finite(state))):
        checkpointer.wait()  # an earlier async save in flight is the last good checkpoint
        raise NonFiniteLossError(f"the train state (params or optimizer state) became non-finite at step {step}; "
                                 f"stopped without saving, {_last_good(checkpointer)}.")
      checkpointer.save(step, state, data_iter, config_dict)

    def evaluate(step, max_batches=None):
      report(step_metrics.flush())
      result = bpb_task.evaluate_bpb(eval_jit, state.params, config, mesh, batch_format=family.batch_format,
                                     max_batches=max_batches, summarize=family.summarize)
      logger.write(step, {f"eval/{k}": v for k, v in result.items() if k != "sample"})
      return result

    profile = tuple(t.get("profile_steps", ()))
    stopped_by = None
    with _StopSignal(install=jax.process_count() == 1) as stop:
      if preempted_before_start:  # the sync point is the start itself: stop after one step, as every process
        stop.received = "preemption"
      step = start
      while step < t.steps:
        if profile and step + 1 == profile[0]:
          jax.profiler.start_trace(os.fspath(paths.run_path(workdir) / "profile"), create_perfetto_trace=True)
        batch = sharding.global_batch(next(data_iter), mesh)
        state, metrics = train_jit(state, batch)
        step += 1
        if profile and step == profile[1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          progress.write(f"wrote a profile of steps {profile[0]}-{profile[1]} to {workdir}/profile")
        report(step_metrics.push(step, metrics))
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
          result = evaluate(step)
          progress.write(f"step {step}: eval/bpb {result['bpb']:.4f} on {config.eval.split} ({_scored(result)})")
        if checkpointer.reached_preemption(step):
          stop.received = stop.received or "preemption"
        if stop.received or (config.checkpoint.every and step % config.checkpoint.every == 0):
          save(step)
        if stop.received:
          stopped_by = stop.received
          break
      save(step)
      checkpointer.wait()

    if stopped_by:
      progress.close()
      if is_main:
        print(f"stopped by {stopped_by} at step {step}; checkpoint saved in {checkpointer.directory}. "
              f"Re-run the same command to resume.", flush=True)
      final_metrics = {"step": step, "stopped_by": stopped_by}
    else:
      result = evaluate(step, config.eval.get("final_max_batches", config.eval.max_batches))
      progress.close()
      final_metrics = {"step": step, **{f"eval/{k}": v for k, v in result.items()}}
      if is_main:
        print(f"final {config.eval.split} bits-per-byte: {result['bpb']:.4f} (step {step}, {_scored(result)})",
              flush=True)
  checkpointer.close()
  logger.close()
  return final_metrics
