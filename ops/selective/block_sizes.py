"""Query block size of the blockwise selective-attention implementation (`ops.selective.xla`).

The XLA form scans query blocks of `block_q` rows against all S keys, carrying the column sums of the
selection matrix; its per-step memory is O(block_q * S) per head.
"""

import dataclasses

from ops import validation
from ops.tiling import round_up

DEFAULT_BLOCK_Q = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of `ops.selective.xla`.

  Attributes:
    block_q: query rows per scan step (clamped to the query length). Larger blocks mean fewer
      sequential steps but a larger [H, block_q, S] f32 tile of logits per step.
  """
  block_q: int = DEFAULT_BLOCK_Q

  def __post_init__(self):
    validation.check_positive_int_fields(self, ("block_q",))

  @classmethod
  def get_default(cls, q_len: int, block_q: int | None = None) -> "BlockSizes":
    """`block_q` (default 128) shrunk to the query length rounded up to a multiple of 8."""
    block_q = DEFAULT_BLOCK_Q if block_q is None else block_q
    if isinstance(block_q, int) and not isinstance(block_q, bool) and block_q > 0:
      block_q = min(block_q, round_up(max(q_len, 1), 8))
    return cls(block_q=block_q)
