"""Losses shared by the model families: weighted cross-entropy sums (pure JAX, float32)."""

import math

import jax
import jax.numpy as jnp
import optax


def weighted_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of -ln p(target) * weight, sum of weights), in float32. logits [B,T,V], targets/weights [B,T]."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


def weighted_correct(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Sum of weights where the argmax of logits [B,T,V] is the target [B,T] (float32)."""
  hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(hits * weights.astype(jnp.float32))


def bits_per_byte(nll_sum: float, count: float) -> float:
  """bpb = sum(-ln p) / (N_bytes * ln 2)  (token_free.md section 0)."""
  return nll_sum / max(count, 1.0) / math.log(2.0)
