"""Rotary position embedding (Su et al. 2021, eq. 34), rotate-half layout: the one implementation that the
attention layers (`models/layers.rope`) and landmark retrieval (`ops/landmark/retrieval.py`) share."""

import jax
import jax.numpy as jnp


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """x [..., D] (D even), positions broadcastable to x.shape[:-1] (int) -> [..., D] float32.

  With angles_i = position * theta^(-2i/D) for i < D/2 and x = [x1, x2] (halves):
  out = [x1 cos - x2 sin, x2 cos + x1 sin].

  The sin/cos tables (the shape of `positions`, times D/2) sit behind an optimization barrier: without it
  XLA:CPU fuses them into every elementwise consumer (each half of q and k, forward and backward),
  evaluating sin and cos once per element of x there, 8x per attention layer; with it they are computed
  once per call (and CSE'd between q and k). Same values bit for bit.
  """
  d = x.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [D/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jax.lax.optimization_barrier((jnp.sin(angles), jnp.cos(angles)))
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
