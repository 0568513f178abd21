"""Trained boundary sources of dynamic token pooling, as pure functions (specs/token_free.md §5.2).

A boundary predictor (models/hierarchical.py) gives one logit z_t per byte, p_t = sigmoid(z_t); these turn
it into boundaries with the §5.1 convention (b_t = 1: the group ends at byte t) and give its training loss.
Like `ops.pooling.boundaries`, every EOS is a boundary and PAD never is (those bytes are not the
predictor's to decide and carry no gradient).

  Gumbel (end-to-end), training: the relaxed Bernoulli sample
      b~_t = sigmoid((log p_t - log(1 - p_t) + log u_t - log(1 - u_t)) / tau),  u_t ~ U(0, 1),
  hard b_t = 1[b~_t > 0.5] and the straight-through b = hard - stopgrad(b~) + b~ (`learned_boundaries`
  with `uniform`); its forward value is exactly the hard 0/1 and d b / d b~ = 1. Pass b to
  `ops.pooling.pool(..., boundaries=b)` so that the gradient reaches the predictor through pooling.
  Regulariser `binomial_prior_loss`: L_b = -log Binomial(sum_t b_t; n = T, alpha) / T.
  Evaluation / generation (and the "entropy" source always): b_t = 1[p_t > 0.5], deterministic.
  Entropy spikes: H_t = -sum_x p(x | x_<=t) log p(x | x_<=t) of the model's next-byte distribution
  (`next_byte_entropy`); target b_t = 1 iff H_t > H_{t-i} for all i = 1..k (`entropy_spikes`), which the
  predictor imitates through `sigmoid_bce`.
"""

import jax
import jax.numpy as jnp

from ops.pooling.boundaries import EOS_ID, PAD_ID


def relaxed_bernoulli(logits: jax.Array, uniform: jax.Array, temperature: float) -> jax.Array:
  """b~ = sigmoid((z + log u - log(1 - u)) / tau) [f32], z = log p - log(1 - p) the predictor's logit.

  u is clamped to [eps, 1 - eps] (eps the f32 machine epsilon), as torch's RelaxedBernoulli clamps its
  uniforms, so that log u and log(1 - u) stay finite.
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  eps = jnp.finfo(jnp.float32).eps
  u = jnp.clip(uniform.astype(jnp.float32), eps, 1.0 - eps)
  return jax.nn.sigmoid((logits.astype(jnp.float32) + jnp.log(u) - jnp.log1p(-u)) / temperature)


def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
  """hard - stopgrad(soft) + soft, written hard + (soft - stopgrad(soft)) so the forward value is exactly
  the hard 0/1 (soft - soft is 0 in floating point; 1 - 0.7 + 0.7 need not be 1)."""
  soft = soft.astype(jnp.float32)
  return hard.astype(jnp.float32) + (soft - jax.lax.stop_gradient(soft))


def learned_boundaries(logits: jax.Array, ids: jax.Array, *, uniform: jax.Array | None = None,
                       temperature: float = 0.5, threshold: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """Predictor logits z [B, T] and ids [B, T] -> (b [B, T] bool, b_st [B, T] f32).

  uniform [B, T] (training, Gumbel): b = 1[b~ > threshold] for the relaxed sample b~ above and b_st its
  straight-through estimate; None (evaluation, the entropy source): b = 1[sigmoid(z) > threshold] and b_st
  = b (no gradient). EOS bytes are boundaries and PAD bytes are not, in b and b_st alike (no gradient).
  b_t depends on z_t, u_t and ids_t only.
  """
  if logits.shape != ids.shape:
    raise ValueError(f"logits {logits.shape} must have the shape of ids {ids.shape}.")
  if uniform is None:
    soft = jax.nn.sigmoid(logits.astype(jnp.float32))
  else:
    soft = relaxed_bernoulli(logits, uniform, temperature)
  hard = soft > threshold
  forced = (ids == EOS_ID) | (ids == PAD_ID)
  hard = (hard | (ids == EOS_ID)) & (ids != PAD_ID)
  if uniform is None:
    return hard, hard.astype(jnp.float32)
  return hard, jnp.where(forced, hard.astype(jnp.float32), straight_through(hard, soft))


def binomial_prior_loss(b: jax.Array, prior: float, valid: jax.Array | None = None) -> jax.Array:
  """L_b = -log Binomial(k; n, alpha) / n per row [B] f32, k = sum_t b_t, n = T (or the valid bytes).

  log Binomial(k; n, alpha) = lgamma(n + 1) - lgamma(k + 1) - lgamma(n - k + 1) + k log alpha
  + (n - k) log(1 - alpha), differentiable in k (torch's Binomial.log_prob, which dynamic pooling
  differentiates through a straight-through b). valid [B, T] bool: n and k count only those bytes (with
  valid all True this is the spec's n = T).
  """
  if not 0 < prior < 1:
    raise ValueError(f"prior must be in (0, 1), got {prior}.")
  b = b.astype(jnp.float32)
  if valid is None:
    valid = jnp.ones(b.shape, bool)
  n = jnp.sum(valid, axis=-1).astype(jnp.float32)
  k = jnp.sum(jnp.where(valid, b, 0.0), axis=-1)
  log_pmf = (jax.lax.lgamma(n + 1) - jax.lax.lgamma(k + 1) - jax.lax.lgamma(n - k + 1)
             + k * jnp.log(prior) + (n - k) * jnp.log1p(-prior))
  return -log_pmf / jnp.maximum(n, 1.0)


def next_byte_entropy(logits: jax.Array) -> jax.Array:
  """H_t = -sum_x p_t(x) log p_t(x) [..., T] f32 of the distributions softmax(logits[..., t, :]), in nats."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def entropy_spikes(entropy: jax.Array, k: int = 2, segment_ids: jax.Array | None = None) -> jax.Array:
  """Entropy spikes [B, T] bool: s_t = 1 iff H_t > H_{t-i} for every i = 1..k (dynamic pooling's
  `get_spikes`, `spikes_left` = k). A comparison with a byte before the row's start, or (with
  segment_ids [B, T]) in another document, holds vacuously, so the first bytes of a row or document
  compare only with what came before them in it."""
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  t = entropy.shape[-1]
  spikes = jnp.ones(entropy.shape, bool)
  for i in range(1, min(k, t - 1) + 1):
    higher = entropy[..., i:] > entropy[..., :-i]
    if segment_ids is not None:
      higher = higher | (segment_ids[..., i:] != segment_ids[..., :-i])
    spikes = spikes.at[..., i:].set(spikes[..., i:] & higher)
  return spikes


def sigmoid_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise binary cross-entropy of sigmoid(logits) against targets in {0, 1} (torch's
  BCEWithLogitsLoss before its mean): softplus(z) - y z, f32."""
  z = logits.astype(jnp.float32)
  return jax.nn.softplus(z) - targets.astype(jnp.float32) * z
