"""Blockwise (flash-style) attention in pure JAX, with a blockwise custom VJP.

Same maths as `ops.attention.reference` (see its docstring for the mask V and the weights), computed
without ever materialising the T x S logits:

Forward (FlashAttention-2 online softmax). Queries are tiled into blocks of `block_q` rows (visited one
after the other by `lax.map`); for each query block a `lax.scan` walks the key blocks of `block_kv`
columns carrying, per row, the running max m, running normaliser l and unnormalised output acc (f32):

  s_ij  = scale <q_i, k_j> + bias_j + table[h, bucket(kv_pos_j - q_pos_i)]  (the relative term is
          bucketed per tile from the position tiles, `ops.attention.relative_bias`)
  a_ij  = s_ij (softmax) or |s_ij| (signed), only for visible keys j
  m'    = max(m, max_j a_ij);   alpha = exp(m - m')
  l'    = alpha * l + sum_j exp(a_ij - m')
  acc'  = alpha * acc + sum_j c_ij exp(a_ij - m') v_j,   c_ij = 1 (softmax) or sign(s_ij) (signed)
  o_i   = acc_i / l_i (0 if row i has no visible key);   lse_i = m_i + log(l_i) is kept for the backward.
softmax1 starts the state at m = 0, l = 1 (a virtual key of logit 0 and value 0), so that l ends as
sum_j exp(a_ij - m_i) + exp(-m_i) with m_i = max(0, max_j a_ij); nothing else changes, the backward included.

Backward (custom VJP, recomputes the tiles; nothing of size T x S is stored). With p_ij = exp(a_ij - lse_i),
w_ij = c_ij p_ij, dO the output cotangent and D_i = <dO_i, o_i>:

  dv_j  = sum_i w_ij dO_i;   dw_ij = <dO_i, v_j>
  ds_ij = p_ij (dw_ij - D_i)                          (softmax)
  ds_ij = p_ij (sign(s_ij)^2 dw_ij - sign(s_ij) D_i)  (signed: d|s|/ds = sign(s), and sign(0) = 0)
  dq_i  = scale sum_j ds_ij k_j;  dk_j = scale sum_i ds_ij q_i;  dbias_j = sum_{i, heads in group} ds_ij
  dtable[h, n] = sum_{b, i, j: bucket_ij = n} ds_bhij   (a per-tile segment sum over the tile's buckets)

The backward scans key blocks (carrying the f32 dq accumulator and dtable) and, inside, query blocks
(carrying dk, dv, dbias of that key block). Memory is O((T + S) * H * D) plus one tile per (batch, head) in both passes.
Tiles whose mask is empty (e.g. above the causal diagonal, or padding) are skipped with `lax.cond`.

Matmuls take the input dtype with float32 accumulation (probabilities are cast to the value dtype for the
P @ V product, as flash kernels do); their precision follows `jax.default_matmul_precision`. Only reverse
mode is defined (`jax.custom_vjp`): `jax.jvp`/`jacfwd` through this implementation are not supported.
"""

import jax
import jax.numpy as jnp

from ops.attention import relative_bias as relative_bias_lib
from ops.attention import tile_math
from ops.attention.block_sizes import BlockSizes
from ops.tiling import (cdiv, kv_tiles, kv_untile, online_softmax_scan, pad_axis, q_tiles, q_untile,
                        seq_tiles, valid_tiles)

# Finite initial running max: keeps exp(m - m') finite for rows that have seen no visible key yet.
_MASK_VALUE = -1e30


def _bias_tiles(bias: jax.Array | None, bkv: int, nk: int) -> jax.Array | None:
  """[B, Hb, S] -> [nk, B, Hb, bkv]."""
  if bias is None:
    return None
  bias = pad_axis(bias, 2, nk * bkv)
  b, hb, _ = bias.shape
  return jnp.moveaxis(bias.reshape(b, hb, nk, bkv), 2, 0)


