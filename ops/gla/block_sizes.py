"""Chunk sizes for the chunkwise-parallel GLA implementation (specs/attention_variants.md §1.1).

The XLA implementation (`ops.gla.xla`) splits the sequence into chunks of `chunk_size` positions (the
inter-chunk state is passed between them by a scan) and each chunk into sub-chunks of `sub_chunk`
positions (secondary chunking, spec §1.1 "Secondary-level chunking"): pairs of different sub-chunks use a
matmul, the diagonal sub-blocks an elementwise f32 product. The Pallas kernels (`ops.gla.pallas_tpu`,
`ops.gla.pallas_gpu`) read the same dataclass, with a kernel default sub-chunk (`get_default(kernel=True)`).
"""

import dataclasses
import math

from ops import validation
from ops.tiling import round_up

# fla's chunk (spec §1.1 "fla's chunk kernel": BT = 64). fla's sub-chunk BC = 16 lives in registers;
# here both sub-chunk products are materialised, so the default sub-chunk is ~sqrt(C) instead (8 for 64).
DEFAULT_CHUNK_SIZE = 64
# Sub-chunk of the Pallas kernels (fla's BC): they never materialise more than one [c, C] score block, and
# 16 rows is the smallest tile of Triton's dot and of bf16 sublane packing on TPU.
KERNEL_SUB_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Chunk and sub-chunk lengths of the chunkwise GLA forward (and its backward).

  Attributes:
    chunk_size: positions per chunk C. Memory of the intra-chunk scores is O(T * C) per head; the
      number of sequential scan steps is ceil(T / C).
    sub_chunk: positions per sub-chunk c; must divide chunk_size. Diagonal sub-blocks cost an
      elementwise [c, c, K] f32 product per sub-chunk (O(T * c * K) memory), off-diagonal ones a matmul
      on C / c re-anchored key copies (O(T * C / c * K)), so c near sqrt(C) minimises the memory
      (on CPU at T = 4096, C = 64, c = 8 is ~20% faster than fla's 16 for forward+backward).
  """
  chunk_size: int = DEFAULT_CHUNK_SIZE
  sub_chunk: int = 8

  def __post_init__(self):
    validation.check_positive_int_fields(self, ("chunk_size", "sub_chunk"))
    if self.chunk_size % self.sub_chunk:
      raise ValueError(f"BlockSizes.sub_chunk ({self.sub_chunk}) must divide chunk_size "
                       f"({self.chunk_size}).")

  @classmethod
  def get_default(cls, seq_len: int, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  sub_chunk: int | None = None, kernel: bool = False) -> "BlockSizes":
    """Block sizes for one call of length `seq_len` with the caller's `chunk_size`.

    sub_chunk defaults to the largest divisor of chunk_size that is <= sqrt(chunk_size) (8 for 64;
    see the class docstring); with kernel=True (the Pallas kernels) to KERNEL_SUB_CHUNK = 16 when it
    divides chunk_size (fla's BC: 64 / 16), else to that same divisor. Sequences shorter
    than a chunk use one chunk of seq_len rounded up to a multiple of the sub-chunk, so a short
    sequence is not padded to 64. Results do not depend on the choice (up to f32 rounding).

    Args:
      seq_len: T.
      chunk_size: requested chunk length C (a positive int).
      sub_chunk: requested sub-chunk length (must divide chunk_size), or None.
      kernel: pick the Pallas kernels' default sub-chunk rather than the XLA one.

    Returns:
      A `BlockSizes`.

    Raises:
      ValueError: if chunk_size or sub_chunk is not a positive int or sub_chunk does not divide it.
    """
    if not validation.is_positive_int(chunk_size):
      raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if sub_chunk is None and kernel and chunk_size % KERNEL_SUB_CHUNK == 0:
      sub_chunk = KERNEL_SUB_CHUNK
    if sub_chunk is None:
      sub_chunk = max(d for d in range(1, math.isqrt(chunk_size) + 1) if chunk_size % d == 0)
    blocks = cls(chunk_size=chunk_size, sub_chunk=sub_chunk)  # validates sub_chunk
    short = round_up(max(seq_len, 1), blocks.sub_chunk)
    if short < blocks.chunk_size:
      blocks = cls(chunk_size=short, sub_chunk=blocks.sub_chunk)
    return blocks
