"""Compaction of kept positions into a static capacity (specs/token_free.md §19.2, MrT5 §3.4)."""

import jax
import jax.numpy as jnp


def compact_indices(keep: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """The kept positions of each row, in order, padded to a static capacity.

  keep [B, T] bool -> (indices [B, C] int32, valid [B, C] bool), C = capacity. Row b's first
  n_b = min(sum(keep[b]), C) slots hold its kept positions in increasing order (MrT5's
  pos_t = cumsum(keep)_t - 1 scatter, as a stable argsort of ~keep); later slots have valid False and
  index T - 1 (a real position, so gathers stay in bounds). Kept positions beyond C are dropped: callers
  pick C >= max_b sum(keep[b]).
  """
  t = keep.shape[-1]
  if not 1 <= capacity <= t:
    raise ValueError(f"capacity must be in [1, {t}] (the sequence length), got {capacity}.")
  order = jnp.argsort(~keep, axis=-1, stable=True)[:, :capacity].astype(jnp.int32)
  valid = jnp.arange(capacity) < jnp.sum(keep, axis=-1, keepdims=True)
  return jnp.where(valid, order, t - 1), valid


def gather_rows(x: jax.Array, indices: jax.Array) -> jax.Array:
  """x [B, T, ...] gathered along T at indices [B, C] -> [B, C, ...]."""
  idx = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)
