"""Decoder-only byte-level language model shared by every token mixer, and its model family.

    ids -> embed -> N x [x + mixer(norm(x)); x + mlp(norm(x))] -> norm -> tied logits

The mixer of each layer comes from `config.model.mixer` (one name, or one name per layer) through
`models.registry`. With identical layers and `scan_layers=True` the stack is an `nn.scan` (params and cache
stacked on a leading "layers" axis); `remat` wraps each layer in activation checkpointing.

`TransformerFamily` ("transformer") is the model family (models/family.py) of this LM: causal_lm batches,
next-byte cross-entropy plus whatever the mixers sow into the "losses" collection, cached decoding. A
family that changes the token stream the layers see (landmark insertion, models/landmark.py) subclasses it
and returns a `stream` transform.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import decoding
from models import layers
from models.family import LOSSES_COLLECTION, ModelFamily, register_family
from models.registry import get_mixer
from ops import losses

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


class TransformerLM(nn.Module):
  """inputs [B, T] int ids -> logits [B, T, vocab_size] float32.

  `segment_ids` [B, T] (packed documents; 0 = padding) and `positions` [B, T] (within-segment positions)
  are optional. `decode=True` runs incrementally against the `cache` collection
  (`models.decoding.init_cache`).

  `stream` (optional, hashable): a callable `(lm, hidden_states, inputs, segment_ids, positions, *,
  decode) -> [B, T, D]` that maps the ids to the stream the layers see, calls `hidden_states(ids,
  segment_ids, positions)` on it (possibly inside `nn.cond`, passing `lm`) and maps the result back to one
  row per input token. None: the layers see the ids themselves.
  """
  config: Any
  decode: bool = False
  stream: Any = None

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

    if self.stream is None:
      x = hidden_states(inputs, segment_ids, positions)
    else:  # the stack runs on a transformed stream (e.g. inserted tokens), contracted back to [B, T, D]
      x = self.stream(self, hidden_states, inputs, segment_ids, positions, decode=self.decode)

    return layers.output_logits(cfg, embed, x, dtype)


def causal_lm_loss(logits: jax.Array, batch: dict[str, jax.Array], sown: Any, *, train: bool
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Next-byte objective of a causal_lm batch: (nll + aux * weight, metric sums) (see ModelFamily.loss).

  aux is the sum of everything sown into "losses" (e.g. selective attention's memory loss); weighted by the
  batch's target count, so after the caller divides by the summed weight the aux term is a mean.
  """
  nll, weight = losses.weighted_nll(logits, batch["targets"], batch["weights"])
  metrics = {"weight": weight, "nll": nll}
  objective = nll
  sown_terms = jax.tree.leaves(sown)
  if sown_terms:  # static: the tree's structure is known at trace time
    aux = sum((jnp.sum(x.astype(jnp.float32)) for x in sown_terms), jnp.zeros((), jnp.float32))
    metrics["aux_loss"] = aux * jax.lax.stop_gradient(weight)
    objective = nll + metrics["aux_loss"]
  if not train:
    metrics["correct"] = losses.weighted_correct(logits, batch["targets"], batch["weights"])
  return objective, metrics


@register_family("transformer")
class TransformerFamily(ModelFamily):
  """The decoder-only byte LM over packed byte windows (data/pipeline.py "causal_lm" batches)."""

  batch_format = "causal_lm"
  eval_tasks = ("bpb", "generate", "passkey", "mqar", "copy")

  def __init__(self, config: Any):
    super().__init__(config)
    for name in set(layer_mixers(self.config)):  # unknown mixer names fail here, before any work
      get_mixer(name)
    if self.config.remat != "none" and self.config.remat not in _REMAT_POLICIES:
      raise ValueError(f"unknown model.remat {self.config.remat!r}; expected none or one of "
                       f"{sorted(_REMAT_POLICIES)}.")

  def flops_per_byte(self, seq_len: int) -> dict[str, Any] | None:
    from models import flops  # noqa: PLC0415  (models/flops.py reads this module's helpers: import late)
    return flops.training_flops_per_byte(self.config, seq_len)

  def stream(self) -> Any:
    """The token-stream transform of `TransformerLM.stream` (None: the ids themselves)."""
    return None

  def module(self, *, decode: bool = False) -> nn.Module:
    return TransformerLM(self.config, decode=decode, stream=self.stream())

  def example_batch(self, batch_size: int, seq_len: int) -> dict[str, jax.Array]:
    ids = jnp.zeros((batch_size, seq_len), jnp.int32)
    return {"inputs": ids, "targets": ids, "segment_ids": ids + 1,
            "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), ids.shape),
            "weights": jnp.zeros(ids.shape, jnp.float32)}

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> Any:
    return self.module().init(rng, batch["inputs"])["params"]

  def loss(self, params: Any, batch: dict[str, jax.Array], *, rng: jax.Array | None = None,
           train: bool = True, aux_state: Any = None, step: jax.Array | None = None
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del rng, aux_state, step  # no dropout, no aux state
    logits, sown = self.module().apply({"params": params}, batch["inputs"], batch.get("segment_ids"),
                                       batch.get("positions"), mutable=[LOSSES_COLLECTION])
    return causal_lm_loss(logits, batch, sown, train=train)

  def generate(self, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new: int,
               temperature: float = 0.0, top_k: int = 0) -> jax.Array:
    return decoding.generate(self.module(decode=True), params, prompt, rng, max_new=max_new,
                             temperature=float(temperature), top_k=int(top_k))

