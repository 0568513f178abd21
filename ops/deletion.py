"""MrT5's learned deletion (specs/token_free.md §3): the delete gate, deletion rates, the PI controller.

Pure functions; models/byt5/model.py owns the gate's parameters and calls these.
"""

from typing import Any

import jax
import jax.numpy as jnp


def gate_values(logits: jax.Array, is_pad: jax.Array, *, scale: float) -> jax.Array:
  """G = k * sigmoid(-z) (§3.2, the released code's form), and G = k at padding.

  logits z [B, T] (= w . RMSNorm(h) + b), is_pad [B, T] bool -> G [B, T] f32 in (k, 0); k = scale < 0.
  G near 0 keeps a token, near k deletes it.
  """
  g = scale * jax.nn.sigmoid(-logits.astype(jnp.float32))
  return jnp.where(is_pad, jnp.float32(scale), g)


def hard_keep(gates: jax.Array, is_pad: jax.Array, *, threshold: float) -> jax.Array:
  """keep = G > threshold (§3.4) on real tokens, [B, T] bool.

  A row that would keep nothing keeps its last real token instead (its EOS; every real row has one), the
  defined fallback for MrT5's "All tokens are deleted" error (§3.8, §17.2): cross-attention always has a
  key. A row of padding only keeps nothing.
  """
  keep = (gates > threshold) & ~is_pad
  t = gates.shape[-1]
  last_real = t - 1 - jnp.argmax(~is_pad[:, ::-1], axis=-1)  # [B]
  fallback = (jnp.arange(t) == last_real[:, None]) & ~is_pad
  return jnp.where(jnp.any(keep, axis=-1, keepdims=True), keep, fallback)


def deletion_sums(gates: jax.Array, is_pad: jax.Array, *, threshold: float) -> dict[str, jax.Array]:
  """{"deleted": #(G <= threshold on real tokens), "gated": #real tokens, "gate_sum": sum of G over them}.

  The realised deletion rate of §3.5 is deleted / gated, and the gate loss L_G = gate_sum / gated.
  """
  real = ~is_pad
  g = jnp.where(real, gates, 0.0)
  return {"deleted": jnp.sum((gates <= threshold) & real).astype(jnp.float32),
          "gated": jnp.sum(real).astype(jnp.float32), "gate_sum": jnp.sum(g)}


def pi_controller_init(alpha: float) -> dict[str, jax.Array]:
  """Controller state {alpha, p, i}: p and i start at 0, alpha at its configured initial value."""
  return {"alpha": jnp.float32(alpha), "p": jnp.float32(0.0), "i": jnp.float32(0.0)}


def pi_controller_update(state: dict[str, Any], rate: jax.Array, *, target: float, kp: float,
                         ki: float) -> dict[str, jax.Array]:
  """One PI step of §3.5 on the batch's realised deletion rate r:

    e = delta - r;  p <- 0.9 p + 0.1 kp e;  i <- i + ki e;  alpha = max(0, p + i).
  The alpha returned is used by the *next* step's loss (the update follows the loss, as in MrT5).
  """
  error = jnp.float32(target) - rate.astype(jnp.float32)
  p = 0.9 * state["p"] + 0.1 * kp * error
  i = state["i"] + ki * error
  return {"alpha": jnp.maximum(0.0, p + i), "p": p, "i": i}


def scores_penalty(q: jax.Array, k: jax.Array, valid: jax.Array, *, floor: float = 5.0) -> jax.Array:
  """Sum and count of MrT5's attention-score regulariser terms (§3.5, Appendix D).

  mean over (b, h, i, j) of clamp(q_i . k_j, min=floor) - floor, with the raw (unscaled, T5) logits
  materialised: q [B, T, H, D], k [B, S, Hkv, D], valid [B, S] bool (real keys). Returns (sum, count)
  so callers can average over layers and batches. [VERIFY] the code's "raw logits" are taken here
  before the position bias and masks are added.
  """
  groups = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
  terms = jnp.maximum(logits, floor) - floor
  mask = jnp.broadcast_to(valid[:, None, None, :], terms.shape)
  return jnp.sum(jnp.where(mask, terms, 0.0)), jnp.sum(mask).astype(jnp.float32)
