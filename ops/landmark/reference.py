"""Reference (oracle) landmark grouped-softmax attention: materialised [B, H, T, S] f32 weights.

Implements specs/attention_variants.md §2.2 (paper §3.1 eqs. 1-4) in its closed form. Per batch b, query
head h (kv head h // (H // Hkv)), query i and key slot j, with qp/kp the positions in the
landmark-expanded stream and L = block_size:

  visible    V_ij = kp_j <= qp_i, kp_j != INT32_MAX (empty cache slot), same segment (if given)
  landmark   lm_j = kp_j % L == L - 1;   block(x) = x // L
  current    C_ij = V_ij and not lm_j and block(kp_j) == block(qp_i)
               (the current block's own landmark is masked, also when query i is that landmark)
  earlier    E_ij = V_ij and lm_j and block(kp_j) < block(qp_i)       (earlier landmarks, "top" group)
             R_ij = V_ij and not lm_j and block(kp_j) < block(qp_i)   (earlier regular keys)
  s_ij = scale * <q_i, k_j>
  Z_i  = sum_{j in C_i} e^{s_ij} + sum_{j in E_i} e^{s_ij}
  w_ij = e^{s_ij} / Z_i                                           for j in C_i
  w_ij = (e^{s_{i,l_b}} / Z_i) * e^{s_ij} / sum_{j' in R_i, block b} e^{s_ij'}
                                                                  for j in R_i of block b, l_b its landmark
  w_ij = 0 otherwise (landmarks never carry value);  o_i = sum_j w_ij v_j.

Guards (spec §2.8): an empty top group (C_i and E_i empty: fully masked row) gives w_i = 0 and o_i = 0; an
earlier block whose landmark is not visible gives its regular keys weight 0; a visible earlier landmark
whose block has no visible regular key (possible only with segment ids) keeps its share of Z_i but passes
no value, so that row sums to less than 1 -- exactly the closed form, as in the lm_benchmark code.

The group of an earlier regular key is its block index, computed without a fixed bucket count (dense rank
of the block ids, spec §2.8 "group-count buffer"). O(T * S) memory: for tests, not for long sequences.
Call it through `ops.landmark.landmark_attention(..., impl="reference")`, which validates the arguments.
"""

import jax
import jax.numpy as jnp

# Finite stand-in for -inf so maxima over empty groups stay finite (no inf - inf = NaN).
_MASK_VALUE = -1e30
EMPTY_SLOT = jnp.iinfo(jnp.int32).max


