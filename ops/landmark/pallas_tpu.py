"""Landmark grouped-softmax attention for TPU in Pallas (Mosaic TPU): the fused kernel of spec §2.5.

Same maths as `ops.landmark.xla` (equations in its docstring; spec §2.2 closed form); the per-tile pieces
live in `ops.landmark.tile_math`, shared with the GPU kernel. Layout inside the kernels is [B, H, L, D];
`ops.flash_layout.TpuFlashLayout` pads and transposes the operands (as for attention), and this file's
wrapper builds the BlockSpecs and runs the three `pallas_call`s.

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

`interpret=True` runs the kernels on CPU through `pltpu.InterpretParams()`. On a real TPU block_q must be
a multiple of 8 and block_kv a multiple of 128 (the (8, 128) tiling of the [1, block_kv] position
blocks), i.e. landmark block sizes dividing a multiple of 128 (64 and 128 do).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops import flash_layout
from ops import pallas_common
from ops.landmark import tile_math
from ops.landmark.block_sizes import BlockSizes
from ops.tiling import round_up

F32 = jnp.float32


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


def _specs(lay: flash_layout.TpuFlashLayout, q_axis: int):
  """BlockSpecs on a grid (b, h, x, y) whose query-block index is axis q_axis (2 or 3), the key-block
  index the other one: (sequence specs [q pos, q seg, kv pos, kv seg], q [bq, D], kv [bk, D] of the
  query head's kv head, row [bq, 1], per-query-head key [bk, D])."""
  sq = pl.squeezed
  g, bq, bk, d = lay.group, lay.bq, lay.bk, lay.d

  def qi(idx):
    return idx[q_axis]

  def kj(idx):
    return idx[5 - q_axis]

  seq = [pl.BlockSpec((sq, bq, 1), lambda *i: (i[0], qi(i), 0)),
         pl.BlockSpec((sq, bq, 1), lambda *i: (i[0], qi(i), 0)),
         pl.BlockSpec((sq, 1, bk), lambda *i: (i[0], 0, kj(i))),
         pl.BlockSpec((sq, 1, bk), lambda *i: (i[0], 0, kj(i)))]
  q_spec = pl.BlockSpec((sq, sq, bq, d), lambda *i: (i[0], i[1], qi(i), 0))
  kv_spec = pl.BlockSpec((sq, sq, bk, d), lambda *i: (i[0], i[1] // g, kj(i), 0))
  row_spec = pl.BlockSpec((sq, sq, bq, 1), lambda *i: (i[0], i[1], qi(i), 0))
  key_spec = pl.BlockSpec((sq, sq, bk, d), lambda *i: (i[0], i[1], kj(i), 0))
  return seq, q_spec, kv_spec, row_spec, key_spec


def _layout(q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk):
  return flash_layout.TpuFlashLayout(q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk,
                                     kv_pos_pad=tile_math.EMPTY_SLOT)


def _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bk, interpret):
  """(o [B, T, H, D], lse [B, H, Tp, 1] f32) from the forward kernel on grid (b, h, q block, kv block)."""
  lay = _layout(q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
  kernel = functools.partial(_fwd_kernel, block_size=block_size, scale=scale, num_kv_blocks=lay.nk)
  seq, q_spec, kv_spec, row_spec, _ = _specs(lay, q_axis=2)
  o, lse = pl.pallas_call(
      kernel,
      grid=(lay.b, lay.h, lay.nq, lay.nk),
      in_specs=seq + [q_spec, kv_spec, kv_spec],
      out_specs=[q_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct((lay.b, lay.h, lay.tp, lay.d), q.dtype),
                 jax.ShapeDtypeStruct((lay.b, lay.h, lay.tp, 1), F32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, lay.d), F32)],
      compiler_params=pallas_common.tpu_compiler_params(4),
      interpret=pallas_common.tpu_interpret_params(interpret),
  )(*lay.seq_args(), lay.q_major(q), lay.kv_major(k), lay.kv_major(v))
  return lay.q_unpad(o), lse


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
  operands = lay.backward_operands(q, k, v, do, o, lse)  # q, k, v, dO, lse, D
  common = dict(block_size=block_size, scale=scale)
  b, h, d, tp, sp = lay.b, lay.h, lay.d, lay.tp, lay.sp

  # dK/dV on grid (b, h, kv block, q block): per-query-head f32 dk, dv [B, H, Sp, D]; scratch dk, dv
  # [bk, D].
  seq, q_spec, kv_spec, row_spec, key_spec = _specs(lay, q_axis=3)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, num_q_blocks=lay.nq, **common),
      grid=(b, h, lay.nk, lay.nq),
      in_specs=seq + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=[key_spec, key_spec],
      out_shape=[jax.ShapeDtypeStruct((b, h, sp, d), F32)] * 2,
      scratch_shapes=[pltpu.VMEM((bk, d), F32), pltpu.VMEM((bk, d), F32)],
      compiler_params=pallas_common.tpu_compiler_params(4),
      interpret=pallas_common.tpu_interpret_params(interpret),
  )(*lay.seq_args(), *operands)

  # dQ on grid (b, h, q block, kv block): f32 dq [B, H, Tp, D]; scratch dq [bq, D].
  seq, q_spec, kv_spec, row_spec, _ = _specs(lay, q_axis=2)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, num_kv_blocks=lay.nk, **common),
      grid=(b, h, lay.nq, lay.nk),
      in_specs=seq + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct((b, h, tp, d), F32),
      scratch_shapes=[pltpu.VMEM((bq, d), F32)],
      compiler_params=pallas_common.tpu_compiler_params(4),
      interpret=pallas_common.tpu_interpret_params(interpret),
  )(*lay.seq_args(), *operands)

  # Positions and segment ids are integer inputs: zero (None) cotangents.
  return (lay.q_unpad(dq).astype(q.dtype), lay.per_kv_head(dk).astype(k.dtype),
          lay.per_kv_head(dv).astype(v.dtype), None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def tile_sizes(block_sizes: BlockSizes, q_len: int, kv_len: int, block_size: int) -> tuple[int, int]:
  """Kernel tiles: block_q clamped to the 8-rounded query length; block_kv (whole landmark blocks)
  clamped to the key length rounded up to a whole landmark block."""
  if block_sizes.block_kv % block_size:
    raise ValueError(f"block_sizes.block_kv ({block_sizes.block_kv}) must be a multiple of "
                     f"block_size ({block_size}).")
  return (min(block_sizes.block_q, round_up(q_len, 8)),
          min(block_sizes.block_kv, round_up(kv_len, block_size)))


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
