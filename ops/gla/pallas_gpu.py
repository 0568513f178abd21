"""Chunkwise GLA for GPU in Pallas: forward and backward kernels under one `jax.custom_vjp`.

Backend: Pallas' Triton lowering (`pl.pallas_call` + `jax.experimental.pallas.triton`). The per-chunk
maths is shared with the TPU kernel (`ops.gla.tile_math`; equations there and in `ops.gla.xla`, spec
§1.1).

Grids, one program per (b, h); the chunks are a sequential `lax.fori_loop` inside the program (GPU
style), the [V, K] f32 state a loop carry:
  forward   writes o per chunk and, when differentiating, the f32 state entering each chunk
            ([B, H, n * V, K]); the final state after the loop.
  backward  walks the chunks in reverse carrying dS (from the final-state cotangent); writes dq, dk, dv,
            the per-position terms of the closed-form gate gradient and its per-chunk boundary term
            (f32, `ops.gla.tile_math`) and the initial-state gradient.
The gate cumsum (f32, per chunk) and the within-chunk cumsums of the gate-gradient terms run in XLA
around the kernels (`tile_math.chunk_cumsum`, `tile_math.gate_gradient`).

Triton needs power-of-two tiles of at least 16 for its dots: head dims are zero-padded to a power of two
(zero key/query channels with log_gate 0 change nothing; zero value columns are sliced off), and the
chunk and sub-chunk are rounded up to powers of two >= 16 (`tile_sizes`; results do not depend on them
beyond rounding). The value dim is not tiled over the grid (fla's BV): each program holds the whole
[V, K] state.

`interpret=True` runs the same kernels through the generic Pallas interpreter on CPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ops import pallas_common
from ops.gla import tile_math
from ops.gla.block_sizes import BlockSizes
from ops.pallas_common import MIN_TILE

F32 = jnp.float32


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, h0_ref, o_ref, final_ref, *states_ref, scale, chunk,
                sub_chunk, num_chunks, mm_dtype):
  vp = h0_ref.shape[0]

  def body(ci, state):
    if states_ref:
      states_ref[0][pl.ds(ci * vp, vp), :] = state
    return tile_math.chunk_forward(q_ref, k_ref, v_ref, g_ref, o_ref, ci * chunk, state, scale=scale,
                                   chunk=chunk, sub_chunk=sub_chunk, mm_dtype=mm_dtype)

  final_ref[...] = jax.lax.fori_loop(0, num_chunks, body, h0_ref[...])


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, dht_ref, dq_ref, dk_ref, dv_ref, dg_ref,
                dg_state_ref, boundary_ref, dh0_ref, *, scale, chunk, sub_chunk, num_chunks, mm_dtype):
  vp = dht_ref.shape[0]

  def body(step, d_state):
    ci = num_chunks - 1 - step
    d_state, boundary_ref[pl.ds(ci, 1), :] = tile_math.chunk_backward(
        q_ref, k_ref, v_ref, g_ref, do_ref, dq_ref, dk_ref, dv_ref, dg_ref, dg_state_ref, ci * chunk,
        states_ref[pl.ds(ci * vp, vp), :], d_state, scale=scale, chunk=chunk, sub_chunk=sub_chunk,
        mm_dtype=mm_dtype)
    return d_state

  dh0_ref[...] = jax.lax.fori_loop(0, num_chunks, body, dht_ref[...])


def _spec(rows: int, cols: int):
  return pl.BlockSpec((pl.squeezed, pl.squeezed, rows, cols), lambda b, h: (b, h, 0, 0))


class _Layout:
  """Padded sizes and the [B, H, Tp, Dp] kernel operands."""

  def __init__(self, q, v, chunk):
    self.b, self.t, self.h, self.dk = q.shape
    self.dv = v.shape[-1]
    self.kp, self.vp = (max(MIN_TILE, pl.next_power_of_2(x)) for x in (self.dk, self.dv))
    self.n = pl.cdiv(self.t, chunk)
    self.tp = self.n * chunk

  def keys(self, x):
    return tile_math.to_kernel_layout(x, self.tp, self.kp)

  def values(self, x):
    return tile_math.to_kernel_layout(x, self.tp, self.vp)

  def state(self, x):
    """[B, H, K, V] -> padded transposed [B, H, Vp, Kp] f32."""
    x = jnp.pad(x.astype(F32), ((0, 0), (0, 0), (0, self.kp - self.dk), (0, self.vp - self.dv)))
    return jnp.swapaxes(x, 2, 3)

  def unstate(self, x):
    return jnp.swapaxes(x, 2, 3)[:, :, :self.dk, :self.dv]

  def unseq(self, x, dim, dtype):
    return jnp.swapaxes(x, 1, 2)[:, :self.t, :, :dim].astype(dtype)


def _forward(q, k, v, log_gate, h0, scale, chunk, sub_chunk, interpret, with_states):
  lay = _Layout(q, v, chunk)
  g = tile_math.chunk_cumsum(lay.keys(log_gate.astype(F32)), chunk, lay.t)
  out_shape = [jax.ShapeDtypeStruct((lay.b, lay.h, lay.tp, lay.vp), q.dtype),
               jax.ShapeDtypeStruct((lay.b, lay.h, lay.vp, lay.kp), F32)]
  out_specs = [_spec(lay.tp, lay.vp), _spec(lay.vp, lay.kp)]
  if with_states:
    out_shape.append(jax.ShapeDtypeStruct((lay.b, lay.h, lay.n * lay.vp, lay.kp), F32))
    out_specs.append(_spec(lay.n * lay.vp, lay.kp))
  kernel = functools.partial(_fwd_kernel, scale=scale, chunk=chunk, sub_chunk=sub_chunk,
                             num_chunks=lay.n, mm_dtype=jnp.result_type(q, k, v))
  outs = pl.pallas_call(
      kernel,
      grid=(lay.b, lay.h),
      in_specs=[_spec(lay.tp, lay.kp), _spec(lay.tp, lay.kp), _spec(lay.tp, lay.vp),
                _spec(lay.tp, lay.kp), _spec(lay.vp, lay.kp)],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=pallas_common.triton_compiler_params(max(lay.kp, lay.vp)),
      interpret=interpret,
  )(lay.keys(q), lay.keys(k), lay.values(v), g, lay.state(h0))
  return (lay.unseq(outs[0], lay.dv, q.dtype), lay.unstate(outs[1]),
          outs[2] if with_states else None)


def _gla_bwd(scale, chunk, sub_chunk, interpret, residuals, cotangents):
  q, k, v, log_gate, states = residuals
  do, d_final = cotangents
  lay = _Layout(q, v, chunk)
  g = tile_math.chunk_cumsum(lay.keys(log_gate.astype(F32)), chunk, lay.t)
  kernel = functools.partial(_bwd_kernel, scale=scale, chunk=chunk, sub_chunk=sub_chunk,
                             num_chunks=lay.n, mm_dtype=jnp.result_type(q, k, v))
  key_spec, value_spec, state_spec = _spec(lay.tp, lay.kp), _spec(lay.tp, lay.vp), _spec(lay.vp, lay.kp)
  key_shape = jax.ShapeDtypeStruct((lay.b, lay.h, lay.tp, lay.kp), F32)
  dq, dk, dv, dg, dg_state, boundary, dh0 = pl.pallas_call(
      kernel,
      grid=(lay.b, lay.h),
      in_specs=[key_spec, key_spec, value_spec, key_spec, value_spec, _spec(lay.n * lay.vp, lay.kp),
                state_spec],
      out_specs=[key_spec, key_spec, value_spec, key_spec, key_spec, _spec(lay.n, lay.kp), state_spec],
      out_shape=[key_shape, key_shape, jax.ShapeDtypeStruct((lay.b, lay.h, lay.tp, lay.vp), F32),
                 key_shape, key_shape, jax.ShapeDtypeStruct((lay.b, lay.h, lay.n, lay.kp), F32),
                 jax.ShapeDtypeStruct((lay.b, lay.h, lay.vp, lay.kp), F32)],
      compiler_params=pallas_common.triton_compiler_params(max(lay.kp, lay.vp)),
      interpret=interpret,
  )(lay.keys(q), lay.keys(k), lay.values(v), g, lay.values(do.astype(q.dtype)), states,
    lay.state(d_final))
  d_gate = tile_math.gate_gradient(dg, dg_state, boundary, chunk, lay.t)[..., :lay.dk]
  return (lay.unseq(dq, lay.dk, q.dtype), lay.unseq(dk, lay.dk, k.dtype),
          lay.unseq(dv, lay.dv, v.dtype), jnp.swapaxes(d_gate, 1, 2).astype(log_gate.dtype),
          lay.unstate(dh0))


_gla = tile_math.custom_vjp_op(_forward, _gla_bwd)


def tile_sizes(block_sizes: BlockSizes) -> tuple[int, int]:
  """(chunk, sub_chunk) of the kernel: powers of two >= 16, at least the requested sizes."""
  sub_chunk = max(MIN_TILE, pl.next_power_of_2(block_sizes.sub_chunk))
  return max(pl.next_power_of_2(block_sizes.chunk_size), sub_chunk), sub_chunk


def gla(q: jax.Array, k: jax.Array, v: jax.Array, log_gate: jax.Array, initial_state: jax.Array, *,
        scale: float, block_sizes: BlockSizes, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """Pallas GPU chunkwise GLA. Call it through `ops.gla.gla(..., impl="pallas")`.

  Arguments and results as `ops.gla.pallas_tpu.gla`; `interpret=True` uses the generic Pallas
  interpreter. Chunk and sub-chunk are rounded up by `tile_sizes`.
  """
  chunk, sub_chunk = tile_sizes(block_sizes)
  return _gla(q, k, v, log_gate, initial_state.astype(F32), scale, chunk, sub_chunk, bool(interpret))
