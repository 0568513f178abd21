"""Device mesh ("data", "fsdp", "tensor") and logical-axis -> mesh-axis placement.

Parameters carry logical axis names (models/layers.py); `config.mesh.logical_axis_rules` maps them to mesh
axes. Axis types are `Auto` (GSPMD propagation) everywhere: kernels never see the mesh.
"""

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from training.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the global batch is split over both data-parallel axes


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves the one allowed -1 in (mesh.data, mesh.fsdp, mesh.tensor) against the device count."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one of mesh.data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but "
                     f"{num_devices} are available.")
  return tuple(sizes)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def axis_rules(mesh_config: Any) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in mesh_config.logical_axis_rules)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` (others replicate)."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, ...] arrays: rows split over ("data", "fsdp"), everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_splits(mesh: Mesh, batch_sizes: Mapping[str, int]) -> None:
  """One ConfigError line for a batch ({config key: size}) that the batch axes do not split evenly, or for
  a mesh whose batch shards do not split evenly over the processes (each process feeds only its own rows)."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for key, size in batch_sizes.items():
    if size % shards:
      raise ConfigError(f"{key} {size} does not split over data x fsdp = {shards} batch shards of the mesh "
                        f"{dict(mesh.shape)}.")
  local = {index[0].start for index in batch_sharding(mesh).addressable_devices_indices_map((shards,)).values()}
  if len(local) * jax.process_count() != shards:
    raise ConfigError(f"the mesh {dict(mesh.shape)} puts {len(local)} of its {shards} batch shard(s) on process "
                      f"{jax.process_index()}, not 1/{jax.process_count()} of them (each process feeds its own "
                      f"rows): data x fsdp must span the processes, tensor stay within one.")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's rows into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def process_rows(global_rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's contiguous share of a batch that every process built in full (eval batches)."""
  count, index = jax.process_count(), jax.process_index()
  def take(x):
    rows = x.shape[0]
    if rows % count:
      raise ValueError(f"batch of {rows} rows does not split over {count} processes.")
    return x[index * rows // count:(index + 1) * rows // count]
  return {k: take(np.asarray(v)) for k, v in global_rows.items()}
