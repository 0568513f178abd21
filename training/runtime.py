"""Setup shared by training (training/loop.py) and evaluation (training/evaluation.py).

resolve_config checks and completes a run config; mesh_context makes the device mesh and the logical-axis
rules current; use_compilation_cache points XLA's persistent compilation cache at the configured directory;
abstract_params gives the parameters' shapes and shardings without allocating them (and
without an optimizer); describe_run is the start line printed before compilation.
"""

import contextlib
import os
from typing import Any, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np

import models
from data import corpora
from models import layers
from training import host_allocator
from training import sharding
from training.errors import ConfigError


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates cross-field constraints and fills derived values (train.compute_dtype "auto" -> the dtype
  that is fast on this backend; model.dtype from it)."""
  config = ml_collections.ConfigDict(config.to_dict())
  t = config.train
  if t.steps <= 0 or t.batch_size <= 0 or t.seq_len <= 0:
    raise ConfigError(f"train.steps, train.batch_size and train.seq_len must be positive, got "
                      f"{t.steps}, {t.batch_size}, {t.seq_len}.")
  if t.grad_accum <= 0 or t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum "
                      f"({t.grad_accum}).")
  if t.compute_dtype == "auto":
    t.compute_dtype = auto_compute_dtype()
  if t.compute_dtype not in layers.DTYPES:
    raise ConfigError(f"train.compute_dtype must be 'auto' or one of {sorted(layers.DTYPES)}, got "
                      f"{t.compute_dtype!r}.")
  config.model.dtype = t.compute_dtype
  if config.optimizer.get("schedule", "cosine") not in ("cosine", "linear"):
    raise ConfigError(f"optimizer.schedule must be 'cosine' or 'linear', got {config.optimizer.schedule!r}.")
  profile = tuple(t.get("profile_steps", ()))
  if profile and not (len(profile) == 2 and all(isinstance(s, int) for s in profile)
                      and 1 <= profile[0] <= profile[1]):
    raise ConfigError(f"train.profile_steps must be two steps (first, last) with 1 <= first <= last, "
                      f"got {t.profile_steps!r}.")
  if isinstance(config.data.paths, str):  # --config.data.paths=a.txt gives a string
    config.data.paths = (config.data.paths,)
  _check_kernels_can_run(config.model)
  family(config)  # unknown family/mixer names and bad model options fail here, before any work
  return config


def auto_compute_dtype(backend: str | None = None, cpu_flags: frozenset[str] | None = None) -> str:
  """train.compute_dtype="auto": "bfloat16" on accelerators and on CPUs with AMX (XLA:CPU's bf16 matmul
  runs there at about 5x its f32 rate), else "float32". Without AMX bf16 matmuls are slower than f32 (0.5-0.6x
  on a 2-core AVX2 EPYC, whose whole step was 1.15-1.37x slower in bf16). CPUs with other bf16 instructions
  (AVX512_BF16 alone, Arm BF16) are unmeasured here and get f32, as does a system without /proc/cpuinfo."""
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return "bfloat16"
  flags = cpu_flags if cpu_flags is not None else _linux_cpu_flags()
  return "bfloat16" if "amx_bf16" in flags else "float32"


def _linux_cpu_flags() -> frozenset[str]:
  """The first CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def use_compilation_cache(config: ml_collections.ConfigDict) -> str:
  """Points JAX's persistent compilation cache at train.compilation_cache_dir, so that a resumed,
  repeated or evaluated run loads the programs an earlier process compiled (XLA keys them by program,
  backend and flags). "" = $JAX_COMPILATION_CACHE_DIR when set, else corpora.user_cache_dir("jax")
  (~/.cache/bytelab/jax); "off" disables it. Call it before anything compiles: JAX reads the setting at
  its first compile. Returns the directory ("" when off)."""
  setting = str(config.train.get("compilation_cache_dir", "") or "")
  if setting == "off":
    jax.config.update("jax_enable_compilation_cache", False)
    return ""
  if not setting and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]  # JAX applied it at import
  directory = os.path.expanduser(setting) if setting else corpora.user_cache_dir("jax")
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def family(config: ml_collections.ConfigDict) -> models.ModelFamily:
  """The model family of a run config, checked against its data settings (`ModelFamily.check_data`), with
  its errors as one-line ConfigErrors."""
  try:
    model_family = models.get_family(config.model)
    if "data" in config:
      model_family.check_data(config.data)
    return model_family
  except ValueError as e:
    raise ConfigError(str(e)) from None


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


def strip_boxes(tree: Any) -> Any:
  """Removes logical-partitioning boxes without applying sharding constraints (safe on abstract trees)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def boxed_abstract_params(model_family: models.ModelFamily, seq_len: int) -> Any:
  """The family's parameters as boxed ShapeDtypeStructs (logical axis names kept), nothing allocated."""
  return jax.eval_shape(lambda r: model_family.init(r, model_family.example_batch(1, seq_len)),
                        jax.random.key(0))


def abstract_params(model_family: models.ModelFamily, config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """(unboxed abstract params, their NamedShardings on `mesh`)."""
  boxed = boxed_abstract_params(model_family, config.train.seq_len)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, sharding.axis_rules(config.mesh))
  return strip_boxes(boxed), shardings


def param_count(abstract_tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_tree)))


def describe_run(workdir: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_params: int,
                 split_bytes: dict[str, int | None]) -> str:
  """The start line: what is about to compile, on what, with how much data."""
  devices = jax.devices()
  mesh_text = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
  data_text = ", ".join(f"{split} {'synthetic' if n is None else f'{n:,} B'}" for split, n in split_bytes.items())
  # On CPU the host allocator is the device allocator, and it sets the step time (training/host_allocator.py).
  host = f" ({host_allocator.active()})" if devices[0].platform == "cpu" else ""
  return (f"run {workdir}: {config.model.name} ({num_params:,} params, {config.train.compute_dtype}); "
          f"{len(devices)} {devices[0].platform} device(s) in {jax.process_count()} process(es){host}, mesh "
          f"{mesh_text}; data {config.data.source}: {data_text}; compiling...")
