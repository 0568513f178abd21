"""Tile sizes for the blockwise landmark attention (`ops.landmark.xla`).

Queries are tiled into blocks of `block_q` rows and keys into blocks of `block_kv` slots. `block_kv` must
be a multiple of the landmark block size so every key tile holds whole landmark blocks (spec §2.5: the
Triton kernel uses one landmark block per key tile; here a tile may hold several). The Pallas kernels
(`ops.landmark.pallas_tpu`, `ops.landmark.pallas_gpu`) read the same dataclass; the GPU one rounds the
tiles to powers of two.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from ops import validation
from ops.tiling import round_up


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the blockwise landmark attention forward and backward.

  Attributes:
    block_q: query rows per tile; clamped to the query length (rounded up to 8).
    block_kv: key slots per tile; must be a multiple of the landmark block_size of the call (checked by
      `ops.landmark.landmark_attention`); clamped to the key length rounded up to the landmark block.
  """
  block_q: int = 256
  block_kv: int = 256

  def __post_init__(self):
    validation.check_positive_int_fields(self, ("block_q", "block_kv"))

  # Mosaic TPU tiles the key axis in lanes of 128: a key tile must be a multiple of both 128 and the
  # landmark block, and lcm(block_size, 128) above this is too large a tile (e.g. 51 -> 6528).
  TPU_MAX_KV_TILE = 1024

  @staticmethod
  def tpu_kv_tile(block_size: int) -> int | None:
    """The smallest TPU-legal key tile holding whole landmark blocks, or None if there is none."""
    tile = math.lcm(block_size, 128)
    return tile if tile <= BlockSizes.TPU_MAX_KV_TILE else None

  @classmethod
  def get_default(cls, q_len: int, kv_len: int, head_dim: int, block_size: int,
                  dtype: Any = jnp.float32, backend: str | None = None) -> "BlockSizes":
    """Default tiles for one call: about 256 x 256, block_kv a multiple of the landmark block size.

    A heuristic, not a tuned table. Each tile materialises a few [block_q, block_kv] f32 arrays per
    (batch, head), so 256 x 256 keeps them small; short sequences use one tile. On TPU block_kv is a
    multiple of `tpu_kv_tile(block_size)` (lanes of 128) when one exists. `dtype` does not change
    the choice.

    Args:
      q_len: number of queries T.
      kv_len: number of key slots S.
      head_dim: head dimension D.
      block_size: landmark block size (regular tokens + 1 landmark), >= 2.
      dtype: input dtype of q/k/v.
      backend: `jax.default_backend()` name; None means the current default.

    Returns:
      A `BlockSizes` whose block_kv is a multiple of block_size.
    """
    del dtype  # Same tiles for every dtype.
    block_q = 128 if head_dim > 128 else 256
    block_kv = block_size * max(1, 256 // block_size)
    tpu_tile = cls.tpu_kv_tile(block_size)
    if (backend or jax.default_backend()) == "tpu" and tpu_tile is not None:
      block_kv = tpu_tile * max(1, 256 // tpu_tile)
    return cls(block_q=min(block_q, round_up(max(q_len, 1), 8)),
               block_kv=min(block_kv, round_up(max(kv_len, 1), block_size)))
