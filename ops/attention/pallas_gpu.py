"""Flash attention for GPU in Pallas: softmax and Cog weights, causal or not, segment ids, GQA, per-key
additive bias, explicit positions. Forward and backward kernels under one `jax.custom_vjp`.

Backend: this file uses Pallas' Triton lowering (`pl.pallas_call` + `jax.experimental.pallas.triton`), a
stated interim: Triton is deprecated since JAX 0.11 in favour of Mosaic GPU, whose Hopper kernels (TMA,
wgmma, warp specialisation) have not been written here because no GPU was available to validate them; the
backend choice is isolated in this file so the Mosaic GPU port replaces it without touching callers. The
tile maths is shared with the TPU kernel (`ops.attention.tile_math`); equations in `ops.attention.xla`.

Grids, one program per (b, h, block); the reduction is a `lax.fori_loop` inside the program (GPU style):
  forward (b, h, q block): loops over kv blocks with the online softmax; writes o and lse.
  dK/dV   (b, h, kv block): loops over q blocks recomputing the tile; per query head (GQA groups are
          summed afterwards), plus the key-bias gradient.
  dQ      (b, h, q block): loops over kv blocks.
Tiles with no visible key skip their matmuls (`lax.cond`). Triton needs power-of-two tile shapes, so the
head dim is zero-padded to a power of two (zero columns change no dot product) and tiles are powers of two.
`interpret=True` runs the same kernels through the generic Pallas interpreter on CPU (CI).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ops.attention import tile_math
from ops.attention.block_sizes import BlockSizes

_Q_PAD_SEGMENT = -1
_KV_PAD_SEGMENT = -2
_MIN_TILE = 16  # Triton's smallest dot tile


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pow2_at_least(x: int) -> int:
  return max(_MIN_TILE, 1 << (max(x, 1) - 1).bit_length())


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _any(mask: jax.Array) -> jax.Array:
  return jnp.max(jnp.where(mask, 1.0, 0.0)) > 0.0


def _split_refs(refs, has_bias: bool):
  if has_bias:
    return refs[0], refs[1:]
  return None, refs


def _key_tile(kv_pos_ref, kv_seg_ref, bias_ref, start, bk):
  """Positions, segments [1, bk] and bias [1, bk] (or None) of the key tile starting at `start`."""
  keys = pl.ds(start, bk)
  bias = None if bias_ref is None else bias_ref[keys][None, :]
  return kv_pos_ref[keys][None, :], kv_seg_ref[keys][None, :], bias


def _fwd_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, *refs, scale, causal, signed, has_bias,
                block_kv, num_kv_blocks):
  bias_ref, (q_ref, k_ref, v_ref, o_ref, lse_ref) = _split_refs(refs, has_bias)
  q = q_ref[...]
  q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]
  bq, d = q.shape

  def body(j, carry):
    start = j * block_kv
    kv_pos, kv_seg, bias = _key_tile(kv_pos_ref, kv_seg_ref, bias_ref, start, block_kv)
    mask = tile_math.tile_mask(q_pos, q_seg, kv_pos, kv_seg, bias, causal)

    def update(carry):
      m, l, acc = carry
      keys = pl.ds(start, block_kv)
      s, a = tile_math.tile_scores(q, k_ref[keys, :], bias, mask, scale, signed)
      return tile_math.online_softmax_step(m, l, acc, s, a, mask, v_ref[keys, :], signed)

    return jax.lax.cond(_any(mask), update, lambda c: c, carry)

  init = (jnp.full((bq, 1), tile_math.MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, d), jnp.float32))
  o, lse = tile_math.finalize(*jax.lax.fori_loop(0, num_kv_blocks, body, init))
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dkv_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, *refs, scale, causal, signed, has_bias,
                block_q, num_q_blocks):
  bias_ref, refs = _split_refs(refs, has_bias)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *db_ref = refs
  k, v = k_ref[...], v_ref[...]
  kv_pos, kv_seg = kv_pos_ref[...][None, :], kv_seg_ref[...][None, :]
  bias = None if bias_ref is None else bias_ref[...][None, :]
  bk, d = k.shape

  def body(i, carry):
    rows = pl.ds(i * block_q, block_q)
    mask = tile_math.tile_mask(q_pos_ref[rows][:, None], q_seg_ref[rows][:, None], kv_pos, kv_seg, bias,
                               causal)

    def update(carry):
      dk, dv, db = carry
      q, do = q_ref[rows, :], do_ref[rows, :]
      s, a = tile_math.tile_scores(q, k, bias, mask, scale, signed)
      w, ds = tile_math.tile_grads(s, a, mask, lse_ref[rows][:, None], delta_ref[rows][:, None], do, v,
                                   signed)
      return (dk + tile_math.matmul_tn((ds * scale).astype(q.dtype), q),
              dv + tile_math.matmul_tn(w.astype(do.dtype), do),
              db + jnp.sum(ds, axis=0, keepdims=True))

    return jax.lax.cond(_any(mask), update, lambda c: c, carry)

  init = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32), jnp.zeros((1, bk), jnp.float32))
  dk, dv, db = jax.lax.fori_loop(0, num_q_blocks, body, init)
  dk_ref[...] = dk
  dv_ref[...] = dv
  if db_ref:
    db_ref[0][...] = db[0]


def _dq_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, *refs, scale, causal, signed, has_bias,
               block_kv, num_kv_blocks):
  bias_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref) = _split_refs(refs, has_bias)
  q, do = q_ref[...], do_ref[...]
  q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

  def body(j, dq):
    start = j * block_kv
    kv_pos, kv_seg, bias = _key_tile(kv_pos_ref, kv_seg_ref, bias_ref, start, block_kv)
    mask = tile_math.tile_mask(q_pos, q_seg, kv_pos, kv_seg, bias, causal)

    def update(dq):
      keys = pl.ds(start, block_kv)
      k = k_ref[keys, :]
      s, a = tile_math.tile_scores(q, k, bias, mask, scale, signed)
      _, ds = tile_math.tile_grads(s, a, mask, lse, delta, do, v_ref[keys, :], signed)
      return dq + tile_math.matmul_nn((ds * scale).astype(k.dtype), k)

    return jax.lax.cond(_any(mask), update, lambda c: c, dq)

  dq_ref[...] = jax.lax.fori_loop(0, num_kv_blocks, body, jnp.zeros(q.shape, jnp.float32))


class _Layout:
  """Padded, transposed ([B, H, L, D]) kernel operands and the BlockSpecs of the three grids."""

  def __init__(self, q, k, bias, q_pos, kv_pos, q_seg, kv_seg, bq, bk):
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    self.b, self.t, self.h, self.d, self.s, self.hkv = b, t, h, d, s, hkv
    self.group = h // hkv
    self.dp = _pow2_at_least(d)
    self.bq, self.bk = bq, bk
    self.tp, self.sp = _round_up(t, bq), _round_up(s, bk)
    self.nq, self.nk = self.tp // bq, self.sp // bk
    if q_seg is None:
      q_seg = jnp.zeros((b, t), jnp.int32)
      kv_seg = jnp.zeros((b, s), jnp.int32)
    self.seq_operands = [_pad_axis(q_pos, 1, self.tp), _pad_axis(q_seg, 1, self.tp, _Q_PAD_SEGMENT),
                         _pad_axis(kv_pos, 1, self.sp), _pad_axis(kv_seg, 1, self.sp, _KV_PAD_SEGMENT)]
    if bias is not None:
      self.seq_operands.append(_pad_axis(bias, 2, self.sp))  # [B, Hb, Sp]
    self.bias_shared = bias is not None and bias.shape[1] == 1

  def q_major(self, x):
    """[B, T, H, D] -> [B, H, Tp, Dp]."""
    return jnp.swapaxes(_pad_axis(_pad_axis(x, 1, self.tp), 3, self.dp), 1, 2)

  def kv_major(self, x):
    """[B, S, Hkv, D] -> [B, Hkv, Sp, Dp]."""
    return jnp.swapaxes(_pad_axis(_pad_axis(x, 1, self.sp), 3, self.dp), 1, 2)

  def rows(self, x):
    """[B, T, H, 1] row statistics -> [B, H, Tp]."""
    return jnp.swapaxes(_pad_axis(x, 1, self.tp), 1, 2)[..., 0]

  def seq_specs(self, q_block: int | None, kv_block: int | None):
    """Specs of positions, segments (and bias): a block of `*_block` rows or the whole padded length."""
    sq, g = pl.squeezed, self.group
    qb, kb = q_block or self.tp, kv_block or self.sp
    q_index = (lambda b, h, i: (b, i)) if q_block else (lambda b, h, i: (b, 0))
    k_index = (lambda b, h, i: (b, i)) if kv_block else (lambda b, h, i: (b, 0))
    specs = [pl.BlockSpec((sq, qb), q_index)] * 2 + [pl.BlockSpec((sq, kb), k_index)] * 2
    if len(self.seq_operands) == 5:
      shared = self.bias_shared
      specs.append(pl.BlockSpec((sq, sq, kb), lambda b, h, i: (b, 0 if shared else h // g, k_index(b, h, i)[1])))
    return specs

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


def _forward(q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, causal, signed, scale, bq, bk, interpret):
  lay = _Layout(q, k, bias, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
  kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, signed=signed,
                             has_bias=bias is not None, block_kv=bk, num_kv_blocks=lay.nk)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12, 13))
def _flash(q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, causal, signed, scale, bq, bk, interpret):
  return _forward(q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, causal, signed, scale, bq, bk,
                  interpret)[0]


def _flash_fwd(q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, causal, signed, scale, bq, bk, interpret):
  o, lse = _forward(q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, causal, signed, scale, bq, bk, interpret)
  return o, (q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, o, lse)


def _flash_bwd(causal, signed, scale, bq, bk, interpret, res, do):
  q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
  lay = _Layout(q, k, bias, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
  do = do.astype(q.dtype)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  operands = (lay.q_major(q), lay.kv_major(k), lay.kv_major(v), lay.q_major(do), lse, lay.rows(delta))
  has_bias = bias is not None
  common = dict(scale=scale, causal=causal, signed=signed, has_bias=has_bias)

  dkv_shapes = [jax.ShapeDtypeStruct((lay.b, lay.h, lay.sp, lay.dp), jnp.float32)] * 2
  dkv_specs = [lay.tensor_spec(bk, False, True)] * 2
  if has_bias:
    dkv_shapes.append(jax.ShapeDtypeStruct((lay.b, lay.h, lay.sp), jnp.float32))
    dkv_specs.append(lay.row_spec(bk, True))
  dkv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq, num_q_blocks=lay.nq, **common),
      grid=(lay.b, lay.h, lay.nk),
      in_specs=lay.seq_specs(None, bk) + [lay.tensor_spec(lay.tp, False, False),
                                          lay.tensor_spec(bk, True, True), lay.tensor_spec(bk, True, True),
                                          lay.tensor_spec(lay.tp, False, False),
                                          lay.row_spec(lay.tp, False), lay.row_spec(lay.tp, False)],
      out_specs=dkv_specs,
      out_shape=dkv_shapes,
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
    return jnp.swapaxes(x, 1, 2)[:, :lay.s, :, :lay.d]

  dq = jnp.swapaxes(dq, 1, 2)[:, :lay.t, :, :lay.d].astype(q.dtype)
  dk = per_kv_head(dkv[0]).astype(k.dtype)
  dv = per_kv_head(dkv[1]).astype(v.dtype)
  dbias = None
  if has_bias:
    db = dkv[2][:, :, :lay.s].reshape(lay.b, lay.hkv, lay.group, lay.s).sum(axis=2)
    if lay.bias_shared:
      db = jnp.sum(db, axis=1, keepdims=True)
    dbias = db.astype(bias.dtype)
  return dq, dk, dv, dbias, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def tile_sizes(block_sizes: BlockSizes, q_len: int, kv_len: int) -> tuple[int, int]:
  """Power-of-two tiles (Triton), at most the requested blocks, at least 16, covering short inputs."""
  def tile(requested: int, length: int) -> int:
    return min(_pow2_at_least(requested), _pow2_at_least(length))
  return tile(block_sizes.block_q, q_len), tile(block_sizes.block_kv, kv_len)


@functools.partial(jax.jit, static_argnames=("causal", "signed", "scale", "block_sizes", "interpret"))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
              kv_positions: jax.Array, segment_ids: jax.Array | None,
              kv_segment_ids: jax.Array | None, key_bias: jax.Array | None, causal: bool,
              signed: bool, scale: float, block_sizes: BlockSizes, interpret: bool) -> jax.Array:
  """Pallas GPU flash attention. Call it through `ops.attention.attention(..., impl="pallas")`.

  Arguments as `ops.attention.pallas_tpu.attention`; `interpret=True` uses the generic Pallas interpreter.
  """
  bq, bk = tile_sizes(block_sizes, q.shape[1], k.shape[1])
  return _flash(q, k, v, key_bias, q_positions, kv_positions, segment_ids, kv_segment_ids, causal, signed,
                scale, bq, bk, interpret)
