"""Flash attention for GPU in Pallas: softmax and Cog weights, causal or not, segment ids, GQA, per-key
additive bias, explicit positions. Forward and backward kernels under one `jax.custom_vjp`.

Backend: this file uses Pallas' Triton lowering (`pl.pallas_call` + `jax.experimental.pallas.triton`), a
stated interim: Triton is deprecated since JAX 0.11 in favour of Mosaic GPU, whose Hopper kernels (TMA,
wgmma, warp specialisation) have not been written here because no GPU was available to validate them; the
backend choice is isolated in this file and in the wrapper side it shares with the landmark kernels
(`ops.pallas_common.GpuFlashLayout`: padding, BlockSpecs, the three `pallas_call`s), so the Mosaic GPU port
replaces them without touching callers. The tile maths is shared with the TPU kernel
(`ops.attention.tile_math`); equations in `ops.attention.xla`.

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

from ops import pallas_common
from ops.attention import tile_math
from ops.attention.block_sizes import BlockSizes
from ops.pallas_common import any_mask, split_refs


def _key_tile(kv_pos_ref, kv_seg_ref, bias_ref, start, bk):
  """Positions, segments [1, bk] and bias [1, bk] (or None) of the key tile starting at `start`."""
  keys = pl.ds(start, bk)
  bias = None if bias_ref is None else bias_ref[keys][None, :]
  return kv_pos_ref[keys][None, :], kv_seg_ref[keys][None, :], bias


def _fwd_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, *refs, scale, causal, signed, has_bias,
                block_kv, num_kv_blocks):
  bias_ref, (q_ref, k_ref, v_ref, o_ref, lse_ref) = split_refs(refs, has_bias)
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

    return jax.lax.cond(any_mask(mask), update, lambda c: c, carry)

  init = (jnp.full((bq, 1), tile_math.MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, d), jnp.float32))
  o, lse = tile_math.finalize(*jax.lax.fori_loop(0, num_kv_blocks, body, init))
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dkv_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, *refs, scale, causal, signed, has_bias,
                block_q, num_q_blocks):
  bias_ref, refs = split_refs(refs, has_bias)
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

    return jax.lax.cond(any_mask(mask), update, lambda c: c, carry)

  init = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32), jnp.zeros((1, bk), jnp.float32))
  dk, dv, db = jax.lax.fori_loop(0, num_q_blocks, body, init)
  dk_ref[...] = dk
  dv_ref[...] = dv
  if db_ref:
    db_ref[0][...] = db[0]


def _dq_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, *refs, scale, causal, signed, has_bias,
               block_kv, num_kv_blocks):
  bias_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref) = split_refs(refs, has_bias)
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

    return jax.lax.cond(any_mask(mask), update, lambda c: c, dq)

  dq_ref[...] = jax.lax.fori_loop(0, num_kv_blocks, body, jnp.zeros(q.shape, jnp.float32))


def _layout(q, k, bias, q_pos, kv_pos, q_seg, kv_seg, bq, bk):
  return pallas_common.GpuFlashLayout(q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk, bias=bias)


def _forward(q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, causal, signed, scale, bq, bk, interpret):
  lay = _layout(q, k, bias, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
  kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, signed=signed,
                             has_bias=bias is not None, block_kv=bk, num_kv_blocks=lay.nk)
  return lay.forward(kernel, q, k, v, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12, 13))
def _flash(q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, causal, signed, scale, bq, bk, interpret):
  return _forward(q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, causal, signed, scale, bq, bk,
                  interpret)[0]


def _flash_fwd(q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, causal, signed, scale, bq, bk, interpret):
  o, lse = _forward(q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, causal, signed, scale, bq, bk, interpret)
  return o, (q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, o, lse)


def _flash_bwd(causal, signed, scale, bq, bk, interpret, res, do):
  q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
  lay = _layout(q, k, bias, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
  operands = lay.backward_operands(q, k, v, do, o, lse)
  has_bias = bias is not None
  common = dict(scale=scale, causal=causal, signed=signed, has_bias=has_bias)
  dkv = lay.dkv(functools.partial(_dkv_kernel, block_q=bq, num_q_blocks=lay.nq, **common), operands,
                interpret, bias_grad=has_bias)
  dq = lay.dq(functools.partial(_dq_kernel, block_kv=bk, num_kv_blocks=lay.nk, **common), operands,
              interpret)

  dq = dq.astype(q.dtype)
  dk = lay.per_kv_head(dkv[0]).astype(k.dtype)
  dv = lay.per_kv_head(dkv[1]).astype(v.dtype)
  dbias = lay.key_bias_grad(dkv[2], bias) if has_bias else None
  return dq, dk, dv, dbias, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def tile_sizes(block_sizes: BlockSizes, q_len: int, kv_len: int) -> tuple[int, int]:
  """Power-of-two tiles (Triton), at most the requested blocks, at least 16, covering short inputs."""
  def tile(requested: int, length: int) -> int:
    return min(pallas_common.pow2_at_least(requested), pallas_common.pow2_at_least(length))
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
