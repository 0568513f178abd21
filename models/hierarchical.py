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
Capacity S (`capacity`, slots incl. the null one) is static: bytes of groups beyond it are not pooled, and
their targets are masked out of the loss and counted ("overflow_bytes"), SpaceByte's rule (§11.1), so bpb
never silently scores fewer bytes.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import decoding
from models import layers
from models.family import LOSSES_COLLECTION, freeze, register_family
from models.registry import get_mixer, mixer_options
from models.transformer import Block, TransformerFamily, causal_lm_loss
from ops import pooling

HIERARCHICAL_DEFAULTS: dict[str, Any] = {
    "boundaries": "fixed",  # fixed | whitespace | spacelike | hat_words
    "patch_size": 4,  # k of "fixed"
    "capacity": 0,  # slots per row (null slot included); 0 = seq_len // expected_patch + 1 (see capacity())
    "expected_patch": 4,  # bytes per patch that capacity=0 plans for (fixed: patch_size)
    "encoder_layers": 1,  # byte layers before pooling
    "decoder_layers": 1,  # byte layers after upsampling (>= 1: Hourglass §6 needs one)
    "global_layers": 2,
    "global_d_model": 0,  # 0 = model.d_model
    "global_num_heads": 0,  # 0 = model.num_heads
    "global_mixer": "softmax",
    "pooling": "mean",  # mean | sum | last  (§5.4: mean beats last)
    # gather: every byte gets its read slot (§5.1); boundary: only the boundary bytes do (SpaceByte's
    # x[idx] += y, §11.1), the later byte layers carry it on.
    "upsampling": "gather",
    # linear: learned maps between the byte and global widths; pad: SpaceByte's zero-padding up to the
    # global width and truncation to the last d_model dims on the way back (§11.1; needs global >= byte width).
    "projection": "linear",
    "max_word_bytes": 0,  # hat_words: words longer than this are split (0 = no limit)
}
BOUNDARY_SOURCES = ("fixed", "whitespace", "spacelike", "hat_words")


def options(config: Any) -> dict[str, Any]:
  opts = mixer_options(config, "hierarchical", HIERARCHICAL_DEFAULTS)
  if opts["boundaries"] not in BOUNDARY_SOURCES:
    raise ValueError(f"unknown model.hierarchical.boundaries {opts['boundaries']!r}; expected one of "
                     f"{', '.join(BOUNDARY_SOURCES)}.")
  if opts["pooling"] not in pooling.groups.MODES:
    raise ValueError(f"unknown model.hierarchical.pooling {opts['pooling']!r}; expected one of "
                     f"{', '.join(pooling.groups.MODES)}.")
  if opts["upsampling"] not in ("gather", "boundary"):
    raise ValueError(f"unknown model.hierarchical.upsampling {opts['upsampling']!r}; expected gather or "
                     "boundary.")
  if opts["projection"] not in ("linear", "pad"):
    raise ValueError(f"unknown model.hierarchical.projection {opts['projection']!r}; expected linear or pad.")
  if opts["decoder_layers"] < 1:
    raise ValueError("model.hierarchical.decoder_layers must be >= 1: without a byte layer after upsampling "
                     "each byte of a patch is predicted from the same vector (Hourglass §6).")
  return opts


def hierarchical_config() -> ml_collections.ConfigDict:
  """Every `config.model.hierarchical` option with its default, for config files."""
  return ml_collections.ConfigDict(dict(HIERARCHICAL_DEFAULTS))


