"""Reference (oracle) GLA: the recurrent form in float32, one `lax.scan` step per position.

Implements specs/attention_variants.md §1.1 "Recurrent form" (fla's `naive_recurrent_gla`), per batch b
and head h, with S_0 = initial_state and alpha_t = exp(log_gate_t):

  S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t          S_t in R^{K x V}, alpha_t in (0, 1]^K
  o_t = (scale * q_t) S_t

Everything is upcast to float32 and there is no chunking, so no exponent of a cumulative gate is ever
formed: this is the simplest correct form, O(T) sequential steps. Use it for testing and as the decode
step (`recurrent_step` is what `ops.gla.gla_step` computes); call it through
`ops.gla.gla(..., impl="reference")`, which validates and canonicalises the arguments.
"""

import jax
import jax.numpy as jnp


def recurrent_step(q: jax.Array, k: jax.Array, v: jax.Array, log_gate: jax.Array, state: jax.Array,
                   scale: float) -> tuple[jax.Array, jax.Array]:
  """One position of the recurrence, in float32.

  Args:
    q: [B, H, K].
    k: [B, H, K].
    v: [B, H, V].
    log_gate: [B, H, K], log(alpha_t) <= 0.
    state: [B, H, K, V] S_{t-1}.
    scale: Python float applied to q.

  Returns:
    o_t [B, H, V] float32 and S_t [B, H, K, V] float32.
  """
  q, k, v, log_gate, state = (x.astype(jnp.float32) for x in (q, k, v, log_gate, state))
  state = jnp.exp(log_gate)[..., None] * state + k[..., :, None] * v[..., None, :]
  o = jnp.einsum("bhk,bhkv->bhv", q * scale, state, precision=jax.lax.Precision.HIGHEST)
  return o, state


def gla(q: jax.Array, k: jax.Array, v: jax.Array, log_gate: jax.Array, initial_state: jax.Array, *,
        scale: float) -> tuple[jax.Array, jax.Array]:
  """Recurrent GLA (equations in the module docstring).

  Args:
    q: [B, T, H, K].
    k: [B, T, H, K].
    v: [B, T, H, V].
    log_gate: [B, T, H, K] float, log(alpha) <= 0.
    initial_state: [B, H, K, V] float32 S_0.
    scale: Python float applied to q.

  Returns:
    o [B, T, H, V] in q.dtype and the final state S_T [B, H, K, V] float32.
  """
  def body(state, xs):
    o, state = recurrent_step(*xs, state, scale)
    return state, o

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_gate))  # time first for the scan
  final_state, o = jax.lax.scan(body, initial_state.astype(jnp.float32), xs)
  return jnp.moveaxis(o, 0, 1).astype(q.dtype), final_state
