"""Flash attention for GPU in Pallas: softmax and Cog weights, causal or not, segment ids, GQA, per-key
additive bias, T5 relative bias, softmax1, explicit positions. Forward and backward kernels under one
`jax.custom_vjp`.

Backend: Pallas' Triton lowering (`pl.pallas_call` + `jax.experimental.pallas.triton`). The tile maths is
shared with the TPU kernel (`ops.attention.tile_math`); equations in `ops.attention.xla`. The operands are
padded and transposed by `ops.flash_layout.GpuFlashLayout` (shared with the landmark kernels); this file's
wrapper builds the BlockSpecs and runs the three `pallas_call`s.

Grids, one program per (b, h, block); the reduction is a `lax.fori_loop` inside the program (GPU style):
  forward (b, h, q block): loops over kv blocks with the online softmax; writes o and lse.
  dK/dV   (b, h, kv block): loops over q blocks recomputing the tile; per query head (GQA groups are
          summed afterwards), plus the key-bias gradient.
  dQ      (b, h, q block): loops over kv blocks.
Tiles with no visible key skip their matmuls (`lax.cond`). T5 relative bias: each program gets its query
head's table row (zero-padded to a power of two), buckets every tile from its positions and reads the
row's entries as scalars (`tile_math.tile_relative_bias`); the dK/dV program also sums the table gradient
of its kv block into a [1, W] row, output [B, H, nk, 1, W] and summed outside. softmax1 starts the forward
state at m = 0, l = 1 (`tile_math.initial_state`); the backward is unchanged. Triton needs power-of-two tile shapes, so the
head dim is zero-padded to a power of two (zero columns change no dot product) and tiles are powers of two.
`interpret=True` runs the same kernels through the generic Pallas interpreter on CPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ops import flash_layout
from ops import pallas_common
from ops.attention import tile_math
from ops.attention.block_sizes import BlockSizes
from ops.pallas_common import MIN_TILE, any_mask, split_refs
from ops.tiling import pad_axis

F32 = jnp.float32


def _key_tile(kv_pos_ref, kv_seg_ref, bias_ref, start, bk):
  """Positions, segments [1, bk] and bias [1, bk] (or None) of the key tile starting at `start`."""
  keys = pl.ds(start, bk)
  bias = None if bias_ref is None else bias_ref[keys][None, :]
  return kv_pos_ref[keys][None, :], kv_seg_ref[keys][None, :], bias


def _relative_bias(q_pos, kv_pos, table_ref, rel):
  """(bucket, bias) [bq, bk] of a tile (q_pos [bq, 1], kv_pos [1, bk]) for this program's query head,
  or (None, None)."""
  if rel is None:
    return None, None
  return tile_math.tile_relative_bias(q_pos, kv_pos, lambda n: table_ref[n], rel)


def _fwd_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, *refs, scale, causal, signed, softmax1,
                has_bias, rel, block_kv, num_kv_blocks):
  bias_ref, table_ref, (q_ref, k_ref, v_ref, o_ref, lse_ref) = tile_math.sequence_refs(refs, has_bias, rel)
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
      _, rel_bias = _relative_bias(q_pos, kv_pos, table_ref, rel)
      s, a = tile_math.tile_scores(q, k_ref[keys, :], bias, rel_bias, mask, scale, signed)
      return tile_math.online_softmax_step(m, l, acc, s, a, mask, v_ref[keys, :], signed)

    return jax.lax.cond(any_mask(mask), update, lambda c: c, carry)

  m0, l0 = tile_math.initial_state(softmax1)
  init = (jnp.full((bq, 1), m0, jnp.float32), jnp.full((bq, 1), l0, jnp.float32),
          jnp.zeros((bq, d), jnp.float32))
  o, lse = tile_math.finalize(*jax.lax.fori_loop(0, num_kv_blocks, body, init))
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dkv_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, *refs, scale, causal, signed, has_bias, rel,
                block_q, num_q_blocks):
  bias_ref, table_ref, refs = tile_math.sequence_refs(refs, has_bias, rel)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *rest = refs
  db_ref, rest = split_refs(rest, has_bias)
  dt_ref, _ = split_refs(rest, rel is not None)
  k, v = k_ref[...], v_ref[...]
  kv_pos, kv_seg = kv_pos_ref[...][None, :], kv_seg_ref[...][None, :]
  bias = None if bias_ref is None else bias_ref[...][None, :]
  bk, d = k.shape

  def body(i, carry):
    rows = pl.ds(i * block_q, block_q)
    q_pos = q_pos_ref[rows][:, None]
    mask = tile_math.tile_mask(q_pos, q_seg_ref[rows][:, None], kv_pos, kv_seg, bias, causal)

    def update(carry):
      dk, dv, db, dt = carry
      q, do = q_ref[rows, :], do_ref[rows, :]
      bucket, rel_bias = _relative_bias(q_pos, kv_pos, table_ref, rel)
      s, a = tile_math.tile_scores(q, k, bias, rel_bias, mask, scale, signed)
      w, ds = tile_math.tile_grads(s, a, mask, lse_ref[rows][:, None], delta_ref[rows][:, None], do, v,
                                   signed)
      if dt is not None:
        dt = dt + tile_math.table_grad_row(bucket, ds, jnp.arange(dt.shape[1])[None, :], rel[2])
      return (dk + tile_math.matmul_tn((ds * scale).astype(q.dtype), q),
              dv + tile_math.matmul_tn(w.astype(do.dtype), do),
              db + jnp.sum(ds, axis=0, keepdims=True), dt)

    return jax.lax.cond(any_mask(mask), update, lambda c: c, carry)

  init = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32), jnp.zeros((1, bk), jnp.float32),
          None if dt_ref is None else jnp.zeros(dt_ref.shape, jnp.float32))
  dk, dv, db, dt = jax.lax.fori_loop(0, num_q_blocks, body, init)
  dk_ref[...] = dk
  dv_ref[...] = dv
  if db_ref is not None:
    db_ref[...] = db[0]
  if dt_ref is not None:
    dt_ref[...] = dt


def _dq_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, *refs, scale, causal, signed, has_bias, rel,
               block_kv, num_kv_blocks):
  bias_ref, table_ref, refs = tile_math.sequence_refs(refs, has_bias, rel)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
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
      _, rel_bias = _relative_bias(q_pos, kv_pos, table_ref, rel)
      s, a = tile_math.tile_scores(q, k, bias, rel_bias, mask, scale, signed)
      _, ds = tile_math.tile_grads(s, a, mask, lse, delta, do, v_ref[keys, :], signed)
      return dq + tile_math.matmul_nn((ds * scale).astype(k.dtype), k)

    return jax.lax.cond(any_mask(mask), update, lambda c: c, dq)

  dq_ref[...] = jax.lax.fori_loop(0, num_kv_blocks, body, jnp.zeros(q.shape, jnp.float32))


def _layout(q, k, bias, q_pos, kv_pos, q_seg, kv_seg, bq, bk):
  return flash_layout.GpuFlashLayout(q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk, bias=bias)


def _padded_table(table):
  """[H, num_buckets] -> [H, W], zero-padded to a power of two W >= MIN_TILE (Triton block shapes)."""
  return None if table is None else pad_axis(table, 1, max(MIN_TILE, pl.next_power_of_2(table.shape[1])))


def _seq_args(lay, table):
  return lay.seq_args() + ([] if table is None else [table])


def _specs(lay: flash_layout.GpuFlashLayout, q_block: int | None, kv_block: int | None, table):
  """BlockSpecs on a (b, h, i) grid: (sequence specs [q pos, q seg, kv pos, kv seg(, bias)(, table row
  [W] of the query head)], q-like [rows, Dp], kv [keys, Dp] of the query head's kv head, per-query-head
  key [keys, Dp], q-row [rows], per-query-head key row [keys]); the rows are q block i (q_block) or all
  Tp, the keys key tile i (kv_block) or all Sp. `table` is the padded [H, W] table or None."""
  sq, g, dp = pl.squeezed, lay.group, lay.dp
  rows, keys = q_block or lay.tp, kv_block or lay.sp
  q_index = (lambda b, h, i: i) if q_block else (lambda b, h, i: 0)
  k_index = (lambda b, h, i: i) if kv_block else (lambda b, h, i: 0)
  seq = ([pl.BlockSpec((sq, rows), lambda b, h, i: (b, q_index(b, h, i)))] * 2
         + [pl.BlockSpec((sq, keys), lambda b, h, i: (b, k_index(b, h, i)))] * 2)
  if lay.bias is not None:
    shared = lay.bias.shape[1] == 1  # one bias row for every kv head
    seq.append(pl.BlockSpec((sq, sq, keys),
                            lambda b, h, i: (b, 0 if shared else h // g, k_index(b, h, i))))
  if table is not None:
    seq.append(pl.BlockSpec((sq, table.shape[1]), lambda b, h, i: (h, 0)))
  q_spec = pl.BlockSpec((sq, sq, rows, dp), lambda b, h, i: (b, h, q_index(b, h, i), 0))
  kv_spec = pl.BlockSpec((sq, sq, keys, dp), lambda b, h, i: (b, h // g, k_index(b, h, i), 0))
  key_spec = pl.BlockSpec((sq, sq, keys, dp), lambda b, h, i: (b, h, k_index(b, h, i), 0))
  row_spec = pl.BlockSpec((sq, sq, rows), lambda b, h, i: (b, h, q_index(b, h, i)))
  key_row_spec = pl.BlockSpec((sq, sq, keys), lambda b, h, i: (b, h, k_index(b, h, i)))
  return seq, q_spec, kv_spec, key_spec, row_spec, key_row_spec


def _forward(q, k, v, bias, table, q_pos, kv_pos, q_seg, kv_seg, causal, signed, softmax1, rel, scale, bq,
             bk, interpret):
  """(o [B, T, H, D], lse [B, H, Tp] f32) from the forward kernel on grid (b, h, q block); each program
  sees one q block and the whole k, v of its kv head."""
  lay = _layout(q, k, bias, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
  kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, signed=signed, softmax1=softmax1,
                             has_bias=bias is not None, rel=tile_math.kernel_rel(table, rel), block_kv=bk,
                             num_kv_blocks=lay.nk)
  padded = _padded_table(table)
  seq, q_spec, kv_spec, _, row_spec, _ = _specs(lay, bq, None, padded)
  o, lse = pl.pallas_call(
      kernel,
      grid=(lay.b, lay.h, lay.nq),
      in_specs=seq + [q_spec, kv_spec, kv_spec],
      out_specs=[q_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct((lay.b, lay.h, lay.tp, lay.dp), q.dtype),
                 jax.ShapeDtypeStruct((lay.b, lay.h, lay.tp), F32)],
      compiler_params=pallas_common.triton_compiler_params(lay.dp),
      interpret=interpret,
  )(*_seq_args(lay, padded), lay.q_major(q), lay.kv_major(k), lay.kv_major(v))
  return lay.q_unpad(o), lse


def _flash_bwd(causal, signed, softmax1, rel, scale, bq, bk, interpret, res, do):
  del softmax1  # it only changed lse, which the residuals carry
  q, k, v, bias, table, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
  lay = _layout(q, k, bias, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
  operands = lay.backward_operands(q, k, v, do, o, lse)  # q, k, v, dO, lse, D
  has_bias, padded = bias is not None, _padded_table(table)
  common = dict(scale=scale, causal=causal, signed=signed, has_bias=has_bias, rel=tile_math.kernel_rel(table, rel))
  b, h, dp, tp, sp = lay.b, lay.h, lay.dp, lay.tp, lay.sp

  # dK/dV on grid (b, h, kv block), looping over the q blocks: per-query-head f32 dk, dv [B, H, Sp, Dp],
  # the key-bias gradient [B, H, Sp] and the table gradient [B, H, nk, 1, W].
  seq, q_spec, kv_spec, key_spec, row_spec, key_row_spec = _specs(lay, None, bk, padded)
  out_shape = [jax.ShapeDtypeStruct((b, h, sp, dp), F32)] * 2
  out_specs = [key_spec, key_spec]
  if has_bias:
    out_shape.append(jax.ShapeDtypeStruct((b, h, sp), F32))
    out_specs.append(key_row_spec)
  if padded is not None:
    width = padded.shape[1]
    out_shape.append(jax.ShapeDtypeStruct((b, h, lay.nk, 1, width), F32))
    out_specs.append(pl.BlockSpec((pl.squeezed,) * 3 + (1, width), lambda b, h, i: (b, h, i, 0, 0)))
  dkv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq, num_q_blocks=lay.nq, **common),
      grid=(b, h, lay.nk),
      in_specs=seq + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=pallas_common.triton_compiler_params(dp),
      interpret=interpret,
  )(*_seq_args(lay, padded), *operands)

  # dQ on grid (b, h, q block), looping over the key tiles: f32 dq [B, H, Tp, Dp].
  seq, q_spec, kv_spec, _, row_spec, _ = _specs(lay, bq, None, padded)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_kv=bk, num_kv_blocks=lay.nk, **common),
      grid=(b, h, lay.nq),
      in_specs=seq + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct((b, h, tp, dp), F32),
      compiler_params=pallas_common.triton_compiler_params(dp),
      interpret=interpret,
  )(*_seq_args(lay, padded), *operands)

  dq = lay.q_unpad(dq).astype(q.dtype)
  dk = lay.per_kv_head(dkv[0]).astype(k.dtype)
  dv = lay.per_kv_head(dkv[1]).astype(v.dtype)
  dbias = lay.key_bias_grad(dkv[2], bias) if has_bias else None
  dtable = flash_layout.table_grad(dkv[-1], table) if padded is not None else None
  return dq, dk, dv, dbias, dtable, None, None, None, None


# Static: causal, signed, softmax1, rel = (bidirectional, max_distance), scale, bq, bk, interpret.
_flash = tile_math.flash_vjp(_forward, _flash_bwd, num_static=8)


def tile_sizes(block_sizes: BlockSizes, q_len: int, kv_len: int) -> tuple[int, int]:
  """Triton tiles: the requested blocks clamped to the lengths, rounded up to powers of two >= 16."""
  def tile(requested: int, length: int) -> int:
    return max(MIN_TILE, pl.next_power_of_2(min(requested, length)))
  return tile(block_sizes.block_q, q_len), tile(block_sizes.block_kv, kv_len)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
              kv_positions: jax.Array, segment_ids: jax.Array | None,
              kv_segment_ids: jax.Array | None, key_bias: jax.Array | None,
              relative_bias: jax.Array | None, relative_bidirectional: bool,
              relative_max_distance: int, causal: bool, signed: bool, softmax1: bool, scale: float,
              block_sizes: BlockSizes, interpret: bool) -> jax.Array:
  """Pallas GPU flash attention. Call it through `ops.attention.attention(..., impl="pallas")`.

  Arguments as `ops.attention.pallas_tpu.attention`; `interpret=True` uses the generic Pallas interpreter.
  """
  bq, bk = tile_sizes(block_sizes, q.shape[1], k.shape[1])
  return _flash(q, k, v, key_bias, relative_bias, q_positions, kv_positions, segment_ids, kv_segment_ids,
                causal, signed, softmax1, (relative_bidirectional, relative_max_distance), scale, bq, bk,
                interpret)
