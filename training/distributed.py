"""Multi-process initialisation. Call before anything touches `jax.devices()`.

On a TPU pod every host runs the same command and `jax.distributed.initialize()` auto-detects the
topology. Elsewhere (several GPU hosts, or several CPU processes on one machine for tests) set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. A single process needs nothing.
"""

import os

import jax

_initialized = False


def _on_multihost_tpu() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize() -> None:
  """Starts jax.distributed when the environment describes more than one process; else a no-op."""
  global _initialized
  if _initialized:
    return
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
    _initialized = True
  elif _on_multihost_tpu():
    jax.distributed.initialize()
    _initialized = True