def masks(q_positions: jax.Array, kv_positions: jax.Array, segment_ids: jax.Array | None,
          kv_segment_ids: jax.Array | None, block_size: int):
  """The masks C (current regular), E (earlier landmarks) and R (earlier regular), bool [B, T, S]."""
  qp = q_positions[:, :, None]
  kp = kv_positions[:, None, :]
  visible = (kp <= qp) & (kp != EMPTY_SLOT)
  if segment_ids is not None:
    visible &= segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  is_landmark = kp % block_size == block_size - 1
  same_block = (kp // block_size) == (qp // block_size)
  earlier = (kp // block_size) < (qp // block_size)
  current = visible & ~is_landmark & same_block
  earlier_landmark = visible & is_landmark & earlier
  earlier_regular = visible & ~is_landmark & earlier
  return current, earlier_landmark, earlier_regular


def _dense_rank(x: jax.Array) -> jax.Array:
  """[S] ints -> [S] int32 in [0, S): equal values share an id, distinct values get distinct ids."""
  order = jnp.argsort(x)
  sorted_x = x[order]
  is_new = jnp.concatenate([jnp.ones((1,), bool), sorted_x[1:] != sorted_x[:-1]])
  rank = jnp.cumsum(is_new.astype(jnp.int32)) - 1
  return jnp.zeros_like(rank).at[order].set(rank)


def _group_reduce(x: jax.Array, group: jax.Array, op) -> jax.Array:
  """Reduces x [..., S] over the last axis within groups [S] and broadcasts the result back to [..., S]."""
  n = x.shape[-1]
  data = jnp.moveaxis(x, -1, 0)
  reduced = op(data, group, num_segments=n)
  return jnp.moveaxis(reduced[group], 0, -1)


def weights(q: jax.Array, k: jax.Array, *, q_positions: jax.Array, kv_positions: jax.Array,
            segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None, block_size: int,
            scale: float) -> jax.Array:
  """Grouped-softmax weights w of the module docstring.

  Args:
    q: [B, T, H, D].
    k: [B, S, Hkv, D], H % Hkv == 0.
    q_positions: [B, T] int32.
    kv_positions: [B, S] int32 (INT32_MAX marks an empty slot).
    segment_ids: [B, T] int32 or None.
    kv_segment_ids: [B, S] int32 or None (given iff segment_ids is).
    block_size: landmark block size L >= 2 (L - 1 regular tokens and one landmark).
    scale: logit scale (a Python float).

  Returns:
    w: [B, H, T, S] float32.
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  qf = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
  s = jnp.einsum("bthgd,bshd->bhgts", qf, k.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * scale
  current, earlier_landmark, earlier_regular = (
      m[:, None, None] for m in masks(q_positions, kv_positions, segment_ids, kv_segment_ids,
                                      block_size))

  # Top group: current-block regular keys and earlier landmarks, one softmax (normaliser Z_i).
  top = current | earlier_landmark
  m_top = jax.lax.stop_gradient(jnp.max(jnp.where(top, s, _MASK_VALUE), axis=-1, keepdims=True))
  # exp of a -inf argument (not a where after exp) keeps masked gradients at 0 rather than 0 * inf.
  e_top = jnp.exp(jnp.where(top, s - m_top, -jnp.inf))
  z = jnp.sum(e_top, axis=-1, keepdims=True)
  p_top = e_top / jnp.where(z > 0.0, z, 1.0)

  # Earlier blocks: softmax over the visible regular keys of each block, times its landmark's p_top.
  group = jax.vmap(_dense_rank)(kv_positions // block_size)  # [B, S]

  def per_batch(s_b, regular_b, landmark_p_b, group_b):
    m_grp = jax.lax.stop_gradient(_group_reduce(jnp.where(regular_b, s_b, _MASK_VALUE), group_b,
                                                jax.ops.segment_max))
    e_reg = jnp.exp(jnp.where(regular_b, s_b - m_grp, -jnp.inf))
    denom = _group_reduce(e_reg, group_b, jax.ops.segment_sum)
    p_reg = e_reg / jnp.where(denom > 0.0, denom, 1.0)
    return _group_reduce(landmark_p_b, group_b, jax.ops.segment_sum) * p_reg

  landmark_p = jnp.where(earlier_landmark, p_top, 0.0)
  regular_b = jnp.broadcast_to(earlier_regular, s.shape)
  w_earlier = jax.vmap(per_batch)(s, regular_b, landmark_p, group)
  w = jnp.where(current, p_top, 0.0) + w_earlier
  return w.reshape(b, h, t, -1)


def landmark_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
                       kv_positions: jax.Array, segment_ids: jax.Array | None,
                       kv_segment_ids: jax.Array | None, block_size: int,
                       scale: float) -> jax.Array:
  """o_i = sum_j w_ij v_j with w from `weights` (arguments as there; v [B, S, Hkv, D]).

  Returns:
    o: [B, T, H, D] in q.dtype.
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  w = weights(q, k, q_positions=q_positions, kv_positions=kv_positions, segment_ids=segment_ids,
              kv_segment_ids=kv_segment_ids, block_size=block_size, scale=scale)
  w = w.reshape(b, hkv, h // hkv, t, -1)
  o = jnp.einsum("bhgts,bshd->bthgd", w, v.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return o.reshape(b, t, h, d).astype(q.dtype)
