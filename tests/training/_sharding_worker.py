"""Subprocess worker for tests/training/test_sharding.py: reports how state and batches land on a mesh.

Run from the repository root with its own device count, which must be set before jax starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m tests.training._sharding_worker DATA FSDP TENSOR

Builds the tiny model's TrainState as `training.loop.run` does (`state_shardings` under the mesh and the
logical-axis rules, a jitted init with those out_shardings), assembles one global batch and runs one train step
on the mesh (with and without gradient accumulation) and on a 1-device mesh, then prints one JSON object of
facts on stdout for the parent test to assert on.
"""

import json
import sys

import flax.linen as nn
import jax
import numpy as np

import models
from configs import tiny
from training import runtime
from training import sharding
from training import train_step as ts

BATCH_SIZE = 8
SEQ_LEN = 16
D_MODEL, NUM_HEADS, MLP_DIM = 64, 8, 128


def _spec(sharding_: jax.sharding.NamedSharding) -> list:
  return [list(a) if isinstance(a, tuple) else a for a in sharding_.spec]


def _leaf_report(x: jax.Array) -> dict:
  """Bytes of the whole array and of the largest per-device shard."""
  shard_bytes = max(s.data.nbytes for s in x.addressable_shards)
  return {"total": x.nbytes, "per_device": shard_bytes, "replicated": x.sharding.is_fully_replicated}


def _local_batch() -> dict[str, np.ndarray]:
  """Packed rows (two documents each) with some zero-weight targets, as the data pipeline makes them."""
  rng = np.random.default_rng(0)
  boundary = 9
  t = np.arange(SEQ_LEN)
  return {"inputs": rng.integers(3, 259, (BATCH_SIZE, SEQ_LEN), dtype=np.int32),
          "targets": rng.integers(3, 259, (BATCH_SIZE, SEQ_LEN), dtype=np.int32),
          "weights": (rng.random((BATCH_SIZE, SEQ_LEN)) > 0.2).astype(np.float32),
          "segment_ids": np.repeat(np.where(t < boundary, 1, 2)[None], BATCH_SIZE, 0).astype(np.int32),
          "positions": np.repeat(np.where(t < boundary, t, t - boundary)[None], BATCH_SIZE, 0).astype(np.int32)}


def _step(model, tx, schedule, config, mesh, local, grad_accum):
  """(state before, state after, metrics) of one jitted train step on `mesh`, as training.loop runs it."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.axis_rules(config.mesh)):
    _, shardings = ts.state_shardings(model, tx, config, mesh)
    init = jax.jit(lambda r: nn.unbox(ts.init_train_state(model, tx, r, SEQ_LEN)), out_shardings=shardings)
    state = init(jax.random.key(0))
    batch = sharding.global_batch(local, mesh)
    train_fn, _ = ts.make_step_fns(model, tx, schedule, grad_accum)
    step = jax.jit(train_fn, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, None))
    new_state, metrics = step(state, batch)
    return state, new_state, jax.device_get(metrics), batch


def main(argv: list[str]) -> None:
  data, fsdp, tensor = (int(a) for a in argv[1:4])
  config = tiny.get_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
  config.train.batch_size, config.train.seq_len = BATCH_SIZE, SEQ_LEN
  config.model.d_model, config.model.num_heads, config.model.mlp_dim = D_MODEL, NUM_HEADS, MLP_DIM
  config.optimizer.warmup_steps = 0  # the first step already moves the params
  config = runtime.resolve_config(config)
  model = models.get_family(config.model)
  tx, schedule = ts.make_optimizer(config.optimizer, config.train.steps)
  local = _local_batch()

  with runtime.mesh_context(config) as mesh:
    mesh_shape = dict(mesh.shape)
  state, new_state, metrics, batch = _step(model, tx, schedule, config, mesh, local, 1)
  _, accum_state, accum_metrics, _ = _step(model, tx, schedule, config, mesh, local, 2)
  one_device = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  _, ref_state, ref_metrics, _ = _step(model, tx, schedule, config, one_device, local, 1)

  def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))

  params = jax.tree_util.tree_flatten_with_path(state.params)[0]
  embedding = state.params["embed"]["embedding"]
  mu = state.opt_state[-1][0].mu  # chain(clip, adamw); adamw = chain(scale_by_adam, ...) -> adam state
  inputs = batch["inputs"]
  report = {
      "mesh": mesh_shape,
      "num_devices": jax.device_count(),
      "dims": {"d_model": D_MODEL, "num_heads": NUM_HEADS, "mlp_dim": MLP_DIM},
      "embedding_spec": _spec(embedding.sharding),
      "embedding_shard_shape": list(embedding.addressable_shards[0].data.shape),
      "embedding_mu_spec": _spec(mu["embed"]["embedding"].sharding),
      "mlp_wi_spec": _spec(state.params["layer_0"]["mlp"]["wi_gate"]["kernel"].sharding),
      "query_spec": _spec(state.params["layer_0"]["mixer"]["query"]["kernel"].sharding),
      "params": {jax.tree_util.keystr(path): _leaf_report(x) for path, x in params},
      "stepped_shardings_equal": all(
          a.sharding == b.sharding for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state))),
      "lr": float(metrics["lr"]),
      "losses": {"mesh": float(metrics["loss"]), "mesh_accum2": float(accum_metrics["loss"]),
                 "one_device": float(ref_metrics["loss"])},
      "grad_norms": {"mesh": float(metrics["grad_norm"]), "mesh_accum2": float(accum_metrics["grad_norm"]),
                     "one_device": float(ref_metrics["grad_norm"])},
      "param_diff_vs_one_device": {"mesh": max_diff(new_state, ref_state),
                                   "mesh_accum2": max_diff(accum_state, ref_state)},
      "batch_spec": _spec(inputs.sharding),
      "batch_shard_shapes": sorted({tuple(s.data.shape) for s in inputs.addressable_shards}),
      "batch_row_blocks": sorted({s.index[0].start or 0 for s in inputs.addressable_shards}),
      "batch_roundtrip": bool(np.array_equal(np.asarray(inputs), local["inputs"])),
  }
  print(json.dumps(report))


if __name__ == "__main__":
  main(sys.argv)
