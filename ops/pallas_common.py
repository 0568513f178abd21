"""Helpers shared by the Pallas kernels of the op packages (attention, landmark, gla).

  * in-kernel helpers on one tile (plain jnp): `any_mask`, `split_refs` and the flash-style kernels'
    `finalize`, `matmul_tn`, `matmul_nn` (re-exported by `ops.attention.tile_math` and
    `ops.landmark.tile_math`);
  * the `interpret` and compiler parameters of each backend's `pallas_call`, and `MIN_TILE`.
The `pallas_call`s themselves live in each package's `pallas_tpu.py` / `pallas_gpu.py`.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
MIN_TILE = 16  # Triton's smallest dot tile


# ---- Parameters of a `pallas_call`. ----


def tpu_interpret_params(interpret: bool):
  """`interpret` argument of a Mosaic TPU `pallas_call`: the TPU interpreter on CPU, or compiled."""
  return pltpu.InterpretParams() if interpret else False


def tpu_compiler_params(grid_rank: int):
  """Mosaic params for a grid whose last axis is the sequential reduction and the others parallel."""
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * (grid_rank - 1) + ("arbitrary",))


def triton_compiler_params(head_dim: int):
  return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


# ---- In-kernel helpers (plain jnp on one tile). ----


def any_mask(mask: jax.Array) -> jax.Array:
  """Whether a bool tile has any True (a float max rather than a bool reduction: Mosaic lowers float
  reductions everywhere)."""
  return jnp.max(jnp.where(mask, 1.0, 0.0)) > 0.0


def split_refs(refs, has_bias: bool):
  """(bias_ref or None, the remaining refs) of a kernel whose optional bias ref comes first."""
  if has_bias:
    return refs[0], refs[1:]
  return None, refs


def finalize(m, l, acc) -> tuple[jax.Array, jax.Array]:
  """(o [bq, D] f32, lse [bq, 1]) from the online-softmax state; rows with l = 0 (nothing in the
  normaliser) give o = 0 and lse = 0."""
  has_key = l > 0.0
  l_safe = jnp.where(has_key, l, 1.0)
  return acc / l_safe, jnp.where(has_key, m + jnp.log(l_safe), 0.0)


def matmul_tn(x, y) -> jax.Array:
  """x^T y in f32: x [n, a], y [n, b] -> [a, b]."""
  return jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def matmul_nn(x, y) -> jax.Array:
  """x y in f32: x [a, n], y [n, b] -> [a, b]."""
  return jax.lax.dot_general(x, y, (((1,), (0,)), ((), ())), preferred_element_type=F32)