def capacity(opts: dict[str, Any], seq_len: int) -> int:
  """Static slots per row: the configured capacity, or seq_len // expected patch + 1 (+1: the null slot)."""
  if opts["capacity"]:
    return int(opts["capacity"])
  expected = opts["patch_size"] if opts["boundaries"] == "fixed" else opts["expected_patch"]
  return -(-seq_len // expected) + 1


def _hat_boundaries(ids: jax.Array, max_bytes: int) -> tuple[jax.Array, jax.Array]:
  """HAT word ends and the bytes where each end becomes known, on the host (ops.pooling.hat_split)."""
  shape = jax.ShapeDtypeStruct(ids.shape, jnp.bool_)

  def host(ids):
    ends, known = pooling.hat_word_boundaries(np.asarray(ids), max_bytes or None, known=True)
    return np.asarray(ends, bool), np.asarray(known, bool)
  return jax.pure_callback(host, (shape, shape), ids, vmap_method="sequential")


def boundaries(ids: jax.Array, opts: dict[str, Any]) -> tuple[jax.Array, jax.Array | None]:
  """(b [B, T] bool, known [B, T] or None) for the configured source; b_t depends on ids <= t only."""
  source = opts["boundaries"]
  if source == "fixed":
    return pooling.fixed_boundaries(ids, opts["patch_size"]), None
  if source == "whitespace":
    return pooling.whitespace_boundaries(ids), None
  if source == "spacelike":
    return pooling.spacelike_boundaries(ids), None
  return _hat_boundaries(ids, opts["max_word_bytes"])


def global_config(config: Any, opts: dict[str, Any]) -> Any:
  """The model config the global stack's blocks see: its own width, heads and mixer."""
  g = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  g["d_model"] = opts["global_d_model"] or config.d_model
  g["num_heads"] = opts["global_num_heads"] or config.num_heads
  g["num_kv_heads"], g["head_dim"], g["mlp_dim"] = 0, 0, 0
  g["num_layers"] = opts["global_layers"]
  g["mixer"] = opts["global_mixer"]
  return freeze(ml_collections.ConfigDict(g))


class HierarchicalLM(nn.Module):
  """inputs [B, T] -> logits [B, T, vocab] f32 (the interface every autoregressive byte model shares).

  with_aux: also return overflow [B, T] bool (bytes whose group did not fit) and the groups per row [B].
  """
  config: Any
  with_aux: bool = False

  @nn.compact
  def __call__(self, inputs: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None):
    cfg = self.config
    opts = options(cfg)
    dtype = layers.dtype_of(cfg.dtype)
    b, t = inputs.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    embed = layers.Embed(layers.padded_vocab_size(cfg.vocab_size, cfg.vocab_pad_multiple), cfg.d_model, dtype,
                         name="embed")
    x = embed(inputs)
    for i in range(opts["encoder_layers"]):
      x = Block(cfg, cfg.mixer, layer_index=i, name=f"encoder_layer_{i}")(x, segment_ids, positions)

    ends, known = boundaries(inputs, opts)
    groups = pooling.group_ids(ends, capacity(opts, t), known=known,
                               rule="inclusive" if known is None else "exclusive")
    null = self.param("null_group", nn.with_logical_partitioning(nn.initializers.normal(1.0), (layers.NORM,)),
                      (cfg.d_model,), jnp.float32)
    slots, _ = pooling.pool(x.astype(jnp.float32), groups, mode=opts["pooling"], null=null)
    # Each slot carries its group's document; the null slot (0) is a segment of its own (0).
    slot_segments = pooling.pool(segment_ids[..., None].astype(jnp.float32), groups, mode="last")[0][..., 0]
    slot_segments = jnp.round(slot_segments).astype(jnp.int32)

    gcfg = global_config(cfg, opts)
    if opts["projection"] == "pad":
      if gcfg.d_model < cfg.d_model:
        raise ValueError("model.hierarchical.projection='pad' needs global_d_model >= d_model.")
      s = jnp.pad(slots, ((0, 0), (0, 0), (gcfg.d_model - cfg.d_model, 0))).astype(dtype)
    else:
      s = layers.DenseGeneral((gcfg.d_model,), (layers.EMBED, layers.MLP_AXIS), dtype=dtype, name="down")(slots)
      s = layers.RMSNorm(cfg.norm_eps, dtype, name="down_norm")(s)
    slot_positions = jnp.broadcast_to(jnp.arange(s.shape[1], dtype=jnp.int32), s.shape[:2])
    for i in range(opts["global_layers"]):
      s = Block(gcfg, gcfg.mixer, layer_index=i, name=f"global_layer_{i}")(s, slot_segments, slot_positions)
    if opts["projection"] == "pad":
      s = s[..., gcfg.d_model - cfg.d_model:]
    else:
      s = layers.DenseGeneral((cfg.d_model,), (layers.MLP_AXIS, layers.EMBED), dtype=dtype, name="up")(s)

    u = pooling.upsample(s, groups)
    read = jnp.where(groups.overflow, groups.capacity - 1, groups.reads)
    same_document = jnp.take_along_axis(slot_segments, read, axis=1) == segment_ids
    u = jnp.where(same_document[..., None], u, s[:, :1])  # another document's slot: the null slot instead
    if opts["upsampling"] == "boundary":
      u = jnp.where((ends & ~groups.overflow)[..., None], u, jnp.zeros((), u.dtype))
    x = x + u
    for i in range(opts["decoder_layers"]):
      x = Block(cfg, cfg.mixer, layer_index=i, name=f"decoder_layer_{i}")(x, segment_ids, positions)
    x = layers.RMSNorm(cfg.norm_eps, dtype, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.DenseGeneral((embed.num_embeddings,), (layers.EMBED, layers.VOCAB), dtype=dtype,
                                   name="unembed")(x).astype(jnp.float32)
    logits = logits[..., :cfg.vocab_size]
    if not self.with_aux:
      return logits
    return logits, groups.overflow, jnp.minimum(groups.counts, groups.capacity - 1)


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

  def module(self, *, decode: bool = False) -> nn.Module:
    del decode  # generation recomputes the forward (no cache yet)
    return HierarchicalLM(self.config)

  def loss(self, params: Any, batch: dict[str, jax.Array], *, rng: jax.Array | None = None,
           train: bool = True, aux_state: Any = None, step: jax.Array | None = None):
    del rng, aux_state, step
    (logits, overflow, patches), sown = HierarchicalLM(self.config, with_aux=True).apply(
        {"params": params}, batch["inputs"], batch.get("segment_ids"), batch.get("positions"),
        mutable=[LOSSES_COLLECTION])
    kept = {**batch, "weights": jnp.where(overflow, 0.0, batch["weights"])}
    objective, metrics = causal_lm_loss(logits, kept, sown, train=train)
    metrics["overflow_bytes"] = jnp.sum(jnp.where(overflow, batch["weights"], 0.0))
    metrics["patches"] = jnp.sum(patches).astype(jnp.float32)
    metrics["real_bytes"] = jnp.sum(batch["inputs"] > 0).astype(jnp.float32)
    return objective, metrics

  def summarize(self, sums: dict[str, Any]) -> dict[str, Any]:
    return {"bytes_per_patch": sums["real_bytes"] / jnp.maximum(sums["patches"], 1.0),
            "overflow_bytes": sums["overflow_bytes"]}

  def generate(self, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new: int,
               temperature: float = 0.0, top_k: int = 0) -> jax.Array:
    return decoding.generate_by_recompute(self.module(), params, prompt, rng, max_new=max_new,
                                          temperature=float(temperature), top_k=int(top_k))
