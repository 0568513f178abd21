"""Checkpointing facade over `orbax.checkpoint.CheckpointManager` (Orbax v0 API with explicit args).

Each step directory holds three items: `state` (TrainState, restored straight into its target shardings),
`data` (the grain iterator state, so a resumed run sees exactly the batches it would have seen) and
`config` (the resolved run config as JSON). Nothing here ever deletes a checkpoint except orbax's own
keep-N rotation after a *successful* save.
"""

import dataclasses
import json
import logging
import os
import sys
import traceback
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
import grain

from training import paths
from training.errors import CheckpointError


class _DropReadOnlyNotice(logging.Filter):
  """Drops orbax's "Given directory is read only" warning: evaluate.py opens runs read-only on purpose."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_DropReadOnlyNotice())


def _from_aborted_restore(unraisable: Any) -> bool:
  exc, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
  return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or (
      code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename)


def _drop_aborted_restore_noise() -> None:
  """Silences the unraisable-exception tracebacks that follow an aborted orbax restore.

  When one array of a restore fails, orbax closes its asyncio loop while other TensorStore reads are still in
  flight: their completion callbacks raise RuntimeError("Event loop is closed") and the other failed read
  coroutines are finalized with their exceptions unretrieved. Python reports each as an unraisable exception,
  a traceback on stderr around the one-line error, some after the restore has returned. So this filter is
  installed before restoring and stays; only those two kinds are dropped, anything else still reaches the
  previous hook. asyncio's log reports and the never-awaited warnings of those orphaned orbax reads are
  filtered at the same time.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_drops_aborted_restore_noise", False):
    return

  def hook(unraisable):
    if not _from_aborted_restore(unraisable):
      previous(unraisable)

  hook._drops_aborted_restore_noise = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_DropAbortedRestoreTasks())
  # Reads that never started are reported at interpreter exit; these are orbax's read coroutines only.
  warnings.filterwarnings("ignore", category=RuntimeWarning,
                          message=r"coroutine '(_read_\w+|async_deserialize)' was never awaited")


class _DropAbortedRestoreTasks(logging.Filter):
  """Drops asyncio's reports of unretrieved / destroyed orbax read tasks and futures after a failed restore.

  The sibling reads of a failed restore are garbage-collected later, and asyncio logs each on stderr after
  the one-line error. Only orbax tasks are dropped.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    first_line = message.split("\n", 1)[0]
    orphaned = first_line.endswith("exception was never retrieved") or first_line.startswith(
        "Task was destroyed but it is pending")  # a Task or a _GatheringFuture of the restore's reads
    if not orphaned:
      return True
    if record.exc_info and record.exc_info[2] is not None:  # the orbax frames are often only in here
      message += "".join(traceback.format_tb(record.exc_info[2]))
    # orbax's own frames, or TensorStore's read error for the checkpoint's OCDBT files (raw read futures)
    return not (f"{os.sep}orbax{os.sep}" in message or "in OCDBT database at" in message)


class _DataHandler(grain.checkpoint.CheckpointHandler):
  """grain's iterator handler that also restores a checkpoint saved by a different number of processes.

  grain writes one process_<i>-of-<n>.json per process and reads back only its own name, so a 1-process
  checkpoint could not resume in 2 processes. The train iterator's state is the global batch index, the
  same on every process whatever their number (data/pipeline.py), so a missing own file is replaced by
  the saved processes' common state; saved states that differ are an error. The files are grain's own
  (checkpoints written before this handler restore unchanged); the metadata names this class.
  """

  def restore(self, directory: Any, item: Any = None, args: Any = None) -> Any:
    if (directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json").exists():
      return super().restore(directory, item, args)
    states = {f.read_text() for f in directory.glob("process_*-of-*.json")}
    if len(states) != 1:
      what = "differ between the processes that saved them" if states else "are missing"
      raise ValueError(f"the data iterator states in {directory} {what}, so none can be restored on "
                       f"{jax.process_count()} process(es).")
    item = item or args.item
    item.set_state(json.loads(states.pop()))
    item.start_prefetch()
    return item


# orbax maps each args type to one handler type: grain's CheckpointSave/Restore belong to grain's handler.
@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
  item: Any


def checkpoint_dir(workdir: str) -> epath.Path:
  return paths.run_path(workdir) / "checkpoints"


class Checkpointer:
  """make / save / restore / wait, so moving to orbax v1 is a one-file change."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 and not read_only else None, create=not read_only,
        read_only=read_only, save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=False)
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                "data": _DataHandler()}
    if read_only and not self.directory.is_dir():
      self._manager = None
    else:
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps()) if self._manager else []

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, data_iterator: Any, config_dict: dict) -> bool:
    """Saves unless this step is already on disk (never overwrites). Returns whether a save started."""
    if step in self.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data=_DataSave(data_iterator),
        config=ocp.args.JsonSave(config_dict)), force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
    """Restores the full TrainState into `abstract_state`'s shapes/shardings (and the iterator in place)."""
    items = {"state": ocp.args.PyTreeRestore(
        item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    if data_iterator is not None:
      items["data"] = _DataRestore(data_iterator)
    restored = self._restore(step, items)
    return restored["state"]

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Params only (no optimizer state needed), e.g. for evaluate.py."""
    abstract = {"params": abstract_params}
    restored = self._restore(step, {"state": ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)})
    return restored["state"]["params"]

  def restore_config(self, step: int) -> dict:
    return self._restore(step, {"config": ocp.args.JsonRestore()})["config"]

  def _restore(self, step: int, items: dict) -> Any:
    where = self.directory / str(step)
    _drop_aborted_restore_noise()  # before: some of that noise comes before orbax's error propagates
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for corrupt/truncated files; report one sentence.
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      reason = reason.split(" See full TensorStore details")[0][:200]  # that part is a bound-method repr
      raise CheckpointError(f"the checkpoint at {where} is unreadable or does not match this model "
                            f"({type(e).__name__}: {reason}); it was left untouched.") from e

  def reached_preemption(self, step: int) -> bool:
    """Whether every host has reached the step at which a preempted multi-host run saves and stops.

    orbax's check of JAX's preemption sync point (SIGTERM on any host is propagated to all); always False
    in a single process, where the loop's own signal handler stops the run.
    """
    return bool(self._manager and self._manager.reached_preemption(step))

  def wait(self) -> None:
    if self._manager:
      self._manager.wait_until_finished()

  def close(self) -> None:
    if self._manager:
      self._manager.wait_until_finished()
      self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying target shardings, for restoring directly into place."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def merge_params(fresh: Any, loaded: Any) -> tuple[Any, list[str], list[str]]:
  """`fresh` with every leaf that `loaded` has at the same path and shape replaced by the loaded one.

  Returns (params, the reused paths, the paths kept fresh), paths as "a/b/c".
  """
  loaded_flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
                 for path, leaf in jax.tree_util.tree_leaves_with_path(loaded)}
  reused, kept = [], []

  def pick(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    other = loaded_flat.get(name)
    if other is not None and other.shape == leaf.shape:
      reused.append(name)
      return other.astype(leaf.dtype)
    kept.append(name)
    return leaf
  return jax.tree_util.tree_map_with_path(pick, fresh), reused, kept
