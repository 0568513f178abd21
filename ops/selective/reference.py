"""Reference (oracle) Leviathan selective attention: materialised float32 logits and selection matrix.

Implements specs/attention_variants.md §4B (Leviathan, Kalman, Matias 2024, "Selective Attention
Improves Transformer"; x-transformers `selective_attn`), per batch b, query i and key j:

  V_ij   = [kv_pos_j <= q_pos_i] and [seg_i == kv_seg_j]                      (causal, segment mask)
  L^h_ij = scale * <q^h_i, k^g(h)_j>                                          (logits of every head)
  S_ij   = ReLU(L^sel_ij) if V_ij and not bos_j and kv_pos_j != q_pos_i else 0   (head `selection_head`)
  F_ij   = F0_j + sum_{k < i} S_kj                            (exclusive cumsum over the query rows)
  P_ij   = V_ij [and F_ij <= prune_threshold]                           (optional context pruning)
  A^h_i  = softmax_j(L^h_ij - F_ij) over P_i;  o^h_i = sum_j A^h_ij v_j;  o_i = 0 if P_i is empty
  final column sums  F0_j + sum_i S_ij;     masked_i = sum_{j in V_i} min(F_ij, tau) / tau

This is O(T * S) in memory per head; call it through `ops.selective.selective_attention(...,
impl="reference")`, which validates and canonicalises the arguments.
"""

import jax
import jax.numpy as jnp

# Finite stand-in for -inf so the max over a fully masked row stays finite (no inf - inf = NaN).
_MASK_VALUE = -1e30


def selection_inputs(q_positions, kv_positions, segment_ids, kv_segment_ids, bos_mask):
  """(visible [B, T, S], selectable [B, T, S]) bool masks of the module docstring."""
  visible = kv_positions[:, None, :] <= q_positions[:, :, None]
  if segment_ids is not None:
    visible &= segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  selectable = visible & ~bos_mask[:, None, :] & (kv_positions[:, None, :] != q_positions[:, :, None])
  return visible, selectable


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax over the last axis restricted to `mask`; exact zeros (and zero gradients) if a row is empty."""
  logits = jnp.where(mask, logits, _MASK_VALUE)
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = jnp.where(mask, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(denom > 0.0, denom, 1.0)


def selective_attention(q, k, v, *, q_positions, kv_positions, segment_ids, kv_segment_ids, bos_mask,
                        initial_column_sums, scale, selection_head, prune_threshold, memory_tau):
  """Materialised selective attention (equations in the module docstring).

  Args:
    q: [B, T, H, D].
    k, v: [B, S, Hkv, D], H % Hkv == 0.
    q_positions: [B, T] int32;  kv_positions: [B, S] int32.
    segment_ids: [B, T] int32 or None;  kv_segment_ids: [B, S] int32 or None (given iff segment_ids is).
    bos_mask: [B, S] bool, keys that are never selected (masked).
    initial_column_sums: [B, S] float32 F0.
    scale: logit scale;  selection_head: query head whose logits give S.
    prune_threshold: None or a float: keys with F_ij > threshold are dropped for query i.
    memory_tau: None or a float tau > 0: also return `masked`.

  Returns:
    (o [B, T, H, D] in q.dtype, final column sums [B, S] f32[, masked [B, T] f32 if memory_tau]).
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  hi = jax.lax.Precision.HIGHEST
  qf = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
  logits = jnp.einsum("bthgd,bshd->bhgts", qf, k.astype(jnp.float32), precision=hi) * scale
  visible, selectable = selection_inputs(q_positions, kv_positions, segment_ids, kv_segment_ids,
                                         bos_mask)
  sel_logits = logits[:, selection_head // g, selection_head % g]  # [B, T, S]
  selection = jnp.where(selectable, jax.nn.relu(sel_logits), 0.0)
  inclusive = jnp.cumsum(selection, axis=1)
  exclusive = jnp.pad(inclusive[:, :-1], ((0, 0), (1, 0), (0, 0)))
  f = initial_column_sums[:, None, :] + exclusive  # [B, T, S]
  keep = visible if prune_threshold is None else visible & (f <= prune_threshold)
  weights = masked_softmax(logits - f[:, None, None], keep[:, None, None])
  o = jnp.einsum("bhgts,bshd->bthgd", weights, v.astype(jnp.float32), precision=hi)
  outputs = (o.reshape(b, t, h, d).astype(q.dtype), initial_column_sums + inclusive[:, -1])
  if memory_tau is not None:
    outputs += (jnp.sum(jnp.where(visible, jnp.minimum(f, memory_tau), 0.0), axis=-1) / memory_tau,)
  return outputs
