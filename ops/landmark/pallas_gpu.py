"""Landmark grouped-softmax attention for GPU in Pallas: the fused kernel of spec §2.5.

Backend: Pallas' Triton lowering (`pl.pallas_call` + `jax.experimental.pallas.triton`). The tile maths is
shared with the TPU kernel (`ops.landmark.tile_math`); equations in `ops.landmark.xla` (spec §2.2 closed
form). The operands are padded and transposed by `ops.flash_layout.GpuFlashLayout` (shared with the
attention kernels; `_Layout` here adds the slot spreading); this file's wrapper builds the BlockSpecs and
runs the three `pallas_call`s.

Same layout requirement as "xla": key slot j holds position j or is empty (EMPTY_SLOT); query positions
are arbitrary. Triton needs power-of-two tiles, so the wrapper spreads every landmark block over
W = next_pow2(block_size) slots (the extra slots are empty: position EMPTY_SLOT, segment -2, zero k/v)
and key tiles hold a power-of-two number of whole spread blocks; the head dim is zero-padded to a power
of two (zero columns change no dot product). Gradients are gathered back to the original slots.

Grids, one program per (b, h, block); the reduction is a `lax.fori_loop` inside the program (GPU style):
  forward (b, h, q block): loops over key tiles; earlier blocks get a local softmax times the online
          softmax weight of their landmark, the query's own block is causal softmax; writes o and lse.
  dK/dV   (b, h, kv tile): loops over q blocks recomputing the tile; per query head (GQA summed after).
  dQ      (b, h, q block): loops over key tiles.
Tiles with no visible key skip their matmuls (`lax.cond`). `interpret=True` runs the same kernels through
the generic Pallas interpreter on CPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ops import flash_layout
from ops import pallas_common
from ops.landmark import tile_math
from ops.landmark.block_sizes import BlockSizes
from ops.pallas_common import MIN_TILE
from ops.tiling import pad_axis, round_up

F32 = jnp.float32


def _fwd_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                block_size, group_width, scale, block_kv, num_kv_blocks):
  q = q_ref[...]
  q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]
  bq, d = q.shape

  def body(j, carry):
    keys = pl.ds(j * block_kv, block_kv)
    masks = tile_math.tile_masks(q_pos, q_seg, kv_pos_ref[keys][None, :], kv_seg_ref[keys][None, :],
                                 block_size)

    def update(carry):
      s = tile_math.scores(q, k_ref[keys, :], scale)
      return tile_math.online_step(*carry, s, masks, v_ref[keys, :], group_width)

    return jax.lax.cond(tile_math.any_visible(masks), update, lambda c: c, carry)

  init = (jnp.full((bq, 1), tile_math.MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, d), jnp.float32))
  o, lse = tile_math.finalize(*jax.lax.fori_loop(0, num_kv_blocks, body, init))
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dkv_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, block_size, group_width, scale, block_q, num_q_blocks):
  k, v = k_ref[...], v_ref[...]
  kv_pos, kv_seg = kv_pos_ref[...][None, :], kv_seg_ref[...][None, :]
  bk, d = k.shape

  def body(i, carry):
    rows = pl.ds(i * block_q, block_q)
    masks = tile_math.tile_masks(q_pos_ref[rows][:, None], q_seg_ref[rows][:, None], kv_pos, kv_seg,
                                 block_size)

    def update(carry):
      dk, dv = carry
      q, do = q_ref[rows, :], do_ref[rows, :]
      s = tile_math.scores(q, k, scale)
      w, ds = tile_math.tile_grads(s, masks, lse_ref[rows][:, None], delta_ref[rows][:, None], do, v,
                                   group_width)
      return (dk + tile_math.matmul_tn((ds * scale).astype(q.dtype), q),
              dv + tile_math.matmul_tn(w.astype(do.dtype), do))

    return jax.lax.cond(tile_math.any_visible(masks), update, lambda c: c, carry)

  init = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32))
  dk, dv = jax.lax.fori_loop(0, num_q_blocks, body, init)
  dk_ref[...] = dk
  dv_ref[...] = dv


def _dq_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, block_size, group_width, scale, block_kv, num_kv_blocks):
  q, do = q_ref[...], do_ref[...]
  q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

  def body(j, dq):
    keys = pl.ds(j * block_kv, block_kv)
    masks = tile_math.tile_masks(q_pos, q_seg, kv_pos_ref[keys][None, :], kv_seg_ref[keys][None, :],
                                 block_size)

    def update(dq):
      k = k_ref[keys, :]
      s = tile_math.scores(q, k, scale)
      _, ds = tile_math.tile_grads(s, masks, lse, delta, do, v_ref[keys, :], group_width)
      return dq + tile_math.matmul_nn((ds * scale).astype(k.dtype), k)

    return jax.lax.cond(tile_math.any_visible(masks), update, lambda c: c, dq)

  dq_ref[...] = jax.lax.fori_loop(0, num_kv_blocks, body, jnp.zeros(q.shape, jnp.float32))


class _Layout(flash_layout.GpuFlashLayout):
  """The shared GPU layout with spread key slots: key slot j (landmark block j // L, offset j % L) moves
  to slot (j // L) * W + j % L, W = group_width; the extra slots are empty (position EMPTY_SLOT)."""

  def __init__(self, q, k, q_pos, kv_pos, q_seg, kv_seg, block_size, bq, bk, group_width):
    self.block_size, self.width = block_size, group_width
    super().__init__(q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk, kv_pos_pad=tile_math.EMPTY_SLOT)

  def padded_kv_len(self) -> int:
    """Sp = num_blocks * W, the landmark blocks rounded up so that Sp is a multiple of bk."""
    self.num_blocks = round_up(pl.cdiv(self.s, self.block_size) * self.width, self.bk) // self.width
    return self.num_blocks * self.width

  def kv_seq(self, x, value=0):
    """[B, S, ...] -> [B, Sp, ...]: block b's L slots at [b * W, b * W + L), `value` elsewhere."""
    nb, width = self.num_blocks, self.width
    x = pad_axis(x, 1, nb * self.block_size, value)
    x = x.reshape(self.b, nb, self.block_size, *x.shape[2:])
    return pad_axis(x, 2, width, value).reshape(self.b, nb * width, *x.shape[3:])

  def kv_major(self, x):
    """[B, S, Hkv, D] -> [B, Hkv, Sp, Dp] (spread)."""
    return jnp.swapaxes(self.kv_seq(pad_axis(x, 3, self.dp)), 1, 2)

  def kv_unpad(self, x):
    """Inverse of the spreading for per-slot results: [B, Sp, Hkv, Dp] -> [B, S, Hkv, D]."""
    x = x.reshape(self.b, self.num_blocks, self.width, *x.shape[2:])[:, :, :self.block_size]
    return x.reshape(self.b, self.num_blocks * self.block_size, *x.shape[3:])[:, :self.s][..., :self.d]


def _specs(lay: _Layout, q_block: int | None, kv_block: int | None):
  """BlockSpecs on a (b, h, i) grid: (sequence specs [q pos, q seg, kv pos, kv seg], q-like [rows, Dp],
  kv [keys, Dp] of the query head's kv head, per-query-head key [keys, Dp], q-row [rows]); the rows are
  q block i (q_block) or all Tp, the keys key tile i (kv_block) or all Sp."""
  sq, g, dp = pl.squeezed, lay.group, lay.dp
  rows, keys = q_block or lay.tp, kv_block or lay.sp
  q_index = (lambda b, h, i: i) if q_block else (lambda b, h, i: 0)
  k_index = (lambda b, h, i: i) if kv_block else (lambda b, h, i: 0)
  seq = ([pl.BlockSpec((sq, rows), lambda b, h, i: (b, q_index(b, h, i)))] * 2
         + [pl.BlockSpec((sq, keys), lambda b, h, i: (b, k_index(b, h, i)))] * 2)
  q_spec = pl.BlockSpec((sq, sq, rows, dp), lambda b, h, i: (b, h, q_index(b, h, i), 0))
  kv_spec = pl.BlockSpec((sq, sq, keys, dp), lambda b, h, i: (b, h // g, k_index(b, h, i), 0))
  key_spec = pl.BlockSpec((sq, sq, keys, dp), lambda b, h, i: (b, h, k_index(b, h, i), 0))
  row_spec = pl.BlockSpec((sq, sq, rows), lambda b, h, i: (b, h, q_index(b, h, i)))
  return seq, q_spec, kv_spec, key_spec, row_spec


def _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bk, width, interpret):
  """(o [B, T, H, D], lse [B, H, Tp] f32) from the forward kernel on grid (b, h, q block); each program
  sees one q block and the whole (spread) k, v of its kv head."""
  lay = _Layout(q, k, q_pos, kv_pos, q_seg, kv_seg, block_size, bq, bk, width)
  kernel = functools.partial(_fwd_kernel, block_size=block_size, group_width=width, scale=scale,
                             block_kv=bk, num_kv_blocks=lay.nk)
  seq, q_spec, kv_spec, _, row_spec = _specs(lay, bq, None)
  o, lse = pl.pallas_call(
      kernel,
      grid=(lay.b, lay.h, lay.nq),
      in_specs=seq + [q_spec, kv_spec, kv_spec],
      out_specs=[q_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct((lay.b, lay.h, lay.tp, lay.dp), q.dtype),
                 jax.ShapeDtypeStruct((lay.b, lay.h, lay.tp), F32)],
      compiler_params=pallas_common.triton_compiler_params(lay.dp),
      interpret=interpret,
  )(*lay.seq_args(), lay.q_major(q), lay.kv_major(k), lay.kv_major(v))
  return lay.q_unpad(o), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bk, width, interpret):
  return _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bk, width,
                  interpret)[0]


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bk, width, interpret):
  o, lse = _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bk, width, interpret)
  return o, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse)


