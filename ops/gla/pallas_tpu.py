"""Chunkwise GLA for TPU in Pallas (Mosaic TPU): forward and backward kernels under one `jax.custom_vjp`.

Same maths as `ops.gla.xla` (spec §1.1 chunkwise form with secondary chunking); the per-chunk maths is
`ops.gla.tile_math`, shared with the GPU kernel. Layout inside the kernels is [B, H, T, D], one chunk a
2-D [C, D] block; the state is carried transposed ([V, K], see tile_math).

Grids (b, h, chunk): b and h "parallel", the chunk axis "arbitrary" (sequential):
  forward   the [V, K] f32 state lives in VMEM scratch across chunk steps; each step writes o for its
            chunk and, when differentiating, the state entering the chunk (f32, [B, H, n, V, K]: the
            backward reads it instead of recomputing it; K * V * 4 / C bytes per token and head, 1 KiB
            at K = V = 128, C = 64, where fla stores bf16). The final state is written at the last step.
  backward  walks the chunks in reverse (index maps n - 1 - i) with dS in VMEM scratch, starting from
            the final-state cotangent; writes dq, dk, dv, the per-position terms of the closed-form gate
            gradient and its per-chunk boundary term (f32, `ops.gla.tile_math`), and dS_0 (the
            initial-state gradient) at the last step.
Outside the kernels (XLA): the within-chunk f32 gate cumsum (fla's `chunk_local_cumsum`), padding, and
the within-chunk cumsums of the gate-gradient terms (`tile_math.gate_gradient`).

Padding: T is padded to whole chunks with q = k = v = 0 and log_gate = 0 (state unchanged); padded rows
are sliced off. On a real TPU the chunk and sub-chunk must be multiples of 8 (16 for bf16 inputs, the
sublane packing); `BlockSizes.get_default(..., kernel=True)` gives 64 / 16. Head dims are whole blocks
(any size is legal; multiples of 128 use the lanes fully).

Interpret mode (`interpret=True`) runs the kernels on CPU with `pltpu.InterpretParams()`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops import pallas_common
from ops.gla import tile_math
from ops.gla.block_sizes import BlockSizes

F32 = jnp.float32


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, h0_ref, o_ref, final_ref, *rest, scale, chunk, sub_chunk,
                num_chunks, mm_dtype):
  *states_ref, state_sc = rest
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _init():
    state_sc[...] = h0_ref[...]

  state = state_sc[...]
  if states_ref:
    states_ref[0][...] = state
  state = tile_math.chunk_forward(q_ref, k_ref, v_ref, g_ref, o_ref, 0, state, scale=scale,
                                  chunk=chunk, sub_chunk=sub_chunk, mm_dtype=mm_dtype)
  state_sc[...] = state

  @pl.when(i == num_chunks - 1)
  def _write():
    final_ref[...] = state


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, dht_ref, dq_ref, dk_ref, dv_ref,
                dg_ref, dg_state_ref, boundary_ref, dh0_ref, d_state_sc, *, scale, chunk, sub_chunk,
                num_chunks, mm_dtype):
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _init():
    d_state_sc[...] = dht_ref[...]

  d_state, boundary_ref[...] = tile_math.chunk_backward(
      q_ref, k_ref, v_ref, g_ref, do_ref, dq_ref, dk_ref, dv_ref, dg_ref, dg_state_ref, 0,
      states_ref[...], d_state_sc[...], scale=scale, chunk=chunk, sub_chunk=sub_chunk,
      mm_dtype=mm_dtype)
  d_state_sc[...] = d_state

  @pl.when(i == num_chunks - 1)
  def _write():
    dh0_ref[...] = d_state


def _specs(chunk: int, dk: int, dv: int, num_chunks: int, reverse: bool):
  """BlockSpecs: per-chunk [C, D] tiles, the whole [V, K] state, and per-chunk [V, K] states."""
  sq = pl.squeezed
  chunk_index = (lambda i: num_chunks - 1 - i) if reverse else (lambda i: i)

  def seq(d):
    return pl.BlockSpec((sq, sq, chunk, d), lambda b, h, i: (b, h, chunk_index(i), 0))

  def per_chunk(rows):
    return pl.BlockSpec((sq, sq, sq, rows, dk), lambda b, h, i: (b, h, chunk_index(i), 0, 0))

  state = pl.BlockSpec((sq, sq, dv, dk), lambda b, h, i: (b, h, 0, 0))
  return seq, state, per_chunk


def _chunked_gate(log_gate, chunk: int):
  """(n, Tp, G): the number of chunks, the padded length n * C and the within-chunk f32 cumsum G of the
  log gate in kernel layout [B, H, Tp, K]."""
  t = log_gate.shape[1]
  n = pl.cdiv(t, chunk)
  tp = n * chunk
  return n, tp, tile_math.chunk_cumsum(tile_math.to_kernel_layout(log_gate.astype(F32), tp), chunk, t)


def _forward(q, k, v, log_gate, h0, scale, chunk, sub_chunk, interpret, with_states):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  n, tp, g = _chunked_gate(log_gate, chunk)
  mm_dtype = jnp.result_type(q, k, v)
  seq, state_spec, per_chunk = _specs(chunk, dk, dv, n, reverse=False)
  out_shape = [jax.ShapeDtypeStruct((b, h, tp, dv), q.dtype), jax.ShapeDtypeStruct((b, h, dv, dk), F32)]
  out_specs = [seq(dv), state_spec]
  if with_states:
    out_shape.append(jax.ShapeDtypeStruct((b, h, n, dv, dk), F32))
    out_specs.append(per_chunk(dv))
  kernel = functools.partial(_fwd_kernel, scale=scale, chunk=chunk, sub_chunk=sub_chunk, num_chunks=n,
                             mm_dtype=mm_dtype)
  outs = pl.pallas_call(
      kernel,
      grid=(b, h, n),
      in_specs=[seq(dk), seq(dk), seq(dv), seq(dk), state_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((dv, dk), F32)],
      compiler_params=pallas_common.tpu_compiler_params(3),
      interpret=pallas_common.tpu_interpret_params(interpret),
  )(tile_math.to_kernel_layout(q, tp), tile_math.to_kernel_layout(k, tp),
    tile_math.to_kernel_layout(v, tp), g, jnp.swapaxes(h0, 2, 3))
  o = jnp.swapaxes(outs[0], 1, 2)[:, :t]
  final_state = jnp.swapaxes(outs[1], 2, 3)  # [B, H, K, V]
  return o, final_state, (outs[2] if with_states else None)


def _gla_bwd(scale, chunk, sub_chunk, interpret, residuals, cotangents):
  q, k, v, log_gate, states = residuals
  do, d_final = cotangents
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  n, tp, g = _chunked_gate(log_gate, chunk)
  mm_dtype = jnp.result_type(q, k, v)
  seq, state_spec, per_chunk = _specs(chunk, dk, dv, n, reverse=True)
  kernel = functools.partial(_bwd_kernel, scale=scale, chunk=chunk, sub_chunk=sub_chunk, num_chunks=n,
                             mm_dtype=mm_dtype)
  key_shape = jax.ShapeDtypeStruct((b, h, tp, dk), F32)
  dq, dk_, dv_, dg, dg_state, boundary, dh0 = pl.pallas_call(
      kernel,
      grid=(b, h, n),
      in_specs=[seq(dk), seq(dk), seq(dv), seq(dk), seq(dv), per_chunk(dv), state_spec],
      out_specs=[seq(dk), seq(dk), seq(dv), seq(dk), seq(dk), per_chunk(1), state_spec],
      out_shape=[key_shape, key_shape, jax.ShapeDtypeStruct((b, h, tp, dv), F32), key_shape, key_shape,
                 jax.ShapeDtypeStruct((b, h, n, 1, dk), F32), jax.ShapeDtypeStruct((b, h, dv, dk), F32)],
      scratch_shapes=[pltpu.VMEM((dv, dk), F32)],
      compiler_params=pallas_common.tpu_compiler_params(3),
      interpret=pallas_common.tpu_interpret_params(interpret),
  )(tile_math.to_kernel_layout(q, tp), tile_math.to_kernel_layout(k, tp),
    tile_math.to_kernel_layout(v, tp), g, tile_math.to_kernel_layout(do.astype(q.dtype), tp), states,
    jnp.swapaxes(d_final.astype(F32), 2, 3))
  d_gate = tile_math.gate_gradient(dg, dg_state, boundary[:, :, :, 0], chunk, t)
  back = lambda x, like: jnp.swapaxes(x, 1, 2)[:, :t].astype(like.dtype)
  return (back(dq, q), back(dk_, k), back(dv_, v), back(d_gate, log_gate),
          jnp.swapaxes(dh0, 2, 3))


_gla = tile_math.custom_vjp_op(_forward, _gla_bwd)


def tile_sizes(block_sizes: BlockSizes) -> tuple[int, int]:
  """(chunk, sub_chunk) of the kernel: the caller's block sizes unchanged."""
  return block_sizes.chunk_size, block_sizes.sub_chunk


