"""Multi-process initialisation. Call before anything touches `jax.devices()`.

On a TPU pod every host runs the same command and `jax.distributed.initialize()` auto-detects the
topology. Elsewhere (several GPU hosts, or several CPU processes on one machine for tests) set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. A single process needs nothing.

Every wait is bounded: JAX_COORDINATOR_TIMEOUT (seconds, default 300) for reaching the coordinator at the
start, JAX_HEARTBEAT_TIMEOUT (default 100) after which the survivors of a process that died or hung fail
instead of waiting in a collective. `check_same_config` exchanges a hash of the resolved config, so
processes started with different commands stop with one line each instead of diverging or hanging.
"""

import hashlib
import json
import os
import sys
import threading
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from data import corpora
from training.errors import ConfigError

TIMEOUT_ENV, HEARTBEAT_ENV = "JAX_COORDINATOR_TIMEOUT", "JAX_HEARTBEAT_TIMEOUT"


def _int_env(name: str, default: int | None = None) -> int:
  value = os.environ.get(name)
  if value is None:
    if default is None:
      raise ConfigError(f"JAX_COORDINATOR_ADDRESS is set, so {name} must be set too.")
    return default
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name} must be an integer, got {value!r}.") from None

_initialized = False


def _on_multihost_tpu() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize() -> None:
  """Starts jax.distributed when the environment describes more than one process; else a no-op."""
  global _initialized
  if _initialized:
    return
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  timeouts = dict(initialization_timeout=_int_env(TIMEOUT_ENV, 300),
                  heartbeat_timeout_seconds=_int_env(HEARTBEAT_ENV, 100))
  if address:
    num_processes, process_id = _int_env("JAX_NUM_PROCESSES"), _int_env("JAX_PROCESS_ID")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"JAX_PROCESS_ID must be in [0, {num_processes}), got {process_id}.")
    where = f"the coordinator at {address} (process {process_id} of {num_processes})"
    kwargs = dict(coordinator_address=address, num_processes=num_processes, process_id=process_id)
  elif _on_multihost_tpu():
    where, kwargs = "the TPU pod's coordinator", {}
  else:
    return
  seconds = timeouts["initialization_timeout"]
  message = (f"could not start jax.distributed with {where} within {seconds} s ({TIMEOUT_ENV}): the "
             "other processes did not all connect.")
  # XLA's client aborts the whole process (a C++ check failure, no Python exception) when the connection
  # deadline passes, so a watchdog says it in one line and exits first; XLA's own deadline is later.
  watchdog = threading.Timer(seconds, _exit_with, (message,))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**kwargs, **{**timeouts, "initialization_timeout": seconds + 30})
  except Exception as e:  # noqa: BLE001 - XLA's runtime raises several types; one sentence for all
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise ConfigError(f"could not start jax.distributed with {where}: {reason}") from None
  finally:
    watchdog.cancel()
  _initialized = True


def _exit_with(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(1)  # noqa: SLF001 - the main thread is blocked inside XLA; nothing else can stop it cleanly


def config_hash(config_dict: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_config(config_dict: dict[str, Any]) -> None:
  """With several processes: every process must run the same resolved config, else one ConfigError each."""
  if jax.process_count() == 1:
    return
  mine = config_hash(config_dict)
  gathered = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(mine), np.uint8))
  hashes = [bytes(np.asarray(row, np.uint8)).hex() for row in np.asarray(gathered).reshape(jax.process_count(), -1)]
  if len(set(hashes)) > 1:
    others = ", ".join(f"process {i}: {h}" for i, h in enumerate(hashes))
    raise ConfigError(f"the run config differs between processes ({others}); every process must run the "
                      "same command with the same overrides.")


def prepare_data(data_config: Any, splits: Sequence[str]) -> None:
  """Builds the byte-store cache of `splits` (data/corpora.py) on process 0 before the others open it.

  With a cache directory that all hosts share, only process 0 scans the corpus; on host-local disks each
  other host then builds its own copy. Afterwards every process reads only its own windows from the
  memory map. A build error on process 0 is raised after the barrier, so the others fail the same way
  (they open the same corpus) instead of waiting for it.
  """
  if jax.process_count() == 1:
    corpora.prepare(data_config, splits)
    return
  error = None
  if jax.process_index() == 0:
    try:
      corpora.prepare(data_config, splits)
    except corpora.DataError as e:
      error = e
  multihost_utils.sync_global_devices("byte store built")
  if error is not None:
    raise error
  corpora.prepare(data_config, splits, show_progress=False)
