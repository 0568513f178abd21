"""Decoder-only byte-level language model shared by every token mixer.

    ids -> embed -> N x [x + mixer(norm(x)); x + mlp(norm(x))] -> norm -> tied logits

The mixer of each layer comes from `config.model.mixer` (one name, or one name per layer) through
`models.registry`. With identical layers and `scan_layers=True` the stack is an `nn.scan` (params and cache
stacked on a leading "layers" axis); `remat` wraps each layer in activation checkpointing.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.registry import get_mixer, register_model

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_mixers(config: Any) -> tuple[str, ...]:
  """The mixer name of every layer: `model.mixer` is a name or a list with one name per layer."""
  mixer = config.mixer
  if isinstance(mixer, str):
    return (mixer,) * config.num_layers
  mixer = tuple(mixer)
  if len(mixer) != config.num_layers:
    raise ValueError(f"model.mixer lists {len(mixer)} mixers but model.num_layers is {config.num_layers}.")
  return mixer


def stream_transform(config: Any, mixers: tuple[str, ...]) -> Any:
  """The stream transform of the first mixer class that has one, or None (the plain token stream).

  A mixer class may define a classmethod `stream_transform(model_config)` returning None or a callable
  `(lm_module, hidden_states, inputs, segment_ids, positions, *, decode) -> [B, T, D]` that maps the ids to
  the stream the layers see, calls `hidden_states(ids, segment_ids, positions)` on it (possibly inside
  `nn.cond`, passing `lm_module`) and maps the result back to one row per input token.
  """
  for name in dict.fromkeys(mixers):
    hook = getattr(get_mixer(name), "stream_transform", None)
    transform = hook(config) if hook is not None else None
    if transform is not None:
      return transform
  return None


class Block(nn.Module):
  """Pre-norm residual block. x [B, T, D] -> [B, T, D] (returns (x, None) under nn.scan)."""
  config: Any
  mixer: str
  layer_index: int = 0
  decode: bool = False
  scanned: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None):
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    mixer_cls = get_mixer(self.mixer)
    h = layers.RMSNorm(cfg.norm_eps, dtype, name="mixer_norm")(x)
    h = mixer_cls(config=cfg, layer_index=self.layer_index, decode=self.decode, name="mixer")(
        h, segment_ids, positions)
    x = x + h
    h = layers.RMSNorm(cfg.norm_eps, dtype, name="mlp_norm")(x)
    h = layers.GatedMLP(cfg.mlp_dim or layers.default_mlp_dim(cfg.d_model), cfg.mlp_activation, dtype,
                        out_init_scale=(2 * cfg.num_layers) ** -0.5, name="mlp")(h)
    x = nn.with_logical_constraint(x + h, (layers.BATCH, layers.LENGTH, layers.ACT_EMBED))
    return (x, None) if self.scanned else x


@register_model("transformer")
class TransformerLM(nn.Module):
  """inputs [B, T] int ids -> logits [B, T, vocab_size] float32.

  `segment_ids` [B, T] (packed documents; 0 = padding) and `positions` [B, T] (within-segment positions)
  are optional. `decode=True` runs incrementally against the `cache` collection (see `init_cache`).
  """
  config: Any
  decode: bool = False

  @nn.compact
  def __call__(self, inputs: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    mixers = layer_mixers(cfg)
    embed = layers.Embed(layers.padded_vocab_size(cfg.vocab_size, cfg.vocab_pad_multiple), cfg.d_model,
                         dtype, name="embed")

    block = Block
    if cfg.remat != "none":
      if cfg.remat not in _REMAT_POLICIES:
        raise ValueError(f"unknown model.remat {cfg.remat!r}; expected none or one of "
                         f"{sorted(_REMAT_POLICIES)}.")
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)

    def hidden_states(ids, segment_ids, positions):
      """ids [B, N] -> the layer stack's output [B, N, D] (also called inside a stream transform)."""
      x = nn.with_logical_constraint(embed(ids), (layers.BATCH, layers.LENGTH, layers.ACT_EMBED))
      if cfg.scan_layers and len(set(mixers)) == 1:
        # "losses": auxiliary losses sown by mixers (e.g. selective's memory loss), stacked per layer.
        stack = nn.scan(block, variable_axes={"params": 0, "cache": 0, "losses": 0},
                        split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(cfg, mixers[0], decode=self.decode, scanned=True, name="layers")(
            x, segment_ids, positions)[0]
      for i, mixer in enumerate(mixers):
        x = block(cfg, mixer, layer_index=i, decode=self.decode, name=f"layer_{i}")(
            x, segment_ids, positions)
      return x

    transform = stream_transform(cfg, mixers)
    if transform is None:
      x = hidden_states(inputs, segment_ids, positions)
    else:  # the stack runs on a transformed stream (e.g. inserted tokens), contracted back to [B, T, D]
      x = transform(self, hidden_states, inputs, segment_ids, positions, decode=self.decode)

    x = layers.RMSNorm(cfg.norm_eps, dtype, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.DenseGeneral((embed.num_embeddings,), (layers.EMBED, layers.VOCAB), dtype=dtype,
                                   name="unembed")(x).astype(jnp.float32)
    return logits[..., :cfg.vocab_size]  # drop the alignment padding rows


def init_cache(model: nn.Module, batch_size: int, max_len: int) -> Any:
  """Zero decode cache for `model` (which must have decode=True), for sequences up to max_len tokens."""
  dummy = jnp.zeros((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

