"""Reference (oracle) attention: full float32 logits, one boolean mask, plain autodiff.

Implements, per batch b, query head h (kv head g = h // (H // Hkv)), query i and key j:

  s_ij   = scale * <q_i, k_j> + bias_j + table[h, bucket(kv_pos_j - q_pos_i)]     (logits)
  V_ij   = [!causal or kv_pos_j <= q_pos_i] and [seg_i == kv_seg_j] and [bias_j != -inf]
  softmax:  w_ij = exp(s_ij) / (c + sum_{j' in V_i} exp(s_ij'))                  for j in V_i
  signed:   w_ij = sign(s_ij) * exp(|s_ij|) / (c + sum_{j' in V_i} exp(|s_ij'|)) for j in V_i (Cog)
  w_ij   = 0 for j not in V_i;  o_i = sum_j w_ij v_j;  o_i = 0 when V_i is empty,
with c = 1 for softmax1 and 0 otherwise, and the T5 relative term (`ops.attention.relative_bias`, here
materialised as [B, H, T, S]) only when a table is given.

This is the simplest correct form and is O(T * S) in memory; use it for testing, not for long sequences.
Call it through `ops.attention.attention(..., impl="reference")`, which validates and canonicalises the
arguments.
"""

import jax
import jax.numpy as jnp

from ops.attention import relative_bias as relative_bias_lib

# Finite stand-in for -inf so the max over a fully masked row stays finite (no inf - inf = NaN).
_MASK_VALUE = -1e30


def build_mask(q_positions: jax.Array, kv_positions: jax.Array, segment_ids: jax.Array | None,
               kv_segment_ids: jax.Array | None, key_bias: jax.Array | None,
               causal: bool) -> jax.Array:
  """Visibility mask V of the module docstring.

  Args:
    q_positions: [B, T] int.
    kv_positions: [B, S] int.
    segment_ids: [B, T] int or None.
    kv_segment_ids: [B, S] int or None (given iff segment_ids is).
    key_bias: [B, Hb, S] float or None, Hb in {1, Hkv}; keys whose bias is -inf are masked.
    causal: whether to apply the position rule kv_pos_j <= q_pos_i.

  Returns:
    bool [B, Hb, 1, T, S] (Hb = 1 without key_bias), broadcastable against [B, Hkv, G, T, S] logits.
  """
  b, t = q_positions.shape
  s = kv_positions.shape[1]
  mask = jnp.ones((b, t, s), dtype=bool)
  if causal:
    mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
  if segment_ids is not None:
    mask &= segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  mask = mask[:, None, None]
  if key_bias is not None:
    mask = mask & (key_bias > -jnp.inf)[:, :, None, None, :]
  return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
              kv_positions: jax.Array, segment_ids: jax.Array | None,
              kv_segment_ids: jax.Array | None, key_bias: jax.Array | None,
              relative_bias: jax.Array | None, relative_bidirectional: bool,
              relative_max_distance: int, causal: bool, signed: bool, softmax1: bool,
              scale: float) -> jax.Array:
  """Materialised attention (equations in the module docstring).

  Args:
    q: [B, T, H, D].
    k: [B, S, Hkv, D], H % Hkv == 0.
    v: [B, S, Hkv, D].
    q_positions: [B, T] int32.
    kv_positions: [B, S] int32.
    segment_ids: [B, T] int32 or None.
    kv_segment_ids: [B, S] int32 or None (given iff segment_ids is).
    key_bias: [B, Hb, S] float32 or None, Hb in {1, Hkv}.
    relative_bias: [H, num_buckets] float32 T5 table or None.
    relative_bidirectional, relative_max_distance: its bucket parameters.
    causal: mask keys with kv_pos > q_pos.
    signed: Cog weights sign(s) * softmax(|s|) instead of softmax(s).
    softmax1: one more (virtual, logit 0, value 0) key in the normaliser.
    scale: logit scale (a Python float).

  Returns:
    o: [B, T, H, D] in q.dtype.
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  qf = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
  kf = k.astype(jnp.float32)
  vf = v.astype(jnp.float32)
  s = jnp.einsum("bthgd,bshd->bhgts", qf, kf, precision=jax.lax.Precision.HIGHEST) * scale
  if key_bias is not None:
    s = s + key_bias[:, :, None, None, :]
  if relative_bias is not None:
    rel = relative_bias_lib.relative_bias(relative_bias, q_positions, kv_positions,
                                          bidirectional=relative_bidirectional,
                                          max_distance=relative_max_distance)
    s = s + rel.reshape(b, hkv, g, t, -1)
  mask = build_mask(q_positions, kv_positions, segment_ids, kv_segment_ids, key_bias, causal)
  # Sanitise before any nonlinearity: a -inf bias would otherwise put inf/NaN into the unselected
  # branch of the `where`s below, and 0 * NaN poisons the gradients.
  s = jnp.where(mask, s, 0.0)
  a = jnp.abs(s) if signed else s
  a = jnp.where(mask, a, _MASK_VALUE)
  m = jax.lax.stop_gradient(jnp.max(a, axis=-1, keepdims=True))
  if softmax1:  # the virtual key's logit 0 joins the max and adds exp(0 - m) to the normaliser
    m = jnp.maximum(m, 0.0)
  e = jnp.where(mask, jnp.exp(a - m), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  if softmax1:
    denom = denom + jnp.exp(-m)
  # Rows with no visible key: e == 0 everywhere, so dividing by 1 outputs exact zeros.
  p = e / jnp.where(denom > 0.0, denom, 1.0)
  w = jnp.sign(s) * p if signed else p
  o = jnp.einsum("bhgts,bshd->bthgd", w, vf, precision=jax.lax.Precision.HIGHEST)
  return o.reshape(b, t, h, d).astype(q.dtype)