def _tile_mask(q_pos, q_valid, q_seg, kv_pos, kv_valid, kv_seg, bias, causal: bool) -> jax.Array:
  """Visibility of one tile: bool [B, Hb, 1, bq, bkv] (Hb = 1 without bias).

  Args: q_pos/q_seg [B, bq], q_valid [bq], kv_pos/kv_seg [B, bkv], kv_valid [bkv], bias [B, Hb, bkv].
  """
  mask = q_valid[None, :, None] & kv_valid[None, None, :]
  if causal:
    mask = mask & (kv_pos[:, None, :] <= q_pos[:, :, None])
  if q_seg is not None:
    mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
  mask = jnp.broadcast_to(mask, (q_pos.shape[0],) + mask.shape[1:])[:, None, None]
  if bias is not None:
    mask = mask & (bias > -jnp.inf)[:, :, None, None, :]
  return mask


def _tile_buckets(table, q_pos, kv_pos, rel):
  """T5 buckets [B, bq, bkv] of one tile and its relative bias [B, Hkv, G, bq, bkv], or (None, None).

  Args: table [Hkv, G, num_buckets] f32 or None; q_pos [B, bq], kv_pos [B, bkv]; rel (bidirectional,
  max_distance).
  """
  if table is None:
    return None, None
  bidirectional, max_distance = rel
  bucket = relative_bias_lib.relative_position_bucket(
      kv_pos[:, None, :] - q_pos[:, :, None], bidirectional=bidirectional, num_buckets=table.shape[-1],
      max_distance=max_distance)
  return bucket, jnp.moveaxis(table[:, :, bucket], (0, 1), (1, 2))


