"""Per-tile maths shared by the Pallas attention kernels (TPU and GPU): masks, logits, weights, dS.

Everything here acts on one [bq, bk] tile of one (batch, query head) and is plain jnp, so the kernel bodies
stay short and the two backends cannot drift apart. Equations: `ops.attention.xla` module docstring.
`finalize` (o and lse from the running state), `matmul_tn` and `matmul_nn` are the landmark kernels' too:
they live in `ops.pallas_common` and are re-exported here.

T5 relative bias (`rel` = (bidirectional, max_distance, num_buckets), or None): `tile_relative_bias` buckets
a tile from its positions and looks the bias up with one select per bucket (neither Mosaic nor Triton
lowers a general gather; a scalar table read per bucket is cheap), `table_grad_row` is the matching
per-bucket sum of dS for the table gradient. softmax1 only changes the initial state (`softmax_start`).
`flash_vjp` is the custom-VJP wiring that both kernels and the blockwise XLA implementation share.
"""

import functools

import jax
import jax.numpy as jnp

from ops.attention.relative_bias import relative_position_bucket
from ops.pallas_common import finalize, matmul_nn, matmul_tn, split_refs  # noqa: F401  (re-exported)
from ops.tiling import softmax_start

# Finite initial running max: keeps exp(m - m') finite for rows that have seen no visible key yet.
MASK_VALUE = -1e30


NUM_OPERANDS = 9  # q, k, v, key bias, table, q_pos, kv_pos, q_seg, kv_seg


def flash_vjp(forward, backward, num_static: int):
  """`jax.custom_vjp` flash attention f(q, k, v, bias, table, q_pos, kv_pos, q_seg, kv_seg, *static).

  forward(same arguments) -> (o, lse); backward(*static, residuals, dO) -> the nine operands' cotangents,
  with residuals = (the nine operands, o, lse). The `num_static` trailing arguments are static.
  """
  @functools.partial(jax.custom_vjp,
                     nondiff_argnums=tuple(range(NUM_OPERANDS, NUM_OPERANDS + num_static)))
  def flash(*args):
    return forward(*args)[0]

  def flash_fwd(*args):
    o, lse = forward(*args)
    return o, (*args[:NUM_OPERANDS], o, lse)

  flash.defvjp(flash_fwd, backward)
  return flash


def sequence_refs(refs, has_bias: bool, rel):
  """(bias_ref or None, table_ref or None, the remaining refs) of a kernel whose optional key-bias and
  relative-bias-table refs follow the four sequence refs."""
  bias_ref, refs = split_refs(refs, has_bias)
  table_ref, refs = split_refs(refs, rel is not None)
  return bias_ref, table_ref, refs


def kernel_rel(table, rel):
  """The kernels' static `rel`: (bidirectional, max_distance, num_buckets), or None without a table."""
  return None if table is None else (*rel, table.shape[1])


def initial_state(softmax1: bool) -> tuple[float, float]:
  """Initial running (max m, normaliser l) of the online softmax (`ops.tiling.softmax_start`)."""
  return softmax_start(MASK_VALUE, softmax1)


def tile_relative_bias(q_pos, kv_pos, table_entry, rel) -> tuple[jax.Array, jax.Array]:
  """(bucket int32, bias f32), both [bq, bk], of a tile: T5 buckets of kv_pos - q_pos and table[h, bucket].

  Args: q_pos [bq, 1], kv_pos [1, bk] int32; table_entry(n) -> the scalar table[h, n] of this program's
  query head; rel = (bidirectional, max_distance, num_buckets).
  """
  bidirectional, max_distance, num_buckets = rel
  bucket = relative_position_bucket(kv_pos - q_pos, bidirectional=bidirectional, num_buckets=num_buckets,
                                    max_distance=max_distance)
  bias = jnp.zeros(bucket.shape, jnp.float32)
  for n in range(num_buckets):
    bias = jnp.where(bucket == n, table_entry(n), bias)
  return bucket, bias


def table_grad_row(bucket, ds, lanes, num_buckets: int) -> jax.Array:
  """The tile's table gradient, f32 [1, W]: lane n < num_buckets holds sum_{ij: bucket_ij = n} ds_ij.

  Args: bucket [bq, bk] int32, ds [bq, bk] f32 (unscaled dL/ds), lanes [1, W] int32 iota (W >= num_buckets;
  each backend builds its own: Mosaic needs a 2-D iota).
  """
  row = jnp.zeros(lanes.shape, jnp.float32)
  for n in range(num_buckets):
    per_row = jnp.sum(jnp.where(bucket == n, ds, 0.0), axis=1, keepdims=True)
    row = row + jnp.where(lanes == n, jnp.sum(per_row, axis=0, keepdims=True), 0.0)
  return row


def tile_mask(q_pos, q_seg, kv_pos, kv_seg, bias, causal: bool) -> jax.Array:
  """Visibility of a tile: bool [bq, bk].

  Args: q_pos, q_seg [bq, 1] int32; kv_pos, kv_seg [1, bk] int32; bias [1, bk] f32 or None.
  Padding rows/columns carry segment ids that match nothing (see the wrappers).
  """
  mask = q_seg == kv_seg
  if causal:
    mask = mask & (kv_pos <= q_pos)
  if bias is not None:
    mask = mask & (bias > -jnp.inf)
  return mask


def tile_scores(q, k, bias, rel_bias, mask, scale: float, signed: bool) -> tuple[jax.Array, jax.Array]:
  """(s, a) of a tile, f32 [bq, bk]: s the sanitised logits (0 where masked, so a -inf bias never reaches
  exp), a the softmax argument (|s| for Cog) with MASK_VALUE where masked. bias [1, bk] (key bias) and
  rel_bias [bq, bk] (relative bias) are each optional."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = s + bias
  if rel_bias is not None:
    s = s + rel_bias
  s = jnp.where(mask, s, 0.0)
  a = jnp.abs(s) if signed else s
  return s, jnp.where(mask, a, MASK_VALUE)


def online_softmax_step(m, l, acc, s, a, mask, v, signed: bool):
  """One FlashAttention-2 update of the running (m [bq,1], l [bq,1], acc [bq,D]) with a tile."""
  m_new = jnp.maximum(m, jnp.max(a, axis=-1, keepdims=True))
  p = jnp.where(mask, jnp.exp(a - m_new), 0.0)
  alpha = jnp.exp(m - m_new)
  l_new = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
  pv = p * jnp.sign(s) if signed else p
  acc_new = alpha * acc + jax.lax.dot_general(pv.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                              preferred_element_type=jnp.float32)
  return m_new, l_new, acc_new


def tile_grads(s, a, mask, lse, delta, do, v, signed: bool) -> tuple[jax.Array, jax.Array]:
  """(w, ds) of a tile, f32 [bq, bk]: the weights and dL/ds (unscaled) given lse, delta [bq, 1]."""
  p = jnp.exp(jnp.where(mask, a - lse, -jnp.inf))
  dw = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  if signed:
    sgn = jnp.sign(s)
    return p * sgn, p * (jnp.abs(sgn) * dw - sgn * delta)
  return p, p * (dw - delta)
