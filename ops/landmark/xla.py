"""Blockwise (flash-style) landmark attention in pure JAX, with a blockwise custom VJP.

Same maths as `ops.landmark.reference` (masks C, E, R and weights w in its docstring), computed without
ever materialising the T x S weights. Mirrors the Triton design of spec §2.5 / §2.9.

Layout requirement: key slot j holds position j or is empty (position EMPTY_SLOT = INT32_MAX), true for
training and for a decode cache filled from slot 0; query positions are arbitrary. Key tiles of
`block_kv` slots (a multiple of the landmark block size L) then consist of whole landmark blocks, and
the aligned groups of L slots inside a tile are exactly the landmark blocks (the group of an earlier
regular key is taken from its slot, visibility and landmark-ness from its position).

Forward. Queries are tiled into blocks of `block_q` rows (`lax.map`); for each a `lax.scan` walks the key
tiles carrying per row the running max m, normaliser l and unnormalised output acc (f32) of the "top"
group (current-block regular keys C and earlier landmarks E). Per key tile:

  R_ij   = softmax of s_ij over the visible regular keys R of j's block (local, within the tile)
  m'     = max(m, max_{j in C u E} s_ij);   alpha = exp(m - m');   p_ij = exp(s_ij - m') on C u E
  l'     = alpha l + sum_j p_ij
  W_ij   = p_ij on C;   p_{i,l_b} R_ij on R (l_b the landmark of j's block b);   0 on landmarks
  acc'   = alpha acc + W @ V;   o_i = acc_i / l_i (0 if l_i = 0);   lse_i = m_i + log l_i for the backward.

Backward (custom VJP, recomputes each tile from lse; nothing of size T x S is stored). With
P_ij = exp(s_ij - lse_i) on C u E, w_ij the final weights, dov_ij = <dO_i, v_j>, D_i = <dO_i, o_i> and
c_ib = sum_{j in R, block b} R_ij dov_ij (= <dO_i, u_ib>, u_ib the block's local output):

  dv_j  = sum_i w_ij dO_i
  ds_ij = P_ij (dov_ij - D_i)           j in C      (top-group softmax, value v_j)
  ds_ij = P_ij (c_ib - D_i)             j = l_b in E (top-group softmax, value u_ib)
  ds_ij = w_ij (dov_ij - c_ib)          j in R of block b (local softmax scaled by P_{i,l_b})
  dq_i  = scale sum_j ds_ij k_j;  dk_j = scale sum_i ds_ij q_i

The backward scans key tiles (carrying the f32 dq accumulator) and, inside, query tiles (carrying dk, dv
of that key tile), so memory is O((T + S) * H * D) plus a few [block_q, block_kv] tiles per (batch, head)
in both passes. Tiles with nothing visible (above the causal diagonal, padding) are skipped with
`lax.cond`. Matmuls take the input dtype with f32 accumulation; only reverse mode is defined.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ops.landmark.block_sizes import BlockSizes
from ops.tiling import (cdiv, kv_tiles, kv_untile, online_softmax_scan, q_tiles, q_untile, seq_tiles,
                        valid_tiles)

# Finite initial running max: keeps exp(m - m') finite for rows that have seen no top-group key yet.
_MASK_VALUE = -1e30
EMPTY_SLOT = np.iinfo(np.int32).max


def layout_ok(kv_positions: np.ndarray) -> bool:
  """Whether concrete [..., S] kv positions meet the layout requirement (slot j holds j or EMPTY_SLOT)."""
  slots = np.arange(kv_positions.shape[-1])
  return bool(np.all((kv_positions == slots) | (kv_positions == EMPTY_SLOT)))


def _tile_masks(q_pos, q_valid, q_seg, kv_pos, kv_valid, kv_seg, block_size: int):
  """Masks C (current regular), E (earlier landmarks), R (earlier regular) of one tile.

  Args: q_pos/q_seg [B, bq], q_valid [bq], kv_pos/kv_seg [B, bkv], kv_valid [bkv].

  Returns:
    Three bool [B, 1, 1, bq, bkv] arrays (broadcastable against [B, Hkv, G, bq, bkv] scores).
  """
  qp, kp = q_pos[:, :, None], kv_pos[:, None, :]
  visible = q_valid[None, :, None] & kv_valid[None, None, :] & (kp <= qp) & (kp != EMPTY_SLOT)
  if q_seg is not None:
    visible &= q_seg[:, :, None] == kv_seg[:, None, :]
  is_landmark = kp % block_size == block_size - 1
  q_block, kv_block = qp // block_size, kp // block_size
  current = visible & ~is_landmark & (kv_block == q_block)
  earlier_landmark = visible & is_landmark & (kv_block < q_block)
  earlier_regular = visible & ~is_landmark & (kv_block < q_block)
  return tuple(m[:, None, None] for m in (current, earlier_landmark, earlier_regular))


def _block_sum(x: jax.Array, block_size: int) -> jax.Array:
  """Sums x [..., bkv] over each aligned group of block_size slots, broadcast back to [..., bkv]."""
  shape = x.shape
  grouped = x.reshape(*shape[:-1], shape[-1] // block_size, block_size)
  return jnp.broadcast_to(jnp.sum(grouped, axis=-1, keepdims=True), grouped.shape).reshape(shape)


def _local_probs(s: jax.Array, earlier_regular: jax.Array, block_size: int) -> jax.Array:
  """R_ij: softmax of s over the visible regular keys of each block of the tile (0 elsewhere)."""
  shape = s.shape
  mask = jnp.broadcast_to(earlier_regular, shape)
  grouped_s = jnp.where(mask, s, _MASK_VALUE).reshape(*shape[:-1], -1, block_size)
  m_local = jnp.max(grouped_s, axis=-1, keepdims=True)
  e = jnp.exp(jnp.where(mask.reshape(grouped_s.shape), grouped_s - m_local, -jnp.inf))
  denom = jnp.sum(e, axis=-1, keepdims=True)
  return (e / jnp.where(denom > 0.0, denom, 1.0)).reshape(shape)


def _scores(q_tile, k_tile, scale: float) -> jax.Array:
  return jnp.einsum("bhgqd,bhkd->bhgqk", q_tile, k_tile, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bkv):
  """Returns o [B, T, H, D] (q.dtype) and lse [nq, B, Hkv, G, bq] (f32, 0 on rows with no key)."""
  b, t, h, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  nq, nk = cdiv(t, bq), cdiv(s_len, bkv)
  q_xs = (q_tiles(q, hkv, bq, nq), seq_tiles(q_pos, bq, nq), valid_tiles(t, bq, nq),
          seq_tiles(q_seg, bq, nq))
  kv_xs = (kv_tiles(k, bkv, nk), kv_tiles(v, bkv, nk), seq_tiles(kv_pos, bkv, nk),
           valid_tiles(s_len, bkv, nk), seq_tiles(kv_seg, bkv, nk))

  def q_block(args):
    q_tile, q_pos_t, q_valid_t, q_seg_t = args

    def kv_step(carry, kv_args):
      k_tile, v_tile, kv_pos_t, kv_valid_t, kv_seg_t = kv_args
      current, landmark, regular = _tile_masks(q_pos_t, q_valid_t, q_seg_t, kv_pos_t, kv_valid_t,
                                               kv_seg_t, block_size)

      def update(carry):
        m, l, acc = carry
        s = _scores(q_tile, k_tile, scale)
        top = current | landmark
        m_new = jnp.maximum(m, jnp.max(jnp.where(top, s, _MASK_VALUE), axis=-1))
        p = jnp.exp(jnp.where(top, s - m_new[..., None], -jnp.inf))
        alpha = jnp.exp(m - m_new)
        l_new = alpha * l + jnp.sum(p, axis=-1)
        landmark_p = _block_sum(jnp.where(landmark, p, 0.0), block_size)
        w = jnp.where(current, p, 0.0) + landmark_p * _local_probs(s, regular, block_size)
        acc_new = alpha[..., None] * acc + jnp.einsum(
            "bhgqk,bhkd->bhgqd", w.astype(v_tile.dtype), v_tile, preferred_element_type=jnp.float32)
        return m_new, l_new, acc_new

      any_visible = jnp.any(current | landmark | regular)
      return jax.lax.cond(any_visible, update, lambda c: c, carry), None

    return online_softmax_scan(kv_step, kv_xs, (b, hkv, g, bq), d, _MASK_VALUE, q.dtype)

  o_tiles, lse = jax.lax.map(q_block, q_xs)
  return q_untile(o_tiles, t), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bkv):
  return _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bkv)[0]


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bkv):
  o, lse = _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bkv)
  return o, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse)


def _flash_bwd(block_size, scale, bq, bkv, res, do):
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
  b, t, h, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  nq, nk = cdiv(t, bq), cdiv(s_len, bkv)
  do = do.astype(q.dtype)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # D_i = <dO_i, o_i>
  q_xs = (q_tiles(q, hkv, bq, nq), q_tiles(do, hkv, bq, nq), lse, q_tiles(delta, hkv, bq, nq),
          seq_tiles(q_pos, bq, nq), valid_tiles(t, bq, nq), seq_tiles(q_seg, bq, nq))
  kv_xs = (kv_tiles(k, bkv, nk), kv_tiles(v, bkv, nk), seq_tiles(kv_pos, bkv, nk),
           valid_tiles(s_len, bkv, nk), seq_tiles(kv_seg, bkv, nk))

  def kv_step(dq_acc, kv_args):
    k_tile, v_tile, kv_pos_t, kv_valid_t, kv_seg_t = kv_args

    def q_step(carry, q_args):
      q_tile, do_tile, lse_t, delta_t, q_pos_t, q_valid_t, q_seg_t = q_args
      current, landmark, regular = _tile_masks(q_pos_t, q_valid_t, q_seg_t, kv_pos_t, kv_valid_t,
                                               kv_seg_t, block_size)

      def update(carry):
        dk, dv = carry
        s = _scores(q_tile, k_tile, scale)
        p = jnp.exp(jnp.where(current | landmark, s - lse_t[..., None], -jnp.inf))
        landmark_p = _block_sum(jnp.where(landmark, p, 0.0), block_size)
        local_p = _local_probs(s, regular, block_size)
        w_regular = landmark_p * local_p
        w = jnp.where(current, p, 0.0) + w_regular
        dov = jnp.einsum("bhgqd,bhkd->bhgqk", do_tile, v_tile, preferred_element_type=jnp.float32)
        c = _block_sum(local_p * dov, block_size)  # c_ib = <dO_i, u_ib> = sum_{j in b} R_ij dov_ij
        dlt = delta_t[..., None]
        ds = (jnp.where(current, p * (dov - dlt), 0.0) + jnp.where(landmark, p * (c - dlt), 0.0)
              + w_regular * (dov - c))
        dv = dv + jnp.einsum("bhgqk,bhgqd->bhkd", w.astype(do_tile.dtype), do_tile,
                             preferred_element_type=jnp.float32)
        ds = ds * scale
        dq_t = jnp.einsum("bhgqk,bhkd->bhgqd", ds.astype(k_tile.dtype), k_tile,
                          preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bhgqk,bhgqd->bhkd", ds.astype(q_tile.dtype), q_tile,
                             preferred_element_type=jnp.float32)
        return (dk, dv), dq_t

      def skip(carry):
        return carry, jnp.zeros((b, hkv, g, bq, d), jnp.float32)

      any_visible = jnp.any(current | landmark | regular)
      return jax.lax.cond(any_visible, update, skip, carry)

    init = (jnp.zeros((b, hkv, bkv, d), jnp.float32), jnp.zeros((b, hkv, bkv, d), jnp.float32))
    (dk, dv), dq_tiles = jax.lax.scan(q_step, init, q_xs)
    return dq_acc + dq_tiles, (dk, dv)

  dq0 = jnp.zeros((nq, b, hkv, g, bq, d), jnp.float32)
  dq_tiles, (dk_tiles, dv_tiles) = jax.lax.scan(kv_step, dq0, kv_xs)

  dq = q_untile(dq_tiles, t).astype(q.dtype)
  dk = kv_untile(dk_tiles, s_len).astype(k.dtype)
  dv = kv_untile(dv_tiles, s_len).astype(v.dtype)
  # Positions and segment ids are integer inputs: zero (None) cotangents.
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def landmark_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
                       kv_positions: jax.Array, segment_ids: jax.Array | None,
                       kv_segment_ids: jax.Array | None, block_size: int, scale: float,
                       block_sizes: BlockSizes) -> jax.Array:
  """Blockwise landmark attention (equations in the module docstring and `ops.landmark.reference`).

  Call it through `ops.landmark.landmark_attention(..., impl="xla")`, which validates and canonicalises
  the arguments. Tiles larger than the sequence are clamped to it (block_kv to S rounded up to a
  multiple of block_size, so key tiles stay aligned to landmark blocks).

  Args:
    q: [B, T, H, D].
    k: [B, S, Hkv, D], H % Hkv == 0 (query head h uses kv head h // (H // Hkv)).
    v: [B, S, Hkv, D].
    q_positions: [B, T] int32, arbitrary.
    kv_positions: [B, S] int32; slot j must hold position j or EMPTY_SLOT (module docstring).
    segment_ids: [B, T] int32 or None.
    kv_segment_ids: [B, S] int32 or None (given iff segment_ids is).
    block_size: landmark block size L >= 2.
    scale: logit scale (a Python float).
    block_sizes: tile sizes; block_kv must be a multiple of block_size.

  Returns:
    o: [B, T, H, D] in q.dtype.
  """
  if block_sizes.block_kv % block_size:
    raise ValueError(f"block_sizes.block_kv ({block_sizes.block_kv}) must be a multiple of "
                     f"block_size ({block_size}).")
  bq = min(block_sizes.block_q, q.shape[1])
  bkv = min(block_sizes.block_kv, cdiv(k.shape[1], block_size) * block_size)
  return _flash(q, k, v, q_positions, kv_positions, segment_ids, kv_segment_ids, block_size, scale,
                bq, bkv)
