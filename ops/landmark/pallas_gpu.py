"""Landmark grouped-softmax attention for GPU in Pallas: the fused kernel of spec §2.5.

Backend: Pallas' Triton lowering (`pl.pallas_call` + `jax.experimental.pallas.triton`), a stated interim:
Triton is deprecated since JAX 0.11 in favour of Mosaic GPU, whose Hopper kernels have not been written
here because no GPU was available to validate them; the backend choice is isolated in this file so a
Mosaic GPU port replaces it without touching callers. The tile maths is shared with the TPU kernel
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
from jax.experimental.pallas import triton as pltriton

from ops.landmark import tile_math
from ops.landmark.block_sizes import BlockSizes

_Q_PAD_SEGMENT = -1
_KV_PAD_SEGMENT = -2
_MIN_TILE = 16  # Triton's smallest dot tile


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _round_up(x: int, multiple: int) -> int:
  return _cdiv(x, multiple) * multiple


def _pow2(x: int) -> int:
  return 1 << (max(x, 1) - 1).bit_length()


def _pow2_at_least(x: int) -> int:
  return max(_MIN_TILE, _pow2(x))


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


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


class _Layout:
  """Padded, spread, transposed ([B, H, L, D]) kernel operands and the BlockSpecs of the three grids.

  Key slot j (landmark block j // L, offset j % L) moves to slot (j // L) * W + j % L, W = group_width.
  """

  def __init__(self, q, k, q_pos, kv_pos, q_seg, kv_seg, block_size, bq, bk, group_width):
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    self.b, self.t, self.h, self.d, self.s, self.hkv = b, t, h, d, s, hkv
    self.group = h // hkv
    self.dp = _pow2_at_least(d)
    self.block_size, self.width = block_size, group_width
    self.bq, self.bk = bq, bk
    self.tp = _round_up(t, bq)
    self.num_blocks = _round_up(_cdiv(s, block_size) * group_width, bk) // group_width
    self.sp = self.num_blocks * group_width
    self.nq, self.nk = self.tp // bq, self.sp // bk
    if q_seg is None:
      q_seg = jnp.zeros((b, t), jnp.int32)
      kv_seg = jnp.zeros((b, s), jnp.int32)
    self.seq_operands = [_pad_axis(q_pos, 1, self.tp), _pad_axis(q_seg, 1, self.tp, _Q_PAD_SEGMENT),
                         self._spread(kv_pos, tile_math.EMPTY_SLOT),
                         self._spread(kv_seg, _KV_PAD_SEGMENT)]

  def _spread(self, x, value=0):
    """[B, S, ...] -> [B, Sp, ...]: block b's L slots at [b * W, b * W + L), `value` elsewhere."""
    nb, width = self.num_blocks, self.width
    x = _pad_axis(x, 1, nb * self.block_size, value)
    x = x.reshape(self.b, nb, self.block_size, *x.shape[2:])
    return _pad_axis(x, 2, width, value).reshape(self.b, nb * width, *x.shape[3:])

  def gather(self, x):
    """Inverse of `_spread` for per-slot results: [B, Sp, ...] -> [B, S, ...]."""
    x = x.reshape(self.b, self.num_blocks, self.width, *x.shape[2:])[:, :, :self.block_size]
    return x.reshape(self.b, self.num_blocks * self.block_size, *x.shape[3:])[:, :self.s]

  def q_major(self, x):
    """[B, T, H, D] -> [B, H, Tp, Dp]."""
    return jnp.swapaxes(_pad_axis(_pad_axis(x, 1, self.tp), 3, self.dp), 1, 2)

  def kv_major(self, x):
    """[B, S, Hkv, D] -> [B, Hkv, Sp, Dp] (spread)."""
    return jnp.swapaxes(self._spread(_pad_axis(x, 3, self.dp)), 1, 2)

  def rows(self, x):
    """[B, T, H, 1] row statistics -> [B, H, Tp]."""
    return jnp.swapaxes(_pad_axis(x, 1, self.tp), 1, 2)[..., 0]

  def seq_specs(self, q_block: int | None, kv_block: int | None):
    """Specs of positions and segments: a block of `*_block` entries or the whole padded length."""
    sq = pl.squeezed
    qb, kb = q_block or self.tp, kv_block or self.sp
    q_index = (lambda b, h, i: (b, i)) if q_block else (lambda b, h, i: (b, 0))
    k_index = (lambda b, h, i: (b, i)) if kv_block else (lambda b, h, i: (b, 0))
    return [pl.BlockSpec((sq, qb), q_index)] * 2 + [pl.BlockSpec((sq, kb), k_index)] * 2

  def tensor_spec(self, length: int, per_kv_head: bool, blocked: bool):
    sq, g = pl.squeezed, self.group
    head = (lambda h: h // g) if per_kv_head else (lambda h: h)
    if blocked:
      return pl.BlockSpec((sq, sq, length, self.dp), lambda b, h, i: (b, head(h), i, 0))
    return pl.BlockSpec((sq, sq, length, self.dp), lambda b, h, i: (b, head(h), 0, 0))

  def row_spec(self, length: int, blocked: bool):
    sq = pl.squeezed
    if blocked:
      return pl.BlockSpec((sq, sq, length), lambda b, h, i: (b, h, i))
    return pl.BlockSpec((sq, sq, length), lambda b, h, i: (b, h, 0))


def _compiler_params(head_dim: int):
  return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_size, scale, bq, bk, width, interpret):
  lay = _Layout(q, k, q_pos, kv_pos, q_seg, kv_seg, block_size, bq, bk, width)
  kernel = functools.partial(_fwd_kernel, block_size=block_size, group_width=width, scale=scale,
                             block_kv=bk, num_kv_blocks=lay.nk)
  o, lse = pl.pallas_call(
      kernel,
      grid=(lay.b, lay.h, lay.nq),
      in_specs=lay.seq_specs(bq, None) + [lay.tensor_spec(bq, False, True),
                                          lay.tensor_spec(lay.sp, True, False),
                                          lay.tensor_spec(lay.sp, True, False)],
      out_specs=[lay.tensor_spec(bq, False, True), lay.row_spec(bq, True)],
      out_shape=[jax.ShapeDtypeStruct((lay.b, lay.h, lay.tp, lay.dp), q.dtype),
                 jax.ShapeDtypeStruct((lay.b, lay.h, lay.tp), jnp.float32)],
      compiler_params=_compiler_params(lay.dp),
      interpret=interpret,
  )(*lay.seq_operands, lay.q_major(q), lay.kv_major(k), lay.kv_major(v))
  return jnp.swapaxes(o, 1, 2)[:, :lay.t, :, :lay.d], lse


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
  do = do.astype(q.dtype)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  operands = (lay.q_major(q), lay.kv_major(k), lay.kv_major(v), lay.q_major(do), lse, lay.rows(delta))
  common = dict(block_size=block_size, group_width=width, scale=scale)

  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq, num_q_blocks=lay.nq, **common),
      grid=(lay.b, lay.h, lay.nk),
      in_specs=lay.seq_specs(None, bk) + [lay.tensor_spec(lay.tp, False, False),
                                          lay.tensor_spec(bk, True, True), lay.tensor_spec(bk, True, True),
                                          lay.tensor_spec(lay.tp, False, False),
                                          lay.row_spec(lay.tp, False), lay.row_spec(lay.tp, False)],
      out_specs=[lay.tensor_spec(bk, False, True)] * 2,
      out_shape=[jax.ShapeDtypeStruct((lay.b, lay.h, lay.sp, lay.dp), jnp.float32)] * 2,
      compiler_params=_compiler_params(lay.dp),
      interpret=interpret,
  )(*lay.seq_operands, *operands)

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_kv=bk, num_kv_blocks=lay.nk, **common),
      grid=(lay.b, lay.h, lay.nq),
      in_specs=lay.seq_specs(bq, None) + [lay.tensor_spec(bq, False, True),
                                          lay.tensor_spec(lay.sp, True, False),
                                          lay.tensor_spec(lay.sp, True, False),
                                          lay.tensor_spec(bq, False, True),
                                          lay.row_spec(bq, True), lay.row_spec(bq, True)],
      out_specs=lay.tensor_spec(bq, False, True),
      out_shape=jax.ShapeDtypeStruct((lay.b, lay.h, lay.tp, lay.dp), jnp.float32),
      compiler_params=_compiler_params(lay.dp),
      interpret=interpret,
  )(*lay.seq_operands, *operands)

  def per_kv_head(x):  # [B, H, Sp, Dp] per query head -> [B, S, Hkv, D] summed over each GQA group
    x = x.reshape(lay.b, lay.hkv, lay.group, lay.sp, lay.dp).sum(axis=2)
    return lay.gather(jnp.swapaxes(x, 1, 2))[..., :lay.d]

  dq = jnp.swapaxes(dq, 1, 2)[:, :lay.t, :, :lay.d].astype(q.dtype)
  # Positions and segment ids are integer inputs: zero (None) cotangents.
  return dq, per_kv_head(dk).astype(k.dtype), per_kv_head(dv).astype(v.dtype), None, None, None, None


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
  width = _pow2(block_size)
  groups = min(_pow2(block_sizes.block_kv // block_size), _pow2(_cdiv(kv_len, block_size)))
  bq = min(_pow2_at_least(block_sizes.block_q), _pow2_at_least(q_len))
  return bq, max(_MIN_TILE, groups * width), width


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
