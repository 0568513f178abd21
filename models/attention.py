"""Multi-head causal self-attention mixers over `ops.attention`: softmax (baseline) and Cog (signed).

Both support GQA and optional qk-norm.

The maths lives in `ops.attention`; this module only owns the projections and the decode KV cache.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.registry import register_mixer
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
    num_heads, num_kv_heads, head_dim = layers.attention_dims(cfg)
    batch, t, _ = x.shape
    q = layers.DenseGeneral((num_heads, head_dim), (layers.EMBED, layers.HEADS, layers.HEAD_DIM),
                            dtype=dtype, name="query")(x)
    k = layers.DenseGeneral((num_kv_heads, head_dim), (layers.EMBED, layers.KV_HEADS, layers.HEAD_DIM),
                            dtype=dtype, name="key")(x)
    v = layers.DenseGeneral((num_kv_heads, head_dim), (layers.EMBED, layers.KV_HEADS, layers.HEAD_DIM),
                            dtype=dtype, name="value")(x)
    if cfg.qk_norm:
      q = layers.RMSNorm(cfg.norm_eps, dtype, name="query_norm")(q)
      k = layers.RMSNorm(cfg.norm_eps, dtype, name="key_norm")(k)

    q_positions = kv_positions = None
    if self.decode:
      cache = layers.declare_kv_cache(self, k.shape, v.shape, k.dtype)
      # Absolute positions come from the cache index, so RoPE is right whatever the caller passes.
      positions = cache.positions(batch, t)
      segment_ids = None
    elif positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    q = layers.rope(q, positions, cfg.rope_theta)
    k = layers.rope(k, positions, cfg.rope_theta)
    if self.decode:
      k, v, q_positions, kv_positions = layers.cache_append(cache, k, v)

    o = attention(q, k, v, causal=True, segment_ids=segment_ids, signed=self.signed,
                  q_positions=q_positions, kv_positions=kv_positions,
                  impl=cfg.attention_impl or None, interpret=cfg.interpret)
    o = nn.with_logical_constraint(o, (layers.BATCH, layers.LENGTH, layers.ACT_HEADS, layers.HEAD_DIM))
    return layers.DenseGeneral((cfg.d_model,), (layers.HEADS, layers.HEAD_DIM, layers.EMBED), in_dims=2,
                               dtype=dtype, init_scale=(2 * cfg.num_layers) ** -0.5, name="out")(o)


@register_mixer("cog")
class CogAttention(SelfAttention):
  """Cog attention (specs/attention_variants.md §3.1): w = sign(s) * softmax(|s|). x [B,T,D] -> [B,T,D].

  Same parameters, RoPE, qk-norm option and KV cache as "softmax"; only the op's weights differ. Cog adds
  no parameters or hyperparameters (§3.1), so it reads no `config.model.cog` options. It lives here
  (DESIGN §5) since it is SelfAttention with one field changed; the §3.2 rule (softmax in the first and
  last layer) is the per-layer mixer list of configs/cog.py.
  """
  signed: bool = True
