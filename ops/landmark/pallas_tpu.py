"""Landmark grouped-softmax attention for TPU in Pallas (Mosaic TPU): the fused kernel of spec §2.5.

Same maths as `ops.landmark.xla` (equations in its docstring; spec §2.2 closed form); the per-tile pieces
live in `ops.landmark.tile_math`, shared with the GPU kernel. Layout inside the kernels is [B, H, L, D];
the wrapper pads, transposes and calls them through `ops.pallas_common.TpuFlashLayout` (as attention).

Key tiles are whole landmark blocks (block_kv a multiple of block_size; block_kv == block_size is the
Triton design of spec §2.5). Per (query tile, key tile): earlier blocks get a local softmax over their
regular keys times the online softmax weight of their landmark; the query's own block (the diagonal) is
plain causal softmax merged into the same running normaliser. Layout requirement (as "xla"): key slot j
holds position j or is empty (EMPTY_SLOT = INT32_MAX); query positions are arbitrary.

Grids (b, h, outer, inner) with the reduction axis innermost ("arbitrary"):
  forward  (b, h, q block, kv block): running m, l [bq, 1], acc [bq, D] in VMEM; writes o and lse.
  dK/dV    (b, h, kv block, q block): recomputes the tile from q, k, lse; accumulates dk, dv per query
           head (GQA groups summed afterwards).
  dQ       (b, h, q block, kv block): accumulates dq.
Tiles with no visible key skip their matmuls (`pl.when`). Padded query rows get segment -1 and padded keys
segment -2 and position EMPTY_SLOT, so padding is invisible.

Validation: interpret mode only (`interpret=True` -> `pltpu.InterpretParams()` on CPU, how CI tests it).
No TPU was available to this project, so the kernels have never been compiled by Mosaic; on a real TPU
block_q must be a multiple of 8 and block_kv a multiple of 128 (the (8, 128) tiling of the [1, block_kv]
position blocks), i.e. landmark block sizes dividing a multiple of 128 (64 and 128 do).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ops import pallas_common
from ops.landmark import tile_math
from ops.landmark.block_sizes import BlockSizes


def _fwd_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc,
                l_sc, acc_sc, *, block_size, scale, num_kv_blocks):
  kv_index = pl.program_id(3)

  @pl.when(kv_index == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, tile_math.MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  masks = tile_math.tile_masks(q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...],
                               block_size)

  @pl.when(tile_math.any_visible(masks))
  def _update():
    s = tile_math.scores(q_ref[...], k_ref[...], scale)
    m, l, acc = tile_math.online_step(m_sc[...], l_sc[...], acc_sc[...], s, masks, v_ref[...],
                                      block_size)
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(kv_index == num_kv_blocks - 1)
  def _write():
    o, lse = tile_math.finalize(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dkv_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, block_size, scale, num_q_blocks):
  q_index = pl.program_id(3)

  @pl.when(q_index == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  masks = tile_math.tile_masks(q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...],
                               block_size)

  @pl.when(tile_math.any_visible(masks))
  def _update():
    q, do = q_ref[...], do_ref[...]
    s = tile_math.scores(q, k_ref[...], scale)
    w, ds = tile_math.tile_grads(s, masks, lse_ref[...], delta_ref[...], do, v_ref[...], block_size)
    dv_sc[...] += tile_math.matmul_tn(w.astype(do.dtype), do)
    dk_sc[...] += tile_math.matmul_tn((ds * scale).astype(q.dtype), q)

  @pl.when(q_index == num_q_blocks - 1)
  def _write():
    dk_ref[...] = dk_sc[...]
    dv_ref[...] = dv_sc[...]


def _dq_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, dq_sc, *, block_size, scale, num_kv_blocks):
  kv_index = pl.program_id(3)

  @pl.when(kv_index == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  masks = tile_math.tile_masks(q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...],
                               block_size)

  @pl.when(tile_math.any_visible(masks))
  def _update():
    k = k_ref[...]
    s = tile_math.scores(q_ref[...], k, scale)
    _, ds = tile_math.tile_grads(s, masks, lse_ref[...], delta_ref[...], do_ref[...], v_ref[...],
                                 block_size)
    dq_sc[...] += tile_math.matmul_nn((ds * scale).astype(k.dtype), k)

  @pl.when(kv_index == num_kv_blocks - 1)
  def _write():
    dq_ref[...] = dq_sc[...]


def _layout(q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk):
  return pallas_common.TpuFlashLayout(q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk,
                                      kv_pos_pad=tile_math.EMPTY_SLOT)


def _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bk, interpret):
  lay = _layout(q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
  kernel = functools.partial(_fwd_kernel, block_size=block_size, scale=scale, num_kv_blocks=lay.nk)
  return lay.forward(kernel, q, k, v, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bk, interpret):
  return _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bk, interpret)[0]


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bk, interpret):
  o, lse = _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bk, interpret)
  return o, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse)


def _flash_bwd(block_size, scale, bq, bk, interpret, res, do):
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
  lay = _layout(q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
  # D_i = <dO_i, o_i> is the row term of the top-group softmax Jacobian.
  operands = lay.backward_operands(q, k, v, do, o, lse)
  common = dict(block_size=block_size, scale=scale)
  dk, dv = lay.dkv(functools.partial(_dkv_kernel, num_q_blocks=lay.nq, **common), operands, interpret)
  dq = lay.dq(functools.partial(_dq_kernel, num_kv_blocks=lay.nk, **common), operands, interpret)
  # Positions and segment ids are integer inputs: zero (None) cotangents.
  return (dq.astype(q.dtype), lay.per_kv_head(dk).astype(k.dtype), lay.per_kv_head(dv).astype(v.dtype),
          None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def tile_sizes(block_sizes: BlockSizes, q_len: int, kv_len: int, block_size: int) -> tuple[int, int]:
  """Kernel tiles: block_q clamped to the 8-rounded query length; block_kv (whole landmark blocks)
  clamped to the key length rounded up to a whole landmark block."""
  if block_sizes.block_kv % block_size:
    raise ValueError(f"block_sizes.block_kv ({block_sizes.block_kv}) must be a multiple of "
                     f"block_size ({block_size}).")
  return (min(block_sizes.block_q, pallas_common.round_up(q_len, 8)),
          min(block_sizes.block_kv, pallas_common.round_up(kv_len, block_size)))


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "block_sizes", "interpret"))
def landmark_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
                       kv_positions: jax.Array, segment_ids: jax.Array | None,
                       kv_segment_ids: jax.Array | None, block_size: int, scale: float,
                       block_sizes: BlockSizes, interpret: bool) -> jax.Array:
  """Pallas TPU landmark attention. Call it through `ops.landmark.landmark_attention(impl="pallas")`.

  Args:
    q: [B, T, H, D]; k, v: [B, S, Hkv, D] with H % Hkv == 0.
    q_positions: [B, T] int32, arbitrary.
    kv_positions: [B, S] int32; slot j must hold position j or EMPTY_SLOT (module docstring).
    segment_ids: [B, T] int32 or None; kv_segment_ids: [B, S] int32 (given iff segment_ids is).
    block_size: landmark block size L >= 2.
    scale: logit scale (a Python float).
    block_sizes: tiles; block_kv must be a multiple of block_size.
    interpret: run on CPU through `pltpu.InterpretParams()`.

  Returns:
    o: [B, T, H, D] in q.dtype.
  """
  bq, bk = tile_sizes(block_sizes, q.shape[1], k.shape[1], block_size)
  return _flash(q, k, v, q_positions, kv_positions, segment_ids, kv_segment_ids, block_size, scale, bq,
                bk, interpret)
