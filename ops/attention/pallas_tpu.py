"""Flash attention for TPU in Pallas (Mosaic TPU): softmax and Cog weights, causal or not, segment ids,
GQA, per-key additive bias, T5 relative bias, softmax1, explicit positions. Forward and backward kernels
under one `jax.custom_vjp`.

Same maths as `ops.attention.xla` (its docstring has the equations; `ops.attention.tile_math` holds the
per-tile pieces both Pallas backends share). Layout inside the kernels is [B, H, L, D] so a tile is a 2-D
[block, D] slab; `ops.flash_layout.TpuFlashLayout` (shared with the landmark kernels) pads and transposes
the operands, and this file's wrapper builds the BlockSpecs and runs the three `pallas_call`s.

Grids (b, h, outer, inner) with the reduction axis innermost ("arbitrary") and the rest "parallel":
  forward  (b, h, q block, kv block): running m, l [bq, 1] and acc [bq, D] in VMEM scratch; writes o and
           lse = m + log(l) once per q block. No T x S buffer exists at any length.
  dK/dV    (b, h, kv block, q block): recomputes the tile from q, k, lse; accumulates dk, dv [bk, D] and the
           key-bias gradient [1, bk] per query head; kv heads of a GQA group are summed afterwards.
  dQ       (b, h, q block, kv block): accumulates dq [bq, D].
T5 relative bias: the [H, num_buckets] table sits whole in SMEM; each tile buckets its own positions and
reads table[h, n] as scalars (`tile_math.tile_relative_bias`). The dK/dV kernel also accumulates the
table gradient of its (b, h, kv block) in a [1, W] lane row (W = num_buckets rounded up to 128), written
as [B, H, nk, 1, W] and summed over b and the kv blocks outside. softmax1 starts the forward state at
m = 0, l = 1 (`tile_math.initial_state`); the backward is unchanged.
Tiles with no visible key (above the causal diagonal, other segments, padding) skip their matmuls with
`pl.when`; they are still fetched.

Padding: T and S are padded to whole blocks; padded query rows get segment -1 and padded keys segment -2,
which match nothing, so padding is invisible and padded rows produce zeros (sliced off).

Interpret mode (`interpret=True`) runs the kernels on CPU with `pltpu.InterpretParams()`. On a real TPU,
block sizes must respect the (8, 128) tiling: `BlockSizes.get_default` picks multiples of 128 there.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops import flash_layout
from ops import pallas_common
from ops.attention import tile_math
from ops.attention.block_sizes import BlockSizes
from ops.pallas_common import any_mask, split_refs
from ops.tiling import round_up

F32 = jnp.float32


def _relative_bias(q_pos_ref, kv_pos_ref, table_ref, rel):
  """(bucket, bias) [bq, bk] of this program's tile for query head program_id(1), or (None, None)."""
  if rel is None:
    return None, None
  head = pl.program_id(1)
  return tile_math.tile_relative_bias(q_pos_ref[...], kv_pos_ref[...], lambda n: table_ref[head, n], rel)