def gla(q: jax.Array, k: jax.Array, v: jax.Array, log_gate: jax.Array, initial_state: jax.Array, *,
        scale: float, block_sizes: BlockSizes, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """Pallas TPU chunkwise GLA. Call it through `ops.gla.gla(..., impl="pallas")`.

  Args:
    q, k: [B, T, H, K]; v: [B, T, H, V]; log_gate: [B, T, H, K] float, finite and <= 0.
    initial_state: [B, H, K, V] float32 S_0.
    scale: Python float applied to q.
    block_sizes: chunk C and sub-chunk c (c divides C).
    interpret: run on CPU through `pltpu.InterpretParams()`.

  Returns:
    o [B, T, H, V] in q.dtype and the final state [B, H, K, V] float32.

  Raises:
    ValueError: when compiling for a real TPU with chunk or sub-chunk not a multiple of 8.
  """
  chunk, sub_chunk = tile_sizes(block_sizes)
  if not interpret and (chunk % 8 or sub_chunk % 8):
    raise ValueError(f"The Pallas TPU GLA kernel needs chunk_size and sub_chunk multiples of 8 "
                     f"(sublane tiling), got {chunk} and {sub_chunk}.")
  return _gla(q, k, v, log_gate, initial_state.astype(F32), scale, chunk, sub_chunk, bool(interpret))