def _tile_scores(q_tile, k_tile, bias, rel_bias, mask, scale: float, signed: bool):
  """Sanitised logits s and softmax argument a of one tile, both f32 [B, Hkv, G, bq, bkv].

  Masked entries are 0 in s (so a -inf bias never reaches exp) and _MASK_VALUE in a.
  """
  s = jnp.einsum("bhgqd,bhkd->bhgqk", q_tile, k_tile, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = s + bias[:, :, None, None, :]
  if rel_bias is not None:
    s = s + rel_bias
  s = jnp.where(mask, s, 0.0)
  a = jnp.abs(s) if signed else s
  return s, jnp.where(mask, a, _MASK_VALUE)


def _grouped_table(table, hkv: int):
  """[H, num_buckets] -> [Hkv, G, num_buckets] (query head h = kv head * G + g), or None."""
  return None if table is None else table.reshape(hkv, -1, table.shape[-1])


def _forward(q, k, v, bias, table, q_pos, kv_pos, q_seg, kv_seg, causal, signed, softmax1, rel, scale,
             bq, bkv):
  """Returns o [B, T, H, D] (q.dtype) and lse [nq, B, Hkv, G, bq] (f32, 0 on rows with no key)."""
  b, t, h, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  table = _grouped_table(table, hkv)
  nq, nk = cdiv(t, bq), cdiv(s_len, bkv)
  q_xs = (q_tiles(q, hkv, bq, nq), seq_tiles(q_pos, bq, nq), valid_tiles(t, bq, nq),
          seq_tiles(q_seg, bq, nq))
  kv_xs = (kv_tiles(k, bkv, nk), kv_tiles(v, bkv, nk), seq_tiles(kv_pos, bkv, nk),
           valid_tiles(s_len, bkv, nk), seq_tiles(kv_seg, bkv, nk), _bias_tiles(bias, bkv, nk))

  def q_block(args):
    q_tile, q_pos_t, q_valid_t, q_seg_t = args

    def kv_step(carry, kv_args):
      k_tile, v_tile, kv_pos_t, kv_valid_t, kv_seg_t, bias_t = kv_args
      mask = _tile_mask(q_pos_t, q_valid_t, q_seg_t, kv_pos_t, kv_valid_t, kv_seg_t, bias_t, causal)

      def update(carry):
        m, l, acc = carry
        _, rel_t = _tile_buckets(table, q_pos_t, kv_pos_t, rel)
        s, a = _tile_scores(q_tile, k_tile, bias_t, rel_t, mask, scale, signed)
        m_new = jnp.maximum(m, jnp.max(a, axis=-1))
        p = jnp.where(mask, jnp.exp(a - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l_new = alpha * l + jnp.sum(p, axis=-1)
        pv = p * jnp.sign(s) if signed else p
        acc_new = alpha[..., None] * acc + jnp.einsum(
            "bhgqk,bhkd->bhgqd", pv.astype(v_tile.dtype), v_tile, preferred_element_type=jnp.float32)
        return m_new, l_new, acc_new

      return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

    return online_softmax_scan(kv_step, kv_xs, (b, hkv, g, bq), d, _MASK_VALUE, q.dtype, softmax1)

  o_tiles, lse = jax.lax.map(q_block, q_xs)
  return q_untile(o_tiles, t), lse


def _flash_bwd(causal, signed, softmax1, rel, scale, bq, bkv, res, do):
  del softmax1  # it only changed lse, which the residuals carry
  q, k, v, bias, table, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
  b, t, h, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  grouped = _grouped_table(table, hkv)
  nq, nk = cdiv(t, bq), cdiv(s_len, bkv)
  do = do.astype(q.dtype)
  # D_i = <dO_i, o_i>: the softmax-Jacobian row term (also for signed, since sum_k p_k c_k dw_k = D_i).
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  q_xs = (q_tiles(q, hkv, bq, nq), q_tiles(do, hkv, bq, nq), lse, q_tiles(delta, hkv, bq, nq),
          seq_tiles(q_pos, bq, nq), valid_tiles(t, bq, nq), seq_tiles(q_seg, bq, nq))
  kv_xs = (kv_tiles(k, bkv, nk), kv_tiles(v, bkv, nk), seq_tiles(kv_pos, bkv, nk),
           valid_tiles(s_len, bkv, nk), seq_tiles(kv_seg, bkv, nk), _bias_tiles(bias, bkv, nk))

  def kv_step(outer, kv_args):
    dq_acc, dtable = outer
    k_tile, v_tile, kv_pos_t, kv_valid_t, kv_seg_t, bias_t = kv_args

    def q_step(carry, q_args):
      q_tile, do_tile, lse_t, delta_t, q_pos_t, q_valid_t, q_seg_t = q_args
      mask = _tile_mask(q_pos_t, q_valid_t, q_seg_t, kv_pos_t, kv_valid_t, kv_seg_t, bias_t, causal)

      def update(carry):
        dk, dv, db, dt = carry
        bucket, rel_t = _tile_buckets(grouped, q_pos_t, kv_pos_t, rel)
        s, a = _tile_scores(q_tile, k_tile, bias_t, rel_t, mask, scale, signed)
        p = jnp.exp(jnp.where(mask, a - lse_t[..., None], -jnp.inf))
        dw = jnp.einsum("bhgqd,bhkd->bhgqk", do_tile, v_tile, preferred_element_type=jnp.float32)
        if signed:
          sgn = jnp.sign(s)
          w = p * sgn
          ds = p * (jnp.abs(sgn) * dw - sgn * delta_t[..., None])
        else:
          w = p
          ds = p * (dw - delta_t[..., None])
        dv = dv + jnp.einsum("bhgqk,bhgqd->bhkd", w.astype(do_tile.dtype), do_tile,
                             preferred_element_type=jnp.float32)
        if db is not None:
          db = db + jnp.sum(ds, axis=(2, 3))
        if dt is not None:  # [B, Hkv, G, bq, bkv] -> rows (b, i, j) x columns h, summed per bucket
          rows = jnp.moveaxis(ds.reshape(b, h, bq, bkv), 1, -1).reshape(-1, h)
          dt = dt + jax.ops.segment_sum(rows, bucket.reshape(-1), num_segments=dt.shape[1]).T
        ds = ds * scale
        dq_t = jnp.einsum("bhgqk,bhkd->bhgqd", ds.astype(k_tile.dtype), k_tile,
                          preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bhgqk,bhgqd->bhkd", ds.astype(q_tile.dtype), q_tile,
                             preferred_element_type=jnp.float32)
        return (dk, dv, db, dt), dq_t

      def skip(carry):
        return carry, jnp.zeros((b, hkv, g, bq, d), jnp.float32)

      return jax.lax.cond(jnp.any(mask), update, skip, carry)

    init = (jnp.zeros((b, hkv, bkv, d), jnp.float32), jnp.zeros((b, hkv, bkv, d), jnp.float32),
            None if bias is None else jnp.zeros((b, hkv, bkv), jnp.float32), dtable)
    (dk, dv, db, dtable), dq_tiles = jax.lax.scan(q_step, init, q_xs)
    return (dq_acc + dq_tiles, dtable), (dk, dv, db)

  dq0 = jnp.zeros((nq, b, hkv, g, bq, d), jnp.float32)
  dtable0 = None if table is None else jnp.zeros(table.shape, jnp.float32)
  (dq_tiles, dtable), (dk_tiles, dv_tiles, db_tiles) = jax.lax.scan(kv_step, (dq0, dtable0), kv_xs)

  dq = q_untile(dq_tiles, t).astype(q.dtype)
  dk = kv_untile(dk_tiles, s_len).astype(k.dtype)
  dv = kv_untile(dv_tiles, s_len).astype(v.dtype)
  dbias = None
  if bias is not None:
    dbias = jnp.moveaxis(db_tiles, 0, 2).reshape(b, hkv, nk * bkv)[..., :s_len]
    if bias.shape[1] == 1:  # a bias shared by all kv heads gets the sum over heads
      dbias = jnp.sum(dbias, axis=1, keepdims=True)
    dbias = dbias.astype(bias.dtype)
  # Positions and segment ids are integer inputs: zero (None) cotangents.
  return dq, dk, dv, dbias, dtable, None, None, None, None


# Static: causal, signed, softmax1, rel = (bidirectional, max_distance), scale, bq, bkv.
_flash = tile_math.flash_vjp(_forward, _flash_bwd, num_static=7)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
              kv_positions: jax.Array, segment_ids: jax.Array | None,
              kv_segment_ids: jax.Array | None, key_bias: jax.Array | None,
              relative_bias: jax.Array | None, relative_bidirectional: bool,
              relative_max_distance: int, causal: bool, signed: bool, softmax1: bool, scale: float,
              block_sizes: BlockSizes) -> jax.Array:
  """Blockwise attention (equations in the module docstring and in `ops.attention.reference`).

  Call it through `ops.attention.attention(..., impl="xla")`, which validates and canonicalises the
  arguments. Block sizes larger than the sequence are clamped to it (one block, no padding).

  Args:
    q: [B, T, H, D].
    k: [B, S, Hkv, D], H % Hkv == 0 (query head h uses kv head h // (H // Hkv)).
    v: [B, S, Hkv, D].
    q_positions: [B, T] int32.
    kv_positions: [B, S] int32.
    segment_ids: [B, T] int32 or None.
    kv_segment_ids: [B, S] int32 or None (given iff segment_ids is).
    key_bias: [B, Hb, S] float32 or None, Hb in {1, Hkv}.
    relative_bias: [H, num_buckets] float32 T5 table or None.
    relative_bidirectional, relative_max_distance: its bucket parameters.
    causal: mask keys with kv_pos > q_pos.
    signed: Cog weights sign(s) * softmax(|s|) instead of softmax(s).
    softmax1: one more (virtual, logit 0, value 0) key in the normaliser.
    scale: logit scale (a Python float).
    block_sizes: tile sizes.

  Returns:
    o: [B, T, H, D] in q.dtype.
  """
  bq = min(block_sizes.block_q, q.shape[1])
  bkv = min(block_sizes.block_kv, k.shape[1])
  return _flash(q, k, v, key_bias, relative_bias, q_positions, kv_positions, segment_ids, kv_segment_ids,
                causal, signed, softmax1, (relative_bidirectional, relative_max_distance), scale, bq, bkv)
