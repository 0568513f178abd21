"""Shared building blocks: norms, gated MLPs, rotary embeddings, byte embedding, projections.

Every parameter is created with logical axis names (see `configs/base.py` LOGICAL_AXIS_RULES) so that
`training.sharding` can place it on the ("data", "fsdp", "tensor") mesh without knowing the model.
"""

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ops import rope as rope_op

# Logical axis names used on parameters and activations.
BATCH = "batch"
LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
EMBED = "embed"
VOCAB = "vocab"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP_AXIS = "mlp"
NORM = "norm"

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str | Any) -> Any:
  """'bfloat16' -> jnp.bfloat16; passes real dtypes through."""
  if isinstance(name, str):
    if name not in DTYPES:
      raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}.")
    return DTYPES[name]
  return name


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
  """Embedding rows rounded up to a multiple (ByT5: 259 -> 384) for TPU/GPU-friendly matmuls."""
  return -(-vocab_size // multiple) * multiple if multiple > 1 else vocab_size


class RMSNorm(nn.Module):
  """y = x / rms(x) * scale, computed in float32. x [..., D] -> [..., D] in `dtype`."""
  eps: float = 1e-6
  dtype: Any = jnp.float32
  axis_name: str = NORM

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


class DenseGeneral(nn.Module):
  """Linear map contracting the trailing `in_dims` axes of x into `features` (no bias).

  Kernel shape is in_shape + features, annotated with `axes` (len == in_dims + len(features)).
  Params stay in float32; the matmul runs in `dtype`.
  """
  features: Sequence[int]
  axes: Sequence[str]
  in_dims: int = 1
  dtype: Any = jnp.float32
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.in_dims:]
    fan_in = 1
    for d in in_shape:
      fan_in *= d
    init = nn.initializers.normal(stddev=self.init_scale * fan_in ** -0.5)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                        tuple(in_shape) + tuple(self.features), jnp.float32)
    # One 2-D matmul [rows, fan_in] x [fan_in, fan_out]: XLA:CPU runs the 3-D dot_general layout (and
    # especially its weight gradients) through transposing copies and a slower kernel. The reshapes are
    # free views, and the kernel keeps its logical axes, so sharding is unchanged.
    lead = x.shape[:x.ndim - self.in_dims]
    y = jnp.matmul(x.astype(self.dtype).reshape(-1, fan_in), kernel.astype(self.dtype).reshape(fan_in, -1))
    return y.reshape(lead + tuple(self.features))


class GatedMLP(nn.Module):
  """SwiGLU / GeGLU feed-forward (Shazeer 2020): wo(act(x wg) * (x wu)). x [B,T,D] -> [B,T,D]."""
  hidden_dim: int
  activation: str = "swiglu"
  dtype: Any = jnp.float32
  out_init_scale: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    acts = {"swiglu": nn.silu, "geglu": nn.gelu}
    if self.activation not in acts:
      raise ValueError(f"unknown mlp_activation {self.activation!r}; expected one of {sorted(acts)}.")
    d_model = x.shape[-1]
    gate = DenseGeneral((self.hidden_dim,), (EMBED, MLP_AXIS), dtype=self.dtype, name="wi_gate")(x)
    up = DenseGeneral((self.hidden_dim,), (EMBED, MLP_AXIS), dtype=self.dtype, name="wi_up")(x)
    h = acts[self.activation](gate) * up
    return DenseGeneral((d_model,), (MLP_AXIS, EMBED), dtype=self.dtype,
                        init_scale=self.out_init_scale, name="wo")(h)


def attention_dims(config: Any) -> tuple[int, int, int]:
  """(num_heads, num_kv_heads, head_dim) from the model config (0 means "derive")."""
  num_heads = config.num_heads
  num_kv_heads = config.num_kv_heads or num_heads
  head_dim = config.head_dim or config.d_model // num_heads
  if num_heads % num_kv_heads:
    raise ValueError(f"model.num_heads ({num_heads}) must be a multiple of model.num_kv_heads "
                     f"({num_kv_heads}).")
  return num_heads, num_kv_heads, head_dim


def qkv_projections(config: Any, x: jax.Array, dtype: Any
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The q, k, v projections every attention-like mixer shares. x [B, T, D] ->
  (q [B, T, H, Dh] after the optional qk-norm, W_q x [B, T, H, Dh] before it, k and v [B, T, Hkv, Dh]).

  Call it from a mixer's `nn.compact` method: the submodules ("query", "key", "value", "query_norm",
  "key_norm") are created in, and named under, the calling module.
  """
  num_heads, num_kv_heads, head_dim = attention_dims(config)
  q = DenseGeneral((num_heads, head_dim), (EMBED, HEADS, HEAD_DIM), dtype=dtype, name="query")(x)
  k = DenseGeneral((num_kv_heads, head_dim), (EMBED, KV_HEADS, HEAD_DIM), dtype=dtype, name="key")(x)
  v = DenseGeneral((num_kv_heads, head_dim), (EMBED, KV_HEADS, HEAD_DIM), dtype=dtype, name="value")(x)
  q_projection = q
  if config.qk_norm:
    q = RMSNorm(config.norm_eps, dtype, name="query_norm")(q)
    k = RMSNorm(config.norm_eps, dtype, name="key_norm")(k)
  return q, q_projection, k, v


def attention_output(config: Any, o: jax.Array, dtype: Any) -> jax.Array:
  """Heads back to the residual stream: o [B, T, H, Dh] -> [B, T, D] ("out", scaled init as the MLP's)."""
  o = nn.with_logical_constraint(o, (BATCH, LENGTH, ACT_HEADS, HEAD_DIM))
  return DenseGeneral((config.d_model,), (HEADS, HEAD_DIM, EMBED), in_dims=2, dtype=dtype,
                      init_scale=(2 * config.num_layers) ** -0.5, name="out")(o)


def default_mlp_dim(d_model: int) -> int:
  """SwiGLU width 8/3 * d_model rounded to a multiple of 64 (keeps FLOPs equal to a 4x GELU MLP)."""
  return max(64, int(round(8 * d_model / 3 / 64)) * 64)


def rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
  """Rotary position embedding (Su et al. 2021, eq. 34), rotate-half layout (`ops.rope.rope`).

  x [B, T, H, D] (D even), positions [B, T] int -> [B, T, H, D] in x.dtype. Angles in float32.
  """
  if x.shape[-1] % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {x.shape[-1]}.")
  return rope_op.rope(x, positions[:, :, None], theta).astype(x.dtype)


class Embed(nn.Module):
  """Byte embedding table [padded_vocab, D]; `attend` gives tied output logits."""
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), (VOCAB, EMBED)),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids [B, T] int -> [B, T, D]."""
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> logits [B, T, num_embeddings] (float32), scaled by D**-0.5 for unit-variance init."""
    w = self.embedding.astype(self.dtype)
    return jnp.einsum("btd,vd->btv", x.astype(self.dtype), w,
                      preferred_element_type=jnp.float32) * self.features ** -0.5


