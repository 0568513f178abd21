"""Per-tile maths shared by the Pallas attention kernels (TPU and GPU): masks, logits, weights, dS.

Everything here acts on one [bq, bk] tile of one (batch, query head) and is plain jnp, so the kernel bodies
stay short and the two backends cannot drift apart. Equations: `ops.attention.xla` module docstring.
`finalize` (o and lse from the running state), `matmul_tn` and `matmul_nn` are the landmark kernels' too:
they live in `ops.pallas_common` and are re-exported here.
"""

import jax
import jax.numpy as jnp

from ops.pallas_common import finalize, matmul_nn, matmul_tn  # noqa: F401  (re-exported)

# Finite initial running max: keeps exp(m - m') finite for rows that have seen no visible key yet.
MASK_VALUE = -1e30


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


def tile_scores(q, k, bias, mask, scale: float, signed: bool) -> tuple[jax.Array, jax.Array]:
  """(s, a) of a tile, f32 [bq, bk]: s the sanitised logits (0 where masked, so a -inf bias never reaches
  exp), a the softmax argument (|s| for Cog) with MASK_VALUE where masked."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = s + bias
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
