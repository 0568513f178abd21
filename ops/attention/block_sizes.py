"""Block sizes for the blockwise (flash-style) attention implementations.

The XLA implementation (`ops.attention.xla`) tiles queries into blocks of `block_q` rows and keys into
blocks of `block_kv` columns, so it never materialises more than a `block_q x block_kv` tile of logits per
(batch, head). The Pallas kernels (`ops.attention.pallas_tpu`, `ops.attention.pallas_gpu`) read the same
dataclass.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ops import validation
from ops.tiling import round_up


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the blockwise attention forward and backward.

  Attributes:
    block_q: query rows per tile. Implementations clamp it to the query length, so a large value means
      "all queries in one block".
    block_kv: key columns per tile (the online-softmax step). Also clamped to the key length.
  """
  block_q: int = 512
  block_kv: int = 512

  def __post_init__(self):
    validation.check_positive_int_fields(self, ("block_q", "block_kv"))

  @classmethod
  def get_default(cls, q_len: int, kv_len: int, head_dim: int, dtype: Any = jnp.float32,
                  backend: str | None = None) -> "BlockSizes":
    """Default tiles for one attention call.

    A heuristic, not a tuned table: 512 x 512 tiles (256 x 512 for head_dim > 128 to bound the f32
    accumulator), shrunk to the sequence lengths rounded up to a multiple of 8 so short sequences use
    one block. `dtype` and `backend` do not change the choice (they are arguments so that per-backend
    tiles need no change of callers).

    Args:
      q_len: number of queries T.
      kv_len: number of keys S.
      head_dim: head dimension D.
      dtype: input dtype of q/k/v.
      backend: `jax.default_backend()` name ("cpu", "gpu", "tpu"); None means the current default.

    Returns:
      A `BlockSizes`.
    """
    del dtype  # Same tiles for every dtype.
    backend = backend or jax.default_backend()
    del backend  # Same heuristic on every backend.
    block_q = 256 if head_dim > 128 else 512
    block_kv = 512
    return cls(block_q=min(block_q, round_up(max(q_len, 1), 8)),
               block_kv=min(block_kv, round_up(max(kv_len, 1), 8)))