def output_logits(config: Any, embed: "Embed", x: jax.Array, dtype: Any) -> jax.Array:
  """The LM head of every byte LM: final norm, then tied (embed.attend) or untied ("unembed") logits.

  x [B, T, D] -> logits [B, T, config.vocab_size] f32 (the embedding's alignment rows dropped). Call it from
  a `nn.compact` method: "final_norm" and "unembed" are created in, and named under, the caller.
  """
  x = RMSNorm(config.norm_eps, dtype, name="final_norm")(x)
  if config.tie_embeddings:
    logits = embed.attend(x)
  else:
    logits = DenseGeneral((embed.num_embeddings,), (EMBED, VOCAB), dtype=dtype, name="unembed")(x)
  return logits.astype(jnp.float32)[..., :config.vocab_size]


# Decode-time KV cache, shared by every attention-like mixer. State lives in the module's `cache`
# collection; the first (init) call's input length sets the cache length.
_EMPTY_SLOT_POSITION = jnp.iinfo(jnp.int32).max  # later than any query: causal masking hides the slot


class KVCache(NamedTuple):
  """The decode cache variables of one mixer (Flax `Variable`s in the `cache` collection)."""
  keys: Any  # [B, S, Hkv, D]
  values: Any  # [B, S, Hkv, Dv]
  index: Any  # int32 scalar: number of filled slots
  initialized: bool  # False on the init call, which only creates the (zero) cache

  def positions(self, batch: int, t: int) -> jax.Array:
    """Absolute positions [B, T] of the T tokens about to be appended."""
    return jnp.broadcast_to(self.index.value + jnp.arange(t, dtype=jnp.int32), (batch, t))


def declare_kv_cache(module: nn.Module, k_shape: tuple, v_shape: tuple, dtype: Any) -> KVCache:
  """Creates (first call) or fetches `module`'s KV cache; the first call's length sets S."""
  initialized = module.has_variable("cache", "index")
  return KVCache(module.variable("cache", "keys", jnp.zeros, k_shape, dtype),
                 module.variable("cache", "values", jnp.zeros, v_shape, dtype),
                 module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32)), initialized)


def cache_append(cache: KVCache, k: jax.Array, v: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Appends k, v [B, T, Hkv, D] at the cache index.

  Returns (keys [B,S,Hkv,D], values [B,S,Hkv,Dv], q_positions [B,T], kv_positions [B,S]); unfilled slots get
  a position later than any query, so causal masking hides them. On the init call returns k, v unchanged.
  """
  batch, t = k.shape[:2]
  if not cache.initialized:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    return k, v, positions, positions
  start = cache.index.value
  q_positions = cache.positions(batch, t)
  cache_len = cache.keys.value.shape[1]
  cache.keys.value = jax.lax.dynamic_update_slice(cache.keys.value, k.astype(cache.keys.value.dtype),
                                                  (0, start, 0, 0))
  cache.values.value = jax.lax.dynamic_update_slice(cache.values.value, v.astype(cache.values.value.dtype),
                                                    (0, start, 0, 0))
  cache.index.value = start + t
  slots = jnp.arange(cache_len, dtype=jnp.int32)
  kv_positions = jnp.where(slots < start + t, slots, _EMPTY_SLOT_POSITION)
  return cache.keys.value, cache.values.value, q_positions, jnp.broadcast_to(kv_positions, (batch, cache_len))


def cache_segments(module: nn.Module, cache: KVCache, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Segment ids in decode mode: stores the T new tokens' ids [B, T] at the cache index (call it before
  `cache_append`) and returns (query ids [B, T], key ids [B, S]). On the init call both are the given ids.
  Unfilled slots keep id 0; causal masking hides them anyway."""
  stored = module.variable("cache", "segment_ids", jnp.zeros, (segment_ids.shape[0], cache.keys.value.shape[1]),
                           jnp.int32)
  if not cache.initialized:
    return segment_ids, segment_ids
  stored.value = jax.lax.dynamic_update_slice(stored.value, segment_ids.astype(jnp.int32),
                                              (0, cache.index.value))
  return segment_ids, stored.value