def _fwd_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, *refs, scale, causal, signed, softmax1,
                has_bias, rel, num_kv_blocks):
  bias_ref, table_ref, refs = tile_math.sequence_refs(refs, has_bias, rel)
  q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  kv_index = pl.program_id(3)

  @pl.when(kv_index == 0)
  def _init():
    m0, l0 = tile_math.initial_state(softmax1)
    m_sc[...] = jnp.full(m_sc.shape, m0, jnp.float32)
    l_sc[...] = jnp.full(l_sc.shape, l0, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  bias = None if bias_ref is None else bias_ref[...]
  mask = tile_math.tile_mask(q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...], bias,
                             causal)

  @pl.when(any_mask(mask))
  def _update():
    _, rel_bias = _relative_bias(q_pos_ref, kv_pos_ref, table_ref, rel)
    s, a = tile_math.tile_scores(q_ref[...], k_ref[...], bias, rel_bias, mask, scale, signed)
    m, l, acc = tile_math.online_softmax_step(m_sc[...], l_sc[...], acc_sc[...], s, a, mask, v_ref[...],
                                              signed)
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(kv_index == num_kv_blocks - 1)
  def _write():
    o, lse = tile_math.finalize(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dkv_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, *refs, scale, causal, signed, has_bias, rel,
                num_q_blocks):
  bias_ref, table_ref, refs = tile_math.sequence_refs(refs, has_bias, rel)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *rest = refs
  db_ref, rest = split_refs(rest, has_bias)
  dt_ref, (dk_sc, dv_sc, db_sc, *dt_sc) = split_refs(rest, rel is not None)
  q_index = pl.program_id(3)

  @pl.when(q_index == 0)
  def _init():
    for scratch in (dk_sc, dv_sc, db_sc, *dt_sc):
      scratch[...] = jnp.zeros(scratch.shape, jnp.float32)

  bias = None if bias_ref is None else bias_ref[...]
  mask = tile_math.tile_mask(q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...], bias,
                             causal)

  @pl.when(any_mask(mask))
  def _update():
    q, do = q_ref[...], do_ref[...]
    bucket, rel_bias = _relative_bias(q_pos_ref, kv_pos_ref, table_ref, rel)
    s, a = tile_math.tile_scores(q, k_ref[...], bias, rel_bias, mask, scale, signed)
    w, ds = tile_math.tile_grads(s, a, mask, lse_ref[...], delta_ref[...], do, v_ref[...], signed)
    dv_sc[...] += tile_math.matmul_tn(w.astype(do.dtype), do)
    db_sc[...] += jnp.sum(ds, axis=0, keepdims=True)
    if dt_sc:
      lanes = jax.lax.broadcasted_iota(jnp.int32, dt_sc[0].shape, 1)
      dt_sc[0][...] += tile_math.table_grad_row(bucket, ds, lanes, rel[2])
    dk_sc[...] += tile_math.matmul_tn((ds * scale).astype(q.dtype), q)

  @pl.when(q_index == num_q_blocks - 1)
  def _write():
    dk_ref[...] = dk_sc[...]
    dv_ref[...] = dv_sc[...]
    if db_ref is not None:
      db_ref[...] = db_sc[...]
    if dt_ref is not None:
      dt_ref[...] = dt_sc[0][...]


def _dq_kernel(q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, *refs, scale, causal, signed, has_bias, rel,
               num_kv_blocks):
  bias_ref, table_ref, refs = tile_math.sequence_refs(refs, has_bias, rel)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc = refs
  kv_index = pl.program_id(3)

  @pl.when(kv_index == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  bias = None if bias_ref is None else bias_ref[...]
  mask = tile_math.tile_mask(q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...], bias,
                             causal)

  @pl.when(any_mask(mask))
  def _update():
    k = k_ref[...]
    _, rel_bias = _relative_bias(q_pos_ref, kv_pos_ref, table_ref, rel)
    s, a = tile_math.tile_scores(q_ref[...], k, bias, rel_bias, mask, scale, signed)
    _, ds = tile_math.tile_grads(s, a, mask, lse_ref[...], delta_ref[...], do_ref[...], v_ref[...], signed)
    dq_sc[...] += tile_math.matmul_nn((ds * scale).astype(k.dtype), k)

  @pl.when(kv_index == num_kv_blocks - 1)
  def _write():
    dq_ref[...] = dq_sc[...]


