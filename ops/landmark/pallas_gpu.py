"""Landmark grouped-softmax attention for GPU in Pallas: the fused kernel of spec §2.5.

Backend: Pallas' Triton lowering (`pl.pallas_call` + `jax.experimental.pallas.triton`), a stated interim:
Triton is deprecated since JAX 0.11 in favour of Mosaic GPU, whose Hopper kernels have not been written
here because no GPU was available to validate them; the backend choice is isolated in this file and in
the wrapper side it shares with the attention kernels (`ops.pallas_common.GpuFlashLayout`: padding,
BlockSpecs, the three `pallas_call`s; `_Layout` here adds the slot spreading), so a Mosaic GPU port
replaces them without touching callers. The tile maths is shared with the TPU kernel
(`ops.landmark.tile_math`); equations in `ops.landmark.xla` (spec §2.2 closed form).

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
Tiles with no visible key skip their matmuls (`lax.cond`).

Validation: interpret mode only (`interpret=True`, the generic Pallas interpreter on CPU, as in CI); the
Triton compilation itself has not been run (no GPU available to this project).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ops import pallas_common
from ops.landmark import tile_math
from ops.landmark.block_sizes import BlockSizes


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


class _Layout(pallas_common.GpuFlashLayout):
  """The shared GPU layout with spread key slots: key slot j (landmark block j // L, offset j % L) moves
  to slot (j // L) * W + j % L, W = group_width; the extra slots are empty (position EMPTY_SLOT)."""

  def __init__(self, q, k, q_pos, kv_pos, q_seg, kv_seg, block_size, bq, bk, group_width):
    self.block_size, self.width = block_size, group_width
    super().__init__(q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk, kv_pos_pad=tile_math.EMPTY_SLOT)

  def padded_kv_len(self) -> int:
    """Sp = num_blocks * W, the landmark blocks rounded up so that Sp is a multiple of bk."""
    self.num_blocks = pallas_common.round_up(pallas_common.cdiv(self.s, self.block_size) * self.width,
                                             self.bk) // self.width
    return self.num_blocks * self.width

  def kv_seq(self, x, value=0):
    """[B, S, ...] -> [B, Sp, ...]: block b's L slots at [b * W, b * W + L), `value` elsewhere."""
    nb, width = self.num_blocks, self.width
    x = pallas_common.pad_axis(x, 1, nb * self.block_size, value)
    x = x.reshape(self.b, nb, self.block_size, *x.shape[2:])
    return pallas_common.pad_axis(x, 2, width, value).reshape(self.b, nb * width, *x.shape[3:])

  def kv_major(self, x):
    """[B, S, Hkv, D] -> [B, Hkv, Sp, Dp] (spread)."""
    return jnp.swapaxes(self.kv_seq(pallas_common.pad_axis(x, 3, self.dp)), 1, 2)

  def kv_unpad(self, x):
    """Inverse of the spreading for per-slot results: [B, Sp, Hkv, Dp] -> [B, S, Hkv, D]."""
    x = x.reshape(self.b, self.num_blocks, self.width, *x.shape[2:])[:, :, :self.block_size]
    return x.reshape(self.b, self.num_blocks * self.block_size, *x.shape[3:])[:, :self.s][..., :self.d]


def _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bk, width, interpret):
  lay = _Layout(q, k, q_pos, kv_pos, q_seg, kv_seg, block_size, bq, bk, width)
  kernel = functools.partial(_fwd_kernel, block_size=block_size, group_width=width, scale=scale,
                             block_kv=bk, num_kv_blocks=lay.nk)
  return lay.forward(kernel, q, k, v, interpret)


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
  operands = lay.backward_operands(q, k, v, do, o, lse)
  common = dict(block_size=block_size, group_width=width, scale=scale)
  dk, dv = lay.dkv(functools.partial(_dkv_kernel, block_q=bq, num_q_blocks=lay.nq, **common), operands,
                   interpret)
  dq = lay.dq(functools.partial(_dq_kernel, block_kv=bk, num_kv_blocks=lay.nk, **common), operands,
              interpret)
  # Positions and segment ids are integer inputs: zero (None) cotangents; dk, dv are gathered back from
  # the spread slots.
  return (dq.astype(q.dtype), lay.per_kv_head(dk).astype(k.dtype), lay.per_kv_head(dv).astype(v.dtype),
          None, None, None, None)


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
  width = pallas_common.pow2(block_size)
  groups = min(pallas_common.pow2(block_sizes.block_kv // block_size),
               pallas_common.pow2(pallas_common.cdiv(kv_len, block_size)))
  bq = min(pallas_common.pow2_at_least(block_sizes.block_q), pallas_common.pow2_at_least(q_len))
  return bq, max(pallas_common.MIN_TILE, groups * width), width


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "block_sizes", "interpret"))
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
