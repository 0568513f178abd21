"""T5 relative position bias (specs/token_free.md §2.3): buckets of key-minus-query distances, looked up in a
learned per-head table and added to the attention logits.

For query position qp_i and key position kp_j, relative_position rp = kp_j - qp_i and, exactly as T5's
`_relative_position_bucket` (mesh-tensorflow / HF transformers `T5Attention`):

  bidirectional:  nb = num_buckets // 2;  bucket = nb * [rp > 0];  n = |rp|
  causal:         nb = num_buckets;       bucket = 0;             n = -min(rp, 0)      (n >= 0)
  max_exact = nb // 2
  bucket += n                                                                  if n < max_exact
  bucket += min(nb - 1, max_exact + int32(log(n / max_exact) / log(max_distance / max_exact)
                                           * (nb - max_exact)))                otherwise

with the log and the products in float32 and int32 truncation, as T5. The bias of (head h, query i, key j)
is table[h, bucket_ij] (the table is [H, num_buckets], one row per query head).

`relative_position_bucket` is plain elementwise jnp (int32 arithmetic, one f32 log), so the Pallas kernels
and the blockwise XLA implementation evaluate it per tile from the position tiles; `relative_bias` is the
materialised [B, H, T, S] bias of the reference implementation. `check_table` is the public entry's
validation of the table and the static bucket parameters.
"""

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp


def _half_and_exact(num_buckets: int, bidirectional: bool) -> tuple[int, int]:
  """(nb, max_exact) of the module docstring: the buckets per sign and the exact ones among them."""
  nb = num_buckets // 2 if bidirectional else num_buckets
  return nb, nb // 2


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """T5's bucket (int32, in [0, num_buckets)) of each relative_position = key position - query position.

  Args:
    relative_position: int array of any shape (memory_position - query_position).
    bidirectional: half of the buckets for each sign of rp (encoder) or only rp <= 0 (causal decoder;
      every rp > 0 maps to bucket 0).
    num_buckets: table width (32 in T5).
    max_distance: distances at and beyond it share the last bucket (128 in T5).

  Returns:
    int32 buckets, the shape of relative_position.
  """
  rp = jnp.asarray(relative_position).astype(jnp.int32)
  nb, max_exact = _half_and_exact(num_buckets, bidirectional)
  if bidirectional:
    bucket = jnp.where(rp > 0, nb, 0)
    n = jnp.maximum(rp, -rp)  # |rp| (integer abs without math.absi, which some kernel backends lack)
  else:
    bucket = jnp.zeros_like(rp)
    n = -jnp.minimum(rp, 0)
  # The log branch is only selected for n >= max_exact; clamping its argument there keeps log(0) = -inf
  # (and its int32 conversion) out of the unselected lanes without changing a selected one.
  n_large = jnp.maximum(n, max_exact).astype(jnp.float32)
  large = max_exact + (jnp.log(n_large / max_exact) / math.log(max_distance / max_exact)
                       * (nb - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, nb - 1)
  return bucket + jnp.where(n < max_exact, n, large)


def relative_bias(table: jax.Array, q_positions: jax.Array, kv_positions: jax.Array, *,
                  bidirectional: bool, max_distance: int) -> jax.Array:
  """Materialised bias [B, H, T, S] = table[h, bucket(kv_positions_j - q_positions_i)].

  Args:
    table: [H, num_buckets] float.
    q_positions: [B, T] int.
    kv_positions: [B, S] int.
    bidirectional, max_distance: as `relative_position_bucket`.
  """
  bucket = relative_position_bucket(kv_positions[:, None, :] - q_positions[:, :, None],
                                    bidirectional=bidirectional, num_buckets=table.shape[1],
                                    max_distance=max_distance)  # [B, T, S]
  return jnp.moveaxis(table[:, bucket], 0, 1)


def check_table(table: Any, num_heads: int, bidirectional: bool, max_distance: Any) -> None:
  """Raises one ValueError sentence unless `table` is a float [num_heads, num_buckets] table whose bucket
  parameters the T5 formula accepts: num_buckets >= 2 (causal) or even and >= 4 (bidirectional), so that
  max_exact >= 1, and an int max_distance > max_exact (so log(max_distance / max_exact) > 0)."""
  shape, dtype = jnp.shape(table), jnp.result_type(table)
  num_buckets = shape[1] if len(shape) == 2 else 0
  _, max_exact = _half_and_exact(num_buckets, bidirectional)
  ok = (len(shape) == 2 and shape[0] == num_heads and jnp.issubdtype(dtype, jnp.floating)
        and max_exact >= 1 and (num_buckets % 2 == 0 or not bidirectional)
        and isinstance(max_distance, numbers.Integral) and not isinstance(max_distance, bool)
        and max_distance > max_exact)
  if not ok:
    need = "even and >= 4" if bidirectional else ">= 2"
    raise ValueError(
        f"relative_bias must be a float table of shape ({num_heads}, num_buckets) ([H, num_buckets], one "
        f"row per query head) with num_buckets {need} (relative_bidirectional={bidirectional}) and "
        f"relative_max_distance an int > num_buckets // {4 if bidirectional else 2}; got {dtype} "
        f"{shape} and relative_max_distance={max_distance!r}.")
