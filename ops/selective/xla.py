"""Blockwise selective attention in pure JAX: a scan over query blocks carrying the column sums.

Same maths as `ops.selective.reference` (see its docstring). The selection matrix S couples the query
rows only through its exclusive cumulative sum over rows, F_ij = F0_j + sum_{k < i} S_kj, so the
queries are visited in blocks of `block_q` rows by a `lax.scan` whose carry is the column-sum vector
C [B, S] f32 = F0 + (sum of the S rows of all earlier blocks). Within a block:

  L^h   = scale * Q_blk^h K^T                        [B, H, bq, S] (f32 accumulation)
  S_blk = ReLU(L^sel) on selectable entries          [B, bq, S]
  F_blk = C + exclusive_cumsum_rows(S_blk)           [B, bq, S]
  o_blk = softmax(L^h - F_blk) V  over visible (and unpruned) keys
  C'    = C + sum_rows(S_blk)

so memory per step is O(block_q * S) per head, never T x S at once. Gradients: reverse-mode autodiff
through the scan, with the block body under `jax.checkpoint`, so the backward recomputes each block's
tiles from the saved carries (nq x [B, S]) instead of storing them. Matmuls take the input dtype with
float32 accumulation; softmax, S and F are float32.
"""

import jax
import jax.numpy as jnp

from ops.selective import reference
from ops.selective.block_sizes import BlockSizes
from ops.tiling import cdiv, pad_axis


def _row_tiles(x: jax.Array, bq: int, nq: int, value=0) -> jax.Array:
  """[B, T, ...] -> [nq, B, bq, ...] (T padded to nq * bq with `value`)."""
  x = pad_axis(x, 1, nq * bq, value)
  return jnp.moveaxis(x.reshape(x.shape[0], nq, bq, *x.shape[2:]), 1, 0)


def selective_attention(q, k, v, *, q_positions, kv_positions, segment_ids, kv_segment_ids, bos_mask,
                        initial_column_sums, scale, selection_head, prune_threshold, memory_tau,
                        block_sizes: BlockSizes):
  """Blockwise selective attention; arguments and returns as `ops.selective.reference`."""
  b, t, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  bq = min(block_sizes.block_q, t)
  nq = cdiv(t, bq)
  q_tiles = _row_tiles(q.reshape(b, t, hkv, g, d), bq, nq)  # [nq, B, bq, Hkv, G, D]
  qpos_tiles = _row_tiles(q_positions, bq, nq)
  valid_tiles = _row_tiles(jnp.ones((b, t), bool), bq, nq, False)
  seg_tiles = None if segment_ids is None else _row_tiles(segment_ids, bq, nq)

  @jax.checkpoint
  def block(column_sums, tile):
    q_blk, qpos, valid, seg = tile
    logits = jnp.einsum("bqhgd,bshd->bhgqs", q_blk, k, preferred_element_type=jnp.float32) * scale
    visible, selectable = reference.selection_inputs(qpos, kv_positions, seg, kv_segment_ids, bos_mask)
    visible &= valid[:, :, None]  # padded query rows neither attend nor select
    selectable &= valid[:, :, None]
    sel_logits = logits[:, selection_head // g, selection_head % g]  # [B, bq, S]
    selection = jnp.where(selectable, jax.nn.relu(sel_logits), 0.0)
    inclusive = jnp.cumsum(selection, axis=1)
    exclusive = jnp.pad(inclusive[:, :-1], ((0, 0), (1, 0), (0, 0)))
    f = column_sums[:, None, :] + exclusive
    keep = visible if prune_threshold is None else visible & (f <= prune_threshold)
    weights = reference.masked_softmax(logits - f[:, None, None], keep[:, None, None])
    o = jnp.einsum("bhgqs,bshd->bqhgd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    masked = (jnp.zeros((b, bq), jnp.float32) if memory_tau is None else
              jnp.sum(jnp.where(visible, jnp.minimum(f, memory_tau), 0.0), axis=-1) / memory_tau)
    return column_sums + inclusive[:, -1], (o.astype(q.dtype), masked)

  final, (o, masked) = jax.lax.scan(block, initial_column_sums,
                                    (q_tiles, qpos_tiles, valid_tiles, seg_tiles))
  o = jnp.moveaxis(o, 0, 1).reshape(b, nq * bq, h, d)[:, :t]
  outputs = (o, final)
  if memory_tau is not None:
    outputs += (jnp.moveaxis(masked, 0, 1).reshape(b, nq * bq)[:, :t],)
  return outputs
