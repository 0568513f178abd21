"""Multi-head causal self-attention mixers over `ops.attention`: softmax (baseline), Cog (signed) and
SSA (selective self-attention: query and value temperatures).

All support GQA and optional qk-norm.

The maths lives in `ops.attention`; this module only owns the projections, the decode KV cache and (SSA)
the per-token temperatures that pre-scale q and v.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from models import layers
from models.registry import mixer_options, register_mixer
from ops.attention import attention


@register_mixer("softmax")
class SelfAttention(nn.Module):
  """Causal multi-head softmax attention with RoPE. x [B, T, D] -> [B, T, D].

  Options read from `config` (the model config): num_heads, num_kv_heads (GQA), head_dim, qk_norm,
  rope_theta, attention_impl, interpret, dtype. Subclasses change the op call via `signed`.
  """
  config: Any
  layer_index: int = 0
  decode: bool = False
  signed: bool = False  # Cog attention reuses this module with signed=True

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    batch, t, _ = x.shape
    q, q_projection, k, v = layers.qkv_projections(cfg, x, dtype)  # W_q x before qk-norm: temperatures

    q_positions = kv_positions = kv_segment_ids = None
    if self.decode:
      cache = layers.declare_kv_cache(self, k.shape, v.shape, k.dtype)
      # Absolute positions come from the cache index, so RoPE is right whatever the caller passes.
      positions = cache.positions(batch, t)
      if segment_ids is not None:  # keys keep their segment (patch-scoped byte layers, models/hierarchical)
        segment_ids, kv_segment_ids = layers.cache_segments(self, cache, segment_ids)
    elif positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    temperatures = self.temperatures(q_projection, v, positions)
    q = layers.rope(q, positions, cfg.rope_theta)
    k = layers.rope(k, positions, cfg.rope_theta)
    if temperatures is not None:
      tau_q, tau_v = temperatures
      q = q * tau_q[..., None]
      v = v * tau_v[..., None]
    if self.decode:
      k, v, q_positions, kv_positions = layers.cache_append(cache, k, v)

    o = attention(q, k, v, causal=True, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                  signed=self.signed, q_positions=q_positions, kv_positions=kv_positions,
                  impl=cfg.attention_impl or None, interpret=cfg.interpret)
    return layers.attention_output(cfg, o, dtype)

  def temperatures(self, q: jax.Array, v: jax.Array, positions: jax.Array
                   ) -> tuple[jax.Array, jax.Array] | None:
    """Hook for subclasses: per-token scales (tau_q [B, T, H], tau_v [B, T, Hkv]) of q and v, or None.

    Called with the query projection W_q x [B, T, H, D] (before qk-norm and RoPE), the values
    [B, T, Hkv, D] and the absolute within-segment positions [B, T] (from the cache index when
    decoding). The scales multiply q after RoPE and v before it is cached. None (plain softmax / Cog)
    leaves q and v untouched.
    """
    del q, v, positions
    return None


@register_mixer("cog")
class CogAttention(SelfAttention):
  """Cog attention (specs/attention_variants.md §3.1): w = sign(s) * softmax(|s|). x [B,T,D] -> [B,T,D].

  Same parameters, RoPE, qk-norm option and KV cache as "softmax"; only the op's weights differ. Cog adds
  no parameters or hyperparameters (§3.1), so it reads no `config.model.cog` options. It lives here
  (DESIGN §5) since it is SelfAttention with one field changed; the §3.2 rule (softmax in the first and
  last layer) is the per-layer mixer list of configs/cog.py.
  """
  signed: bool = True


# Options under `config.model.ssa` and their defaults (configs/ssa.py takes them with `mixer_config`).
# Spec §4A / §7.1 / §7.3: the paper's §3 equations are unread, so the [VERIFY] choices are switches.
SSA_DEFAULTS: dict[str, Any] = {
    # tau = tau_pos + tau_tok ("add", spec §7.3 recommendation, third-party code) or
    # tau = tau_pos * (1 + tau_tok) ("mul"; the 1 + keeps it the identity at tau_tok = 0).
    "combine": "add",
    "value_position": True,  # tau_pos also scales v (spec §7.3: third-party code shares it with q)
    "token_temperature": True,  # False: position-only temperatures (the official code's "PTS" variant)
    "value_temperature": True,  # False: v is not scaled at all (query temperature only)
    # s of tau_pos = 1 + s * log(n): "exp_exp" s = exp(-exp(beta)) (official code, s in (0, 1)) or
    # "sigmoid" s = sigmoid(alpha) (third-party code).
    "position_param": "exp_exp",
    # Initial beta / alpha; None = 2.0 for exp_exp (official model_finetune_att.py: s ~ 6.2e-4, near
    # identity) and 0.0 for sigmoid (third-party: s = 0.5). beta >= 5 (or alpha <= -200) gives s == 0
    # exactly in f32, i.e. SSA == softmax at init.
    "position_init": ml_collections.FieldReference(None, field_type=float),
    "token_init_scale": 0.0,  # stddev of the N(0, .) init of u_q, u_v; 0 = zeros, so tau_tok == 0 at init
}
_SSA_COMBINE = ("add", "mul")
_SSA_POSITION_PARAMS = {"exp_exp": (lambda p: jnp.exp(-jnp.exp(p)), 2.0),
                        "sigmoid": (jax.nn.sigmoid, 0.0)}


def ssa_options(config: Any) -> dict[str, Any]:
  """`SSA_DEFAULTS` updated by `config.ssa` (the model config's optional sub-config); rejects unknown keys."""
  options = mixer_options(config, "ssa", SSA_DEFAULTS)
  if options["combine"] not in _SSA_COMBINE:
    raise ValueError(f"unknown model.ssa.combine {options['combine']!r}; expected one of "
                     f"{list(_SSA_COMBINE)}.")
  if options["position_param"] not in _SSA_POSITION_PARAMS:
    raise ValueError(f"unknown model.ssa.position_param {options['position_param']!r}; expected one "
                     f"of {sorted(_SSA_POSITION_PARAMS)}.")
  return options


@register_mixer("ssa", defaults=SSA_DEFAULTS)
class SelectiveSelfAttention(SelfAttention):
  """Selective Self-Attention (Zhang et al. 2024, spec §4A / §7.1 / §7.3). x [B, T, D] -> [B, T, D].

  Softmax attention ("softmax" mixer: same projections, RoPE, GQA, KV cache) on temperature-scaled
  queries and values, keys unscaled:

    q~_i = tau_q(i) q_i,  v~_j = tau_v(j) v_j,  o_i = sum_j softmax_j(q~_i . k_j / sqrt(d)) v~_j
    tau_pos(i)  = 1 + s * log(n_i),  n_i = (absolute within-segment position of i) + 1   [one s per layer]
    tau_tok,q   = tanh(u_q[h] . GELU(W_q x_i)[h])  per head  (weight sharing: reuses W_q; u_q [H, D])
    tau_tok,v   = tanh(u_v[g] . GELU(W_v x_j)[g])  per kv head  (u_v [Hkv, D])
    add: tau_q = tau_pos + tau_tok,q;  tau_v = tau_pos + tau_tok,v   (tau_pos -> 1 if not value_position)
    mul: tau_q = tau_pos (1 + tau_tok,q);  tau_v = tau_pos (1 + tau_tok,v)

  [VERIFY] (spec §7.3): additive combination, f = u . GELU(W x), per-head u and tau_pos on v are the
  third-party reading; each is a `config.model.ssa` switch (see `SSA_DEFAULTS`). The position scalar s
  defaults to the official code's s = exp(-exp(beta)), beta = 2.0 (code-confirmed, and near identity:
  s ~ 6.2e-4), rather than the third-party sigmoid(alpha) whose alpha = 0 init gives s = 0.5. With
  u = 0 (default) tau_tok = 0 at init; with s == 0 as well (position_init >= 5) SSA is exactly softmax.

  Positions are the absolute within-segment positions the model passes (arange when None), and the cache
  index when decoding, never the row within the current block (the official code's bug, spec §7.1, which
  makes tau_pos == 1 in single-token decoding). Temperatures are computed in f32 and cast to q.dtype.
  Not done: the official scripts' separate learning rate for beta; u_q, u_v get the optimizer's weight
  decay (they are [H, D] matrices), which pulls them towards the identity init.
  """

  def temperatures(self, q, v, positions):
    options = ssa_options(self.config)
    num_heads, head_dim = q.shape[2:]
    num_kv_heads = v.shape[2]
    to_scale, default_init = _SSA_POSITION_PARAMS[options["position_param"]]
    init = default_init if options["position_init"] is None else float(options["position_init"])
    raw = self.param("position_scale", nn.with_logical_partitioning(nn.initializers.constant(init), ()),
                     (), jnp.float32)
    log_n = jnp.log1p(jnp.maximum(positions, 0).astype(jnp.float32))  # log(n), n = position + 1 >= 1
    tau_pos = (1.0 + to_scale(raw) * log_n)[..., None]  # [B, T, 1]
    tau_v_pos = tau_pos if options["value_position"] else jnp.ones_like(tau_pos)

    def token_temperature(name, x, heads, axis):
      """tanh(u[h] . GELU(x[..., h, :])) [B, T, heads], or 0 when the token part is off."""
      if not options["token_temperature"]:
        return jnp.zeros(x.shape[:3], jnp.float32)
      scale = options["token_init_scale"]
      init = (nn.initializers.normal(stddev=scale) if scale > 0 else nn.initializers.zeros)
      u = self.param(name, nn.with_logical_partitioning(init, (axis, layers.HEAD_DIM)),
                     (heads, head_dim), jnp.float32)
      gelu = jax.nn.gelu(x.astype(jnp.float32), approximate=False)  # torch nn.GELU default
      return jnp.tanh(jnp.einsum("bthd,hd->bth", gelu, u))

    tok_q = token_temperature("query_temperature", q, num_heads, layers.HEADS)
    if options["combine"] == "add":
      tau_q = tau_pos + tok_q
    else:
      tau_q = tau_pos * (1.0 + tok_q)
    if options["value_temperature"]:
      tok_v = token_temperature("value_temperature", v, num_kv_heads, layers.KV_HEADS)
      tau_v = tau_v_pos + tok_v if options["combine"] == "add" else tau_v_pos * (1.0 + tok_v)
    else:
      tau_v = jnp.ones(v.shape[:3], jnp.float32)
    # Cast to the activation dtype: an f32 temperature would silently upcast bf16 q / v (spec §4A).
    return tau_q.astype(q.dtype), tau_v.astype(v.dtype)