def _flash_bwd(block_size, scale, bq, bk, width, interpret, res, do):
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
  lay = _Layout(q, k, q_pos, kv_pos, q_seg, kv_seg, block_size, bq, bk, width)
  operands = lay.backward_operands(q, k, v, do, o, lse)  # q, k, v, dO, lse, D
  common = dict(block_size=block_size, group_width=width, scale=scale)
  b, h, dp, tp, sp = lay.b, lay.h, lay.dp, lay.tp, lay.sp

  # dK/dV on grid (b, h, key tile), looping over the q blocks: per-query-head f32 dk, dv [B, H, Sp, Dp].
  seq, q_spec, kv_spec, key_spec, row_spec = _specs(lay, None, bk)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq, num_q_blocks=lay.nq, **common),
      grid=(b, h, lay.nk),
      in_specs=seq + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=[key_spec, key_spec],
      out_shape=[jax.ShapeDtypeStruct((b, h, sp, dp), F32)] * 2,
      compiler_params=pallas_common.triton_compiler_params(dp),
      interpret=interpret,
  )(*lay.seq_args(), *operands)

  # dQ on grid (b, h, q block), looping over the key tiles: f32 dq [B, H, Tp, Dp].
  seq, q_spec, kv_spec, _, row_spec = _specs(lay, bq, None)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_kv=bk, num_kv_blocks=lay.nk, **common),
      grid=(b, h, lay.nq),
      in_specs=seq + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct((b, h, tp, dp), F32),
      compiler_params=pallas_common.triton_compiler_params(dp),
      interpret=interpret,
  )(*lay.seq_args(), *operands)

  # Positions and segment ids are integer inputs: zero (None) cotangents; dk, dv are gathered back from
  # the spread slots.
  return (lay.q_unpad(dq).astype(q.dtype), lay.per_kv_head(dk).astype(k.dtype),
          lay.per_kv_head(dv).astype(v.dtype), None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def tile_sizes(block_sizes: BlockSizes, q_len: int, kv_len: int,
               block_size: int) -> tuple[int, int, int]:
  """(bq, bk, W): power-of-two tiles for Triton, W = next_pow2(block_size) slots per landmark block.

  bq is at most the requested block_q and at least 16, covering short inputs; a key tile holds a
  power-of-two number of spread blocks, about block_kv // block_size of them (capped by the sequence),
  and at least 16 slots.
  """
  if block_sizes.block_kv % block_size:
    raise ValueError(f"block_sizes.block_kv ({block_sizes.block_kv}) must be a multiple of "
                     f"block_size ({block_size}).")
  width = pl.next_power_of_2(block_size)
  groups = pl.next_power_of_2(min(block_sizes.block_kv // block_size, pl.cdiv(kv_len, block_size)))
  bq = max(MIN_TILE, pl.next_power_of_2(min(block_sizes.block_q, q_len)))
  return bq, max(MIN_TILE, groups * width), width


def landmark_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
                       kv_positions: jax.Array, segment_ids: jax.Array | None,
                       kv_segment_ids: jax.Array | None, block_size: int, scale: float,
                       block_sizes: BlockSizes, interpret: bool) -> jax.Array:
  """Pallas GPU landmark attention. Call it through `ops.landmark.landmark_attention(impl="pallas")`.

  Arguments as `ops.landmark.pallas_tpu.landmark_attention`; `interpret=True` uses the generic Pallas
  interpreter on CPU.
  """
  bq, bk, width = tile_sizes(block_sizes, q.shape[1], k.shape[1], block_size)
  return _flash(q, k, v, q_positions, kv_positions, segment_ids, kv_segment_ids, block_size, scale, bq,
                bk, width, interpret)