def _specs(lay: flash_layout.TpuFlashLayout, q_axis: int, has_table: bool):
  """BlockSpecs on a grid (b, h, x, y) whose query-block index is axis q_axis (2 or 3), the key-block
  index the other one: (sequence specs [q pos, q seg, kv pos, kv seg(, bias)(, table)], q [bq, D], kv
  [bk, D] of the query head's kv head, row [bq, 1], per-query-head key [bk, D], per-query-head key row
  [1, bk]); the relative-bias table is the whole [H, num_buckets] array in SMEM."""
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
  if lay.bias is not None:
    shared = lay.bias.shape[1] == 1  # one bias row for every kv head
    seq.append(pl.BlockSpec((sq, sq, 1, bk), lambda *i: (i[0], 0 if shared else i[1] // g, 0, kj(i))))
  if has_table:
    seq.append(pl.BlockSpec(memory_space=pltpu.SMEM))
  q_spec = pl.BlockSpec((sq, sq, bq, d), lambda *i: (i[0], i[1], qi(i), 0))
  kv_spec = pl.BlockSpec((sq, sq, bk, d), lambda *i: (i[0], i[1] // g, kj(i), 0))
  row_spec = pl.BlockSpec((sq, sq, bq, 1), lambda *i: (i[0], i[1], qi(i), 0))
  key_spec = pl.BlockSpec((sq, sq, bk, d), lambda *i: (i[0], i[1], kj(i), 0))
  key_row_spec = pl.BlockSpec((sq, sq, 1, bk), lambda *i: (i[0], i[1], 0, kj(i)))
  return seq, q_spec, kv_spec, row_spec, key_spec, key_row_spec


def _layout(q, k, bias, q_pos, kv_pos, q_seg, kv_seg, bq, bk):
  return flash_layout.TpuFlashLayout(q, k, q_pos, kv_pos, q_seg, kv_seg, bq, bk, bias=bias)


def _seq_args(lay, table):
  return lay.seq_args() + ([] if table is None else [table])


def _forward(q, k, v, bias, table, q_pos, kv_pos, q_seg, kv_seg, causal, signed, softmax1, rel, scale, bq,
             bk, interpret):
  """(o [B, T, H, D], lse [B, H, Tp, 1] f32) from the forward kernel on grid (b, h, q block, kv block)."""
  lay = _layout(q, k, bias, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
  kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, signed=signed, softmax1=softmax1,
                             has_bias=bias is not None, rel=tile_math.kernel_rel(table, rel),
                             num_kv_blocks=lay.nk)
  seq, q_spec, kv_spec, row_spec, _, _ = _specs(lay, 2, table is not None)
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
  )(*_seq_args(lay, table), lay.q_major(q), lay.kv_major(k), lay.kv_major(v))
  return lay.q_unpad(o), lse


def _flash_bwd(causal, signed, softmax1, rel, scale, bq, bk, interpret, res, do):
  del softmax1  # it only changed lse, which the residuals carry
  q, k, v, bias, table, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
  lay = _layout(q, k, bias, q_pos, kv_pos, q_seg, kv_seg, bq, bk)
  # D_i = <dO_i, o_i> is the softmax-Jacobian row term (the same for signed weights).
  operands = lay.backward_operands(q, k, v, do, o, lse)  # q, k, v, dO, lse, D
  has_bias, has_table = bias is not None, table is not None
  common = dict(scale=scale, causal=causal, signed=signed, has_bias=has_bias, rel=tile_math.kernel_rel(table, rel))
  b, h, d, tp, sp = lay.b, lay.h, lay.d, lay.tp, lay.sp

  # dK/dV on grid (b, h, kv block, q block): per-query-head f32 dk, dv [B, H, Sp, D], the key-bias
  # gradient [B, H, 1, Sp] and the table gradient [B, H, nk, 1, W]; scratch dk, dv [bk, D], db [1, bk]
  # and dtable [1, W], W = num_buckets rounded up to whole lane tiles.
  seq, q_spec, kv_spec, row_spec, key_spec, key_row_spec = _specs(lay, 3, has_table)
  out_shape = [jax.ShapeDtypeStruct((b, h, sp, d), F32)] * 2
  out_specs = [key_spec, key_spec]
  scratch = [pltpu.VMEM((bk, d), F32), pltpu.VMEM((bk, d), F32), pltpu.VMEM((1, bk), F32)]
  if has_bias:
    out_shape.append(jax.ShapeDtypeStruct((b, h, 1, sp), F32))
    out_specs.append(key_row_spec)
  if has_table:
    width = round_up(table.shape[1], 128)
    out_shape.append(jax.ShapeDtypeStruct((b, h, lay.nk, 1, width), F32))
    out_specs.append(pl.BlockSpec((pl.squeezed,) * 3 + (1, width), lambda *i: (i[0], i[1], i[2], 0, 0)))
    scratch.append(pltpu.VMEM((1, width), F32))
  dkv = pl.pallas_call(
      functools.partial(_dkv_kernel, num_q_blocks=lay.nq, **common),
      grid=(b, h, lay.nk, lay.nq),
      in_specs=seq + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=scratch,
      compiler_params=pallas_common.tpu_compiler_params(4),
      interpret=pallas_common.tpu_interpret_params(interpret),
  )(*_seq_args(lay, table), *operands)

  # dQ on grid (b, h, q block, kv block): f32 dq [B, H, Tp, D]; scratch dq [bq, D].
  seq, q_spec, kv_spec, row_spec, _, _ = _specs(lay, 2, has_table)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, num_kv_blocks=lay.nk, **common),
      grid=(b, h, lay.nq, lay.nk),
      in_specs=seq + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct((b, h, tp, d), F32),
      scratch_shapes=[pltpu.VMEM((bq, d), F32)],
      compiler_params=pallas_common.tpu_compiler_params(4),
      interpret=pallas_common.tpu_interpret_params(interpret),
  )(*_seq_args(lay, table), *operands)

  dq = lay.q_unpad(dq).astype(q.dtype)
  dk = lay.per_kv_head(dkv[0]).astype(k.dtype)
  dv = lay.per_kv_head(dkv[1]).astype(v.dtype)
  dbias = lay.key_bias_grad(dkv[2], bias) if has_bias else None
  dtable = flash_layout.table_grad(dkv[-1], table) if has_table else None
  return dq, dk, dv, dbias, dtable, None, None, None, None


# Static: causal, signed, softmax1, rel = (bidirectional, max_distance), scale, bq, bk, interpret.
_flash = tile_math.flash_vjp(_forward, _flash_bwd, num_static=8)


def tile_sizes(block_sizes: BlockSizes, q_len: int, kv_len: int) -> tuple[int, int]:
  """Kernel tiles: the requested blocks, clamped to the (8-rounded) lengths so short inputs use one."""
  return (min(block_sizes.block_q, round_up(q_len, 8)), min(block_sizes.block_kv, round_up(kv_len, 8)))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
              kv_positions: jax.Array, segment_ids: jax.Array | None,
              kv_segment_ids: jax.Array | None, key_bias: jax.Array | None,
              relative_bias: jax.Array | None, relative_bidirectional: bool,
              relative_max_distance: int, causal: bool, signed: bool, softmax1: bool, scale: float,
              block_sizes: BlockSizes, interpret: bool) -> jax.Array:
  """Pallas TPU flash attention. Call it through `ops.attention.attention(..., impl="pallas")`.

  Args:
    q: [B, T, H, D]; k, v: [B, S, Hkv, D] with H % Hkv == 0.
    q_positions: [B, T] int32; kv_positions: [B, S] int32.
    segment_ids: [B, T] int32 or None; kv_segment_ids: [B, S] int32 (given iff segment_ids is).
    key_bias: [B, Hb, S] float32 or None, Hb in {1, Hkv}.
    relative_bias: [H, num_buckets] float32 T5 table or None.
    relative_bidirectional, relative_max_distance, causal, signed, softmax1, scale: as
      `ops.attention.attention`.
    block_sizes: tiles (block_q rows x block_kv keys).
    interpret: run on CPU through `pltpu.InterpretParams()`.

  Returns:
    o: [B, T, H, D] in q.dtype.
  """
  bq, bk = tile_sizes(block_sizes, q.shape[1], k.shape[1])
  return _flash(q, k, v, key_bias, relative_bias, q_positions, kv_positions, segment_ids, kv_segment_ids,
                causal, signed, softmax1, (relative_bidirectional, relative_max_distance), scale, bq, bk,
                interpret)
