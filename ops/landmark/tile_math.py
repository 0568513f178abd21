"""Per-tile maths shared by the Pallas landmark kernels (TPU and GPU): masks, online step, weights, dS.

Everything here acts on one [bq, bk] tile of one (batch, query head) and is plain jnp (no reshapes of the
key axis), so the kernel bodies stay short and the two backends cannot drift apart. Equations:
`ops.landmark.xla` module docstring (spec §2.2 closed form, §2.5 fused design).

A key tile holds bk // group_width whole landmark blocks: columns [g * group_width, (g + 1) *
group_width) are landmark block g of the tile (spec §2.5: "the tile is the landmark block"; one block
per tile when bk == group_width). group_width is the landmark block_size on TPU; the GPU wrapper spreads
each block over a power-of-two number of slots (extra slots empty), so there group_width >= block_size.
Landmark-ness, block index and visibility always come from the positions, never from the column.

`finalize` (o and lse from the running top-group state; an empty top group gives o = 0, lse = 0),
`matmul_tn` and `matmul_nn` are the attention kernels' too: they live in `ops.pallas_common` and are
re-exported here.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ops.pallas_common import any_mask
from ops.pallas_common import finalize, matmul_nn, matmul_tn  # noqa: F401  (re-exported)

# Finite stand-in for -inf: keeps exp(m - m') and group maxima finite on rows/groups with no key.
MASK_VALUE = -1e30
EMPTY_SLOT = int(np.iinfo(np.int32).max)


def tile_masks(q_pos, q_seg, kv_pos, kv_seg, block_size: int):
  """Masks C (current regular), E (earlier landmarks), R (earlier regular) of a tile, bool [bq, bk].

  Args: q_pos, q_seg [bq, 1] int32; kv_pos, kv_seg [1, bk] int32. Padding rows/columns carry segment ids
  that match nothing (see the wrappers). Block and landmark tests use truncating division, equal to
  floor division here because a visible key has 0 <= kv_pos <= q_pos (slot layout).
  """
  visible = (q_seg == kv_seg) & (kv_pos <= q_pos) & (kv_pos != EMPTY_SLOT)
  is_landmark = jax.lax.rem(kv_pos, block_size) == block_size - 1
  q_block = jax.lax.div(q_pos, block_size)
  kv_block = jax.lax.div(kv_pos, block_size)
  earlier = kv_block < q_block
  current = visible & ~is_landmark & (kv_block == q_block)
  return current, visible & is_landmark & earlier, visible & ~is_landmark & earlier


def any_visible(masks) -> jax.Array:
  """Whether a tile has any visible key (a float max: Mosaic lowers float reductions everywhere)."""
  current, landmark, regular = masks
  return any_mask(current | landmark | regular)


def scores(q, k, scale: float) -> jax.Array:
  """s = scale * q k^T in f32 [bq, bk] (matmul in the input dtype, f32 accumulation)."""
  return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale


def _group_reduce(x, group_width: int, reduce, neutral: float) -> jax.Array:
  """Reduces x [bq, bk] over each aligned group of group_width columns, broadcast back (or [bq, 1])."""
  bk = x.shape[-1]
  if bk == group_width:
    return reduce(x, axis=-1, keepdims=True)
  col = jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  out = jnp.zeros_like(x)
  for g in range(bk // group_width):  # static, small: bk // group_width landmark blocks per tile
    in_group = (col >= g * group_width) & (col < (g + 1) * group_width)
    out = jnp.where(in_group, reduce(jnp.where(in_group, x, neutral), axis=-1, keepdims=True), out)
  return out


def group_sum(x, group_width: int) -> jax.Array:
  return _group_reduce(x, group_width, jnp.sum, 0.0)


def local_probs(s, regular, group_width: int) -> jax.Array:
  """R_ij: softmax of s over the visible regular keys of j's landmark block (0 elsewhere), f32."""
  a = jnp.where(regular, s, MASK_VALUE)
  m_local = _group_reduce(a, group_width, jnp.max, MASK_VALUE)
  e = jnp.where(regular, jnp.exp(a - m_local), 0.0)
  denom = group_sum(e, group_width)
  return e / jnp.where(denom > 0.0, denom, 1.0)  # no visible regular key: weight 0, never NaN


def online_step(m, l, acc, s, masks, v, group_width: int):
  """One update of the running top-group (m [bq,1], l [bq,1], acc [bq,D]) with a key tile.

  Top group = current regular keys C and earlier landmarks E (online softmax, spec §2.5); an earlier
  block's regular keys get p(its landmark) times their local softmax.
  """
  current, landmark, regular = masks
  top = current | landmark
  top_s = jnp.where(top, s, MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(top_s, axis=-1, keepdims=True))
  p = jnp.where(top, jnp.exp(top_s - m_new), 0.0)
  alpha = jnp.exp(m - m_new)
  l_new = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
  landmark_p = group_sum(jnp.where(landmark, p, 0.0), group_width)
  w = jnp.where(current, p, 0.0) + landmark_p * local_probs(s, regular, group_width)
  acc_new = alpha * acc + jax.lax.dot_general(w.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                              preferred_element_type=jnp.float32)
  return m_new, l_new, acc_new


def tile_grads(s, masks, lse, delta, do, v, group_width: int) -> tuple[jax.Array, jax.Array]:
  """(w, ds) of a tile, f32 [bq, bk]: final weights and dL/ds (unscaled) given lse, delta [bq, 1].

  With P = exp(s - lse) on C u E, dov = dO v^T and c_ib = sum_{j in R, block b} R_ij dov_ij:
  ds = P (dov - D) on C, P (c - D) on E, w (dov - c) on R (`ops.landmark.xla` docstring).
  """
  current, landmark, regular = masks
  top = current | landmark
  p = jnp.where(top, jnp.exp(jnp.where(top, s, MASK_VALUE) - lse), 0.0)
  landmark_p = group_sum(jnp.where(landmark, p, 0.0), group_width)
  local = local_probs(s, regular, group_width)
  w_regular = landmark_p * local
  dov = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  c = group_sum(local * dov, group_width)
  ds = (jnp.where(current, p * (dov - delta), 0.0) + jnp.where(landmark, p * (c - delta), 0.0)
        + w_regular * (dov - c))
  return jnp.where(current, p, 0.0) + w_regular, ds
