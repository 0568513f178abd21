"""Single-token GLA update for autoregressive decoding (specs/attention_variants.md §1.1, recurrent form).

  S_t = Diag(exp(log_gate_t)) S_{t-1} + k_t^T v_t,    o_t = (scale * q_t) S_t

This is exactly one step of `ops.gla.reference` (same function, f32), so iterating it over a sequence
reproduces the parallel forward `ops.gla.gla` up to f32 rounding.
"""

import functools

import jax
import jax.numpy as jnp

from ops.gla import reference


def _check_float(name: str, x: jax.Array, shape: tuple[int, ...], layout: str) -> None:
  if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a float array of shape {shape} ({layout}), "
                     f"got {x.dtype} {x.shape}.")


@functools.partial(jax.jit, static_argnames=("scale",))
def _step(q, k, v, log_gate, state, *, scale):
  o, state = reference.recurrent_step(q, k, v, log_gate, state, scale)
  return o.astype(q.dtype), state


def gla_step(q: jax.Array, k: jax.Array, v: jax.Array, log_gate: jax.Array, state: jax.Array, *,
             scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """One decoding step of gated linear attention (equations in the module docstring).

  Args:
    q: [B, H, K] query of the new token.
    k: [B, H, K] key.
    v: [B, H, V] value.
    log_gate: [B, H, K] log(alpha_t); must be <= 0 (not checked: it is traced).
    state: [B, H, K, V] S_{t-1}, normally float32 (e.g. `gla(...)[1]` or zeros); any float dtype is
      upcast to float32.
    scale: applied to q (Python float), default K ** -0.5.

  Returns:
    o: [B, H, V] in q.dtype.
    state: [B, H, K, V] float32 S_t.

  Raises:
    ValueError: on inconsistent shapes or non-float inputs.
  """
  q, k, v, log_gate, state = (jnp.asarray(x) for x in (q, k, v, log_gate, state))
  if q.ndim != 3:
    raise ValueError(f"q must have rank 3 ([batch, heads, key_dim]), got shape {q.shape}.")
  if v.ndim != 3:
    raise ValueError(f"v must have rank 3 ([batch, heads, value_dim]), got shape {v.shape}.")
  b, h, dk = q.shape
  dv = v.shape[-1]
  _check_float("q", q, q.shape, "[B, H, K]")
  _check_float("k", k, (b, h, dk), "[B, H, K], like q")
  _check_float("log_gate", log_gate, (b, h, dk), "[B, H, K], like q")
  _check_float("v", v, (b, h, dv), "[B, H, V] with the batch and heads of q")
  _check_float("state", state, (b, h, dk, dv), "[B, H, K, V]")
  return _step(q, k, v, log_gate, state, scale=dk ** -0.5 if scale is None else float(scale))
