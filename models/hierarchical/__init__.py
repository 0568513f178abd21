"""Hierarchical byte LMs: bytes -> patches (or words) -> bytes, with pluggable boundaries and pooling.

    ids -> embed -> encoder byte layers -> boundaries b -> pool into S slots -> global stack (over slots)
        -> upsample (shifted gather) -> + residual -> decoder byte layers -> norm -> logits

specs/token_free.md §5.1 (dynamic token pooling; Hourglass §6 and SpaceByte §11 are configurations):
  s   = [s_null; Pool(h, b)]           group of byte t: g_t = sum_{i<t} b_i (exclusive cumsum)
  s'  = GlobalStack(Linear(s))         causal over slots; slot j + 1 holds group j
  u_t = s'[c_t],  c_t = sum_{i<=t} b_i (inclusive cumsum; 0 = the null group)
  h   = DecoderLayers(h + Linear(u))
Byte t reads its own group only if that group ends at t (b_t = 1), else the last completed one, so the
model is exactly causal whenever b_t depends on bytes <= t. b_t = 1 means "the group ends at byte t"
(ops/pooling); every EOS ends a group, so documents never share one.

Every layer is the flat LM's `models.transformer.Block`: the byte layers run `model.mixer`, the global
stack `model.hierarchical.global_mixer` (any registered mixer: softmax, gla, cog, landmark, ...), at its
own width. Packed documents stay apart: slots carry the segment of their group, and a byte whose read slot
belongs to another document reads the null slot instead.

Boundary sources (`model.hierarchical.boundaries`): "fixed" (every patch_size-th byte: Hourglass /
fixed-SF), "whitespace" (at the space, §5.2), "spacelike" (SpaceByte §11.1), "hat_words" (the HAT splitter
rule §4.1, host-side through a callback; the read of each word is delayed to the byte where it is known).
Trained sources (§5.2): a boundary predictor Linear(d, d_ff) -> GELU -> Linear(d_ff, 1) on the encoder's
byte states gives p_t = sigmoid(z_t) (causal: the encoder is). "learned" (Gumbel, end-to-end): in training
b_t = 1[b~_t > 0.5] for the relaxed Bernoulli sample b~ (`temperature`), with the straight-through
estimate passed to pooling so the LM loss reaches the predictor; the regulariser L_b = -log Binomial(
sum_t b_t; T, `prior`) / T. "entropy": b_t = 1[p_t > 0.5] always, and the predictor learns by BCE to imitate
the entropy spikes of the model's own next-byte distribution in the same forward pass (H from the final
logits under stop-gradient; `spikes_left`). That is circular, as in dynamic pooling: the logits depend on
the boundaries the predictor chose, H only supervises the predictor and never decides a boundary, so the
forward stays causal and generation prefix-stable. Either way evaluation and generation use 1[p_t > 0.5],
and the family adds the mean L_b / BCE ("boundary_loss") to the objective as an aux loss.
Capacity S (`capacity`, slots incl. the null one) is static: bytes of groups beyond it are not pooled, and
their targets are masked out of the loss and counted ("overflow_bytes"), SpaceByte's rule (§11.1), so bpb
never silently scores fewer bytes.

The other published models are configurations (options.py has each option's equation and source):
pooling "attention" (Hourglass/Funnel, §6), "latent" (HAT's encoder connector §4.3, Byte2Word §9, LYT's
prefix slot §8), "concat" (MEGABYTE's global input §10.1); upsampling "linear" / "attention" (Hourglass),
"slice" (MEGABYTE's W^GL), "cross" (HAT's predictive embedding), "boundary" (SpaceByte); patch-scoped byte
layers (MEGABYTE's local model, LYT's word encoder / decoder) and fresh decoder embeddings (E^l, E^l-pad);
"end_of_token" (Toucan §7, ops/pooling/end_of_token.py). The differences from each paper that a causal
byte stream forces are stated in the config files (configs/<model>.py).

Generation is incremental (model.py, HierarchicalLM(decode=True), one byte or token per call): the byte
layers on KV caches, the global stack stepped once per completed slot, the boundaries from the same rule
or predictor (Toucan: from the decoder's EOTs), equal to the parallel forward's logits within 1e-5.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import decoding
from models.family import LOSSES_COLLECTION, register_family
from models.hierarchical.model import BoundaryPredictor, HierarchicalLM, boundary_loss
from models.hierarchical.options import (BOUNDARY_RNG, BOUNDARY_SOURCES, CHOICES, EOT_ID, HIERARCHICAL_DEFAULTS,
                                         PREFIX_SOURCES, TRAINED_SOURCES, boundaries, capacity,
                                         global_config, group_width, hierarchical_config, options)
from models.registry import get_mixer
from models.transformer import TransformerFamily, causal_lm_loss
from ops import losses
from ops import pooling

TEXT_SOURCES = ("whitespace", "spacelike", "hat_words")  # boundary rules over UTF-8 text
SYNTHETIC_DATA_SOURCES = ("mqar",)  # data/corpora.py SYNTHETIC_SOURCES (models/ does not import data/)

__all__ = ["BOUNDARY_RNG", "BOUNDARY_SOURCES", "CHOICES", "EOT_ID", "HIERARCHICAL_DEFAULTS", "PREFIX_SOURCES",
           "TRAINED_SOURCES", "BoundaryPredictor", "HierarchicalFamily", "HierarchicalLM", "boundaries",
           "boundary_loss", "capacity", "global_config", "group_width", "hierarchical_config", "options"]


@register_family("hierarchical")
class HierarchicalFamily(TransformerFamily):
  """Hierarchical byte LM over the flat LM's causal_lm batches; metrics add the realised compression
  ("bytes_per_patch") and the overflow bytes masked out of the loss."""

  eval_tasks = ("bpb", "generate")
  count_keys = ("overflow_bytes", "patches", "real_bytes")

  def __init__(self, config: Any):
    super().__init__(config)
    opts = options(self.config)
    try:  # an unknown global mixer fails here, before any work
      get_mixer(opts["global_mixer"])
    except ValueError as e:
      raise ValueError(f"model.hierarchical.global_mixer: {e}") from None

  def module(self, *, decode: bool = False, train: bool = False) -> nn.Module:
    return HierarchicalLM(self.config, train=train, decode=decode)

  def check_data(self, data_config: Any) -> None:
    """Rule-based text boundaries (whitespace, spacelike, HAT words) need text; synthetic token streams
    (data.source=mqar) have no words, spaces or characters to split."""
    source, boundaries = getattr(data_config, "source", "bundled"), options(self.config)["boundaries"]
    if boundaries in TEXT_SOURCES and source in SYNTHETIC_DATA_SOURCES:
      raise ValueError(f"model.hierarchical.boundaries={boundaries!r} splits text into words, but "
                       f"data.source={source!r} is a synthetic id stream without word boundaries; use a text "
                       "source or boundaries='fixed' / 'learned' / 'entropy'.")

  def incremental(self) -> bool:
    """Whether generation can run incrementally (HierarchicalLM's decode step). Patch-scoped byte layers
    mask their KV cache by segment, which keeps the parallel forward's maths for mixers that see only
    relative positions (softmax, cog); others regenerate by recomputing the forward per byte."""
    opts = options(self.config)
    patch = "patch" in (opts["encoder_scope"], opts["decoder_scope"])
    return not patch or self.config.mixer in ("softmax", "cog")

  def loss(self, params: Any, batch: dict[str, jax.Array], *, rng: jax.Array | None = None,
           train: bool = True, aux_state: Any = None, step: jax.Array | None = None):
    """Next-byte loss over the bytes that fit, plus a trained source's boundary loss: "boundary_loss" (the
    mean L_b or BCE times the scored target count, so it is a mean once divided by "weight") is added to
    "aux_loss" and to the objective, dynamic pooling's unweighted CE + L_boundary. rng: the Gumbel noise
    of "learned" in training (None: a fixed key)."""
    del aux_state, step
    rngs = {BOUNDARY_RNG: jax.random.key(0) if rng is None else rng} if train else {}
    (logits, aux), sown = HierarchicalLM(self.config, with_aux=True, train=train).apply(
        {"params": params}, batch["inputs"], batch.get("segment_ids"), batch.get("positions"),
        rngs=rngs, mutable=[LOSSES_COLLECTION])
    if "layout" in aux:  # Toucan: the expanded stream's targets; the EOTs' bits are charged to the bytes
      targets, weights, byte_weights = pooling.eot_targets(batch["targets"], batch["weights"], aux["layout"],
                                                           EOT_ID)
      objective, metrics = causal_lm_loss(aux["expanded_logits"], {"targets": targets, "weights": weights}, sown,
                                          train=True)
      byte_weight = jnp.sum(byte_weights)
      if "aux_loss" in metrics:  # a mean per byte, as everywhere
        metrics["aux_loss"] = metrics["aux_loss"] / jnp.maximum(metrics["weight"], 1.0) * byte_weight
        objective = metrics["nll"] + metrics["aux_loss"]
      metrics["weight"] = byte_weight
      if not train:  # next-byte accuracy at the byte positions
        metrics["correct"] = losses.weighted_correct(logits, batch["targets"], byte_weights)
    else:
      kept = {**batch, "weights": jnp.where(aux["overflow"], 0.0, batch["weights"])}
      objective, metrics = causal_lm_loss(logits, kept, sown, train=train)
    if "boundary_loss" in aux:
      term = aux["boundary_loss"] * jax.lax.stop_gradient(metrics["weight"])
      metrics["boundary_loss"] = term
      metrics["aux_loss"] = metrics.get("aux_loss", jnp.zeros((), jnp.float32)) + term
      objective = objective + term
    metrics["overflow_bytes"] = jnp.sum(jnp.where(aux["overflow"], batch["weights"], 0.0))
    metrics["patches"] = jnp.sum(aux["patches"]).astype(jnp.float32)
    metrics["real_bytes"] = jnp.sum(batch["inputs"] > 0).astype(jnp.float32)
    return objective, metrics

  def summarize(self, sums: dict[str, Any]) -> dict[str, Any]:
    out = {"bytes_per_patch": sums["real_bytes"] / jnp.maximum(sums["patches"], 1.0),
           "overflow_bytes": sums["overflow_bytes"]}
    if "boundary_loss" in sums:  # the per-target mean, also in evaluation results
      out["boundary_loss"] = sums["boundary_loss"] / jnp.maximum(sums["weight"], 1.0)
    return out

  def generate(self, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new: int,
               temperature: float = 0.0, top_k: int = 0) -> jax.Array:
    if options(self.config)["end_of_token"]:  # Toucan: the decoder's EOTs decide the boundaries
      return decoding.generate_with_end_of_token(self.module(decode=True), params, prompt, rng, max_new=max_new,
                                                 eot_id=EOT_ID, temperature=float(temperature),
                                                 top_k=int(top_k))
    if not self.incremental():
      return decoding.generate_by_recompute(self.module(), params, prompt, rng, max_new=max_new,
                                            temperature=float(temperature), top_k=int(top_k))
    return decoding.generate_stepwise(self.module(decode=True), params, prompt, rng, max_new=max_new,
                                      temperature=float(temperature), top_k=int(top_k))
