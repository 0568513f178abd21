"""Toucan's end-of-token stream (specs/token_free.md §7): an EOT token after every stored boundary.

The byte layers before pooling, the boundaries and the global stack see the bytes as they are; the byte
layers after upsampling run on the expanded stream, where every boundary byte t whose group is stored
(g_t < S - 1, `ops.pooling.groups`) is followed by one EOT position:

    bytes     x_0 ... x_t | x_{t+1} ...          (b_t = 1: the group ends at t)
    expanded  x_0 ... x_t  EOT  x_{t+1} ...
    targets   ...   EOT    x_{t+1} ...           (the last byte of a token predicts EOT; EOT predicts the
                                                  next token's first byte)

Byte t sits at P_t = t + e_t, e_t = min(g_t, S - 1) the EOTs inserted before it; its EOT at P_t + 1. The
expanded length is T' = T + S - 1 (padding after the last position). A byte reads slot e_t (the groups
complete before its own: Toucan decides a boundary by predicting EOT, so the group of byte t is not known
to be complete at t), its EOT reads slot e_t + 1, the group it closes. A byte whose group is not stored
(g_t >= S - 1) has no EOT and is an overflow byte: its loss is masked and counted as SpaceByte's are.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ops.pooling.groups import Groups


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["byte_position", "has_eot", "reads", "overflow", "positions", "segment_ids"],
                   meta_fields=["length"])
@dataclasses.dataclass(frozen=True)
class EotLayout:
  """Where each byte and its EOT go in the expanded stream (pytree; length static).

  byte_position [B, T] int32: P_t.     has_eot [B, T] bool: a stored boundary, EOT at P_t + 1.
  reads [B, T] int32: e_t, the slot byte t reads (its EOT reads e_t + 1).
  overflow [B, T] bool: g_t >= S - 1.  positions, segment_ids [B, T']: of the expanded stream (within-
  document positions counting the EOTs; segment 0 on padding).   length: T' = T + S - 1.
  """
  byte_position: jax.Array
  has_eot: jax.Array
  reads: jax.Array
  overflow: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  length: int


def eot_layout(ends: jax.Array, groups: Groups, segment_ids: jax.Array, positions: jax.Array) -> EotLayout:
  """The expanded layout of boundaries ends [B, T] (grouped as `groups`), module docstring."""
  b, t = ends.shape
  s = groups.capacity
  inserted = jnp.minimum(groups.exclusive, s - 1)
  has_eot = (ends != 0) & (groups.exclusive < s - 1)
  byte_position = jnp.arange(t, dtype=jnp.int32) + inserted
  # Within-document positions: the byte's own plus the EOTs inserted since its document's first byte.
  index = jnp.arange(t, dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  byte_pos_in_doc = positions + inserted - jnp.take_along_axis(inserted, first, axis=1)
  length = t + s - 1
  out_positions = expand(byte_pos_in_doc, byte_pos_in_doc + 1, byte_position, has_eot, length, 0)
  out_segments = expand(segment_ids, segment_ids, byte_position, has_eot, length, 0)
  return EotLayout(byte_position=byte_position, has_eot=has_eot, reads=inserted,
                   overflow=groups.exclusive >= s - 1, positions=out_positions, segment_ids=out_segments,
                   length=length)


def expand(at_bytes: jax.Array, at_eots: jax.Array, byte_position: jax.Array, has_eot: jax.Array,
           length: int, fill) -> jax.Array:
  """[B, T, ...] values of the bytes and of their EOTs -> the expanded [B, length, ...] (fill elsewhere)."""
  b = at_bytes.shape[0]
  out = jnp.full((b, length) + at_bytes.shape[2:], fill, at_bytes.dtype)
  rows = jnp.arange(b)[:, None]
  out = out.at[rows, byte_position].set(at_bytes)
  eot_position = jnp.where(has_eot, byte_position + 1, length)  # length: dropped (out of bounds)
  return out.at[rows, eot_position].set(at_eots.astype(at_bytes.dtype), mode="drop")


def expand_layout(layout: EotLayout, at_bytes: jax.Array, at_eots: jax.Array, fill) -> jax.Array:
  return expand(at_bytes, at_eots, layout.byte_position, layout.has_eot, layout.length, fill)


def next_byte_view(expanded: jax.Array, layout: EotLayout) -> jax.Array:
  """[B, T', ...] -> [B, T, ...]: at byte t, the position whose next token is byte t + 1 (its EOT's when
  it has one, else its own)."""
  index = layout.byte_position + layout.has_eot.astype(jnp.int32)
  return jnp.take_along_axis(expanded, index.reshape(index.shape + (1,) * (expanded.ndim - 2)), axis=1)


def eot_targets(targets: jax.Array, weights: jax.Array, layout: EotLayout, eot_id: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(expanded targets [B, T'], expanded weights [B, T'], byte weights [B, T]) of a causal_lm batch:
  a boundary byte's target becomes EOT and its EOT's target is the next byte, both weighted as that
  byte; overflow bytes weigh 0. The byte weights (what bpb divides by) are the batch weights less the
  overflow bytes, so an EOT's bits are charged to the bytes."""
  byte_weights = jnp.where(layout.overflow, 0.0, weights)
  at_bytes = jnp.where(layout.has_eot, eot_id, targets)
  expanded_targets = expand_layout(layout, at_bytes, targets, 0)
  expanded_weights = expand_layout(layout, byte_weights, byte_weights, 0.0)
  return expanded_targets, expanded_weights, byte_weights
