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
    "boundaries": "fixed",  # fixed | whitespace | spacelike | hat_words | learned | entropy
    "patch_size": 4,  # k of "fixed"
    "capacity": 0,  # slots per row (null slot included); 0 = seq_len // expected_patch + 1 (see capacity())
    "expected_patch": 4,  # bytes per patch that capacity=0 plans for (fixed: patch_size)
    "encoder_layers": 1,  # byte layers before pooling
    "decoder_layers": 1,  # byte layers after upsampling (>= 1: Hourglass §6 needs one)
    "global_layers": 2,
    "global_d_model": 0,  # 0 = model.d_model
    "global_num_heads": 0,  # 0 = model.num_heads
    "global_mixer": "softmax",
    # mean | sum | last (§5.4: mean beats last); attention: Hourglass/Funnel attention pooling (§6: the mean
    # as query over its group's bytes, then an MLP); latent: HAT's encoder connector (§4.3: one learned
    # query cross-attends to the word's bytes; Byte2Word §9, LYT's prefix slot §8); concat: the group's
    # bytes side by side (MEGABYTE's global input §10.1, Hourglass LinearPool), `width` of them.
    "pooling": "mean",
    # gather: every byte gets its read slot (§5.1); boundary: only the boundary bytes do (SpaceByte's
    # x[idx] += y, §11.1), the later byte layers carry it on; linear: Linear(global -> width x d), byte t
    # takes slice o_t (its read offset; Hourglass LinearUpsampling §6); slice: MEGABYTE's W^GL on slice o_t
    # of the global output (§10.1, global_d_model = width x slice); attention: Hourglass attention
    # upsampling (§6: U = x + linear, U + Attn(U, readable slots), then an MLP); cross: HAT's decoder (§4.3:
    # before each decoder layer h += CrossAttn(RMSNorm(h), RMSNorm(p)) over the one predictive embedding).
    "upsampling": "gather",
    # linear: learned maps between the byte and global widths; pad: SpaceByte's zero-padding up to the
    # global width and truncation to the last d_model dims on the way back (§11.1; needs global >= byte width).
    "projection": "linear",
    # stream: byte layers attend over the whole (causal) byte stream; patch: only within their group
    # (encoder; LYT's word encoder) or their read run (decoder; MEGABYTE's local model, LYT's word decoder).
    "encoder_scope": "stream",
    "decoder_scope": "stream",
    # encoder: the decoder continues the encoder's byte states (Hourglass, dynamic pooling, HAT); embed:
    # from a fresh byte embedding (MEGABYTE's E^l, LYT's canvas); embed_pad: the same with a learned pad at
    # read offset 0 (MEGABYTE's E^l-pad: the first byte of a patch is predicted from the global state alone).
    "decoder_input": "encoder",
    "width": 0,  # bytes per group for concat / linear / slice / attention upsampling (0 = patch_size)
    "max_word_bytes": 0,  # hat_words: words longer than this are split (0 = no limit)
    # learned | entropy: hidden width d_ff of the boundary predictor Linear(d, d_ff) -> GELU -> Linear(d_ff,
    # 1) (0 = the byte layers' MLP width, model.mlp_dim or its default; dynamic pooling uses d_inner).
    "predictor_dim": 0,
    "temperature": 0.5,  # learned: tau of the relaxed Bernoulli (Gumbel-sigmoid) training sample
    "prior": 0.2,  # learned: alpha of the Binomial prior L_b = -log Binomial(sum_t b_t; T, alpha) / T
    "spikes_left": 2,  # entropy: k, the target b_t = 1 iff H_t > H_{t-i} for every i = 1..k
}
BOUNDARY_SOURCES = ("fixed", "whitespace", "spacelike", "hat_words", "learned", "entropy")
TRAINED_SOURCES = ("learned", "entropy")  # boundaries from a predictor, with a boundary loss
BOUNDARY_RNG = "boundaries"  # the rng stream of the "learned" source's Gumbel noise (training)


CHOICES = {
    "boundaries": BOUNDARY_SOURCES,
    "pooling": pooling.groups.MODES + ("attention", "latent", "concat"),
    "upsampling": ("gather", "boundary", "linear", "slice", "attention", "cross"),
    "projection": ("linear", "pad"),
    "encoder_scope": ("stream", "patch"),
    "decoder_scope": ("stream", "patch"),
    "decoder_input": ("encoder", "embed", "embed_pad"),
}
USES_WIDTH = {"pooling": ("concat",), "upsampling": ("linear", "slice", "attention")}
# Sources whose b_t is a function of bytes <= t: a group's membership never depends on later bytes.
PREFIX_SOURCES = ("fixed", "whitespace", "spacelike")


def options(config: Any) -> dict[str, Any]:
  opts = mixer_options(config, "hierarchical", HIERARCHICAL_DEFAULTS)
  for key, choices in CHOICES.items():
    if opts[key] not in choices:
      raise ValueError(f"unknown model.hierarchical.{key} {opts[key]!r}; expected one of {', '.join(choices)}.")
  if not opts["temperature"] > 0:
    raise ValueError(f"model.hierarchical.temperature must be > 0, got {opts['temperature']}.")
  if not 0 < opts["prior"] < 1:
    raise ValueError(f"model.hierarchical.prior must be in (0, 1), got {opts['prior']}.")
  if opts["spikes_left"] < 1:
    raise ValueError(f"model.hierarchical.spikes_left must be >= 1, got {opts['spikes_left']}.")
  if opts["decoder_layers"] < 1:
    raise ValueError("model.hierarchical.decoder_layers must be >= 1: without a byte layer after upsampling "
                     "each byte of a patch is predicted from the same vector (Hourglass §6).")
  if any(opts[k] in v for k, v in USES_WIDTH.items()) and group_width(opts) < 1:
    raise ValueError(f"model.hierarchical.pooling={opts['pooling']!r} / upsampling={opts['upsampling']!r} "
                     "need model.hierarchical.width > 0 (bytes per group) unless boundaries='fixed'.")
  if opts["encoder_scope"] == "patch" and opts["boundaries"] not in PREFIX_SOURCES:
    raise ValueError("model.hierarchical.encoder_scope='patch' needs boundaries decided by the bytes so far "
                     f"({', '.join(PREFIX_SOURCES)}), not {opts['boundaries']!r}.")
  return opts


def group_width(opts: dict[str, Any]) -> int:
  """Bytes per group of the width-based pooling / upsampling: `width`, or patch_size for fixed patches."""
  if opts["width"]:
    return int(opts["width"])
  return int(opts["patch_size"]) if opts["boundaries"] == "fixed" else 0


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
  """(b [B, T] bool, known [B, T] or None) for a rule-based source; b_t depends on ids <= t only."""
  source = opts["boundaries"]
  if source == "fixed":
    return pooling.fixed_boundaries(ids, opts["patch_size"]), None
  if source == "whitespace":
    return pooling.whitespace_boundaries(ids), None
  if source == "spacelike":
    return pooling.spacelike_boundaries(ids), None
  if source == "hat_words":
    return _hat_boundaries(ids, opts["max_word_bytes"])
  raise ValueError(f"boundaries {source!r} come from the model's predictor (HierarchicalLM), not from ids.")


def global_config(config: Any, opts: dict[str, Any]) -> Any:
  """The model config the global stack's blocks see: its own width, heads and mixer."""
  g = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  g["d_model"] = opts["global_d_model"] or config.d_model
  g["num_heads"] = opts["global_num_heads"] or config.num_heads
  g["num_kv_heads"], g["head_dim"], g["mlp_dim"] = 0, 0, 0
  g["num_layers"] = opts["global_layers"]
  g["mixer"] = opts["global_mixer"]
  return freeze(ml_collections.ConfigDict(g))


class BoundaryPredictor(nn.Module):
  """Dynamic pooling's boundary predictor (§5.2): x [B, T, D] -> logits z [B, T] f32, p = sigmoid(z), by
  Linear(D, hidden_dim) -> GELU (exact, torch's nn.GELU) -> Linear(hidden_dim, 1), both with biases."""
  hidden_dim: int
  dtype: Any = jnp.float32

  def _bias(self, name, shape, axes):
    return self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.DenseGeneral((self.hidden_dim,), (layers.EMBED, layers.MLP_AXIS), dtype=self.dtype, name="wi")(x)
    h = nn.gelu(h + self._bias("wi_bias", (self.hidden_dim,), (layers.MLP_AXIS,)).astype(h.dtype),
                approximate=False)
    z = layers.DenseGeneral((1,), (layers.MLP_AXIS, None), dtype=self.dtype, name="wo")(h)[..., 0]
    return z.astype(jnp.float32) + self._bias("wo_bias", (), ())


def boundary_loss(opts: dict[str, Any], inputs: jax.Array, segment_ids: jax.Array, z: jax.Array,
                  straight: jax.Array, logits: jax.Array) -> jax.Array:
  """The trained source's loss (a scalar mean): "learned", the Binomial prior L_b averaged over rows (n and
  k over the non-pad bytes: n = T in a packed window); "entropy", the BCE of the predictor's logits z
  against the entropy spikes of stopgrad(logits), averaged over the bytes the predictor decides (not PAD or
  EOS). Spikes compare within a document only."""
  valid = inputs != pooling.boundaries.PAD_ID
  if opts["boundaries"] == "learned":
    return jnp.mean(pooling.binomial_prior_loss(straight, opts["prior"], valid))
  entropy = pooling.next_byte_entropy(jax.lax.stop_gradient(logits))
  targets = pooling.entropy_spikes(entropy, opts["spikes_left"], segment_ids)
  decided = valid & (inputs != pooling.boundaries.EOS_ID)
  bce = jnp.where(decided, pooling.sigmoid_bce(z, targets), 0.0)
  return jnp.sum(bce) / jnp.maximum(jnp.sum(decided), 1).astype(jnp.float32)


class SlotAttention(nn.Module):
  """Cross-attention between bytes and slots under a [B, Q, K] mask (ops.pooling.masked_attention):
  queries [B, Q, Dq], memory [B, K, Dm] -> [B, Q, out_dim]; heads and head width of `config` (the byte
  layers'). No positions: the byte states are already ordered by the causal encoder."""
  config: Any
  out_dim: int

  @nn.compact
  def __call__(self, queries: jax.Array, memory: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    h, _, dh = layers.attention_dims(cfg)
    proj = lambda name, x: layers.DenseGeneral((h, dh), (layers.EMBED, layers.HEADS, layers.HEAD_DIM),
                                               dtype=dtype, name=name)(x)
    o = pooling.masked_attention(proj("query", queries), proj("key", memory), proj("value", memory), mask)
    return layers.DenseGeneral((self.out_dim,), (layers.HEADS, layers.HEAD_DIM, layers.EMBED), in_dims=2,
                               dtype=dtype, name="out")(o)


class PredictiveEmbedding(nn.Module):
  """HAT's decoder cross-attention to one predictive embedding (§4.3): a softmax over a single key is 1,
  so CrossAttn(q = RMSNorm(h), kv = RMSNorm(p)) = W_o W_v RMSNorm(p) exactly; p [B, S, Dg] -> [B, S, D]
  (per slot; each byte then takes its read slot's). The query and key projections cannot change the
  output (nor get a gradient) and are not built."""
  config: Any

  @nn.compact
  def __call__(self, p: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    h, _, dh = layers.attention_dims(cfg)
    v = layers.DenseGeneral((h, dh), (layers.EMBED, layers.HEADS, layers.HEAD_DIM), dtype=dtype,
                            name="value")(layers.RMSNorm(cfg.norm_eps, dtype, name="norm")(p))
    return layers.DenseGeneral((cfg.d_model,), (layers.HEADS, layers.HEAD_DIM, layers.EMBED), in_dims=2,
                               dtype=dtype, name="out")(v)


def _mlp(cfg: Any, x: jax.Array, dtype: Any, name: str) -> jax.Array:
  """x + MLP(RMSNorm(x)), the feed-forward half of a block (Hourglass's resampling layers end with one)."""
  h = layers.RMSNorm(cfg.norm_eps, dtype, name=f"{name}_norm")(x)
  return x + layers.GatedMLP(cfg.mlp_dim or layers.default_mlp_dim(cfg.d_model), cfg.mlp_activation, dtype,
                             name=name)(h)


class HierarchicalLM(nn.Module):
  """inputs [B, T] -> logits [B, T, vocab] f32 (the interface every autoregressive byte model shares).

  with_aux: return (logits, aux): aux["overflow"] [B, T] bool (bytes whose group did not fit),
  aux["patches"] [B] (stored groups per row) and, for a trained source, aux["boundary_loss"] (scalar).
  train: the "learned" source samples its boundaries (Gumbel noise from the BOUNDARY_RNG stream, which
  `apply` then needs: rngs={"boundaries": key}); otherwise every source is deterministic.
  """
  config: Any
  with_aux: bool = False
  train: bool = False

  def _byte_layers(self, x, prefix, count, segment_ids, positions):
    for i in range(count):
      x = Block(self.config, self.config.mixer, layer_index=i, name=f"{prefix}_layer_{i}")(
          x, segment_ids, positions)
    return x

  def _pool(self, opts, x, groups, segment_ids, straight):
    """Byte states [B, T, D] -> slots [B, S, D or width * D] (slot 0: the learned null group)."""
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    mode = opts["pooling"]
    width = group_width(opts) if mode == "concat" else 1
    null = self.param("null_group", nn.with_logical_partitioning(nn.initializers.normal(1.0), (layers.NORM,)),
                      (width * cfg.d_model,), jnp.float32)
    if mode == "concat":
      return pooling.concat_pool(x, groups, width, segment_ids, null)
    # "learned": the straight-through b makes the pooled groups differentiable in b (ops.pooling.pool).
    base = "mean" if mode in ("attention", "latent") else mode
    slots, _ = pooling.pool(x.astype(jnp.float32), groups, mode=base, null=null,
                            boundaries=straight if opts["boundaries"] == "learned" else None)
    if mode == base:
      return slots
    slots = slots.astype(dtype)
    if mode == "latent":  # HAT connector: e_j = CrossAttn(q = latent, kv = bytes of group j)
      latent = self.param("latent_query", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                       (layers.NORM,)), (cfg.d_model,),
                          jnp.float32)
      queries = jnp.broadcast_to(latent.astype(dtype), slots.shape)
      kv = layers.RMSNorm(cfg.norm_eps, dtype, name="pool_kv_norm")(x)
      pooled = SlotAttention(cfg, cfg.d_model, name="pool_attention")(queries, kv, pooling.pooling_mask(groups))
    else:  # Hourglass attention pooling: S(x) + Attn(Q = S(x), K = V = x of the group), S = the mean
      q = layers.RMSNorm(cfg.norm_eps, dtype, name="pool_query_norm")(slots)
      kv = layers.RMSNorm(cfg.norm_eps, dtype, name="pool_kv_norm")(x)
      pooled = _mlp(cfg, slots + SlotAttention(cfg, cfg.d_model, name="pool_attention")(
          q, kv, pooling.pooling_mask(groups)), dtype, "pool_mlp")
    return pooled.at[:, 0].set(null.astype(dtype))

  def _to_global(self, opts, slots, gcfg, dtype):
    if opts["projection"] == "pad":
      if gcfg.d_model < slots.shape[-1]:
        raise ValueError(f"model.hierarchical.projection='pad' needs global_d_model >= the pooled width "
                         f"{slots.shape[-1]}, got {gcfg.d_model}.")
      return jnp.pad(slots, ((0, 0), (0, 0), (gcfg.d_model - slots.shape[-1], 0))).astype(dtype)
    s = layers.DenseGeneral((gcfg.d_model,), (layers.EMBED, layers.MLP_AXIS), dtype=dtype, name="down")(slots)
    return layers.RMSNorm(self.config.norm_eps, dtype, name="down_norm")(s)

  def _to_bytes(self, opts, s, dtype):
    """Global slots [B, S, Dg] -> [B, S, D] (linear "up", or SpaceByte's truncation to the last D dims)."""
    d = self.config.d_model
    if opts["projection"] == "pad":
      return s[..., s.shape[-1] - d:]
    return layers.DenseGeneral((d,), (layers.MLP_AXIS, layers.EMBED), dtype=dtype, name="up")(s)

  def _linear_upsample(self, opts, s, gather, offsets, dtype):
    """Hourglass LinearUpsampling: Linear(Dg -> width x D) of each slot, byte t takes slice o_t of its read
    slot's."""
    width, d = group_width(opts), self.config.d_model
    y = layers.DenseGeneral((width * d,), (layers.MLP_AXIS, layers.EMBED), dtype=dtype, name="up_linear")(s)
    return pooling.offset_slices(gather(y), offsets, width)

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
    vocab = layers.padded_vocab_size(cfg.vocab_size, cfg.vocab_pad_multiple)
    embed = layers.Embed(vocab, cfg.d_model, dtype, name="embed")
    x = embed(inputs)

    source, z, straight, known = opts["boundaries"], None, None, None
    if source in TRAINED_SOURCES:
      x = self._byte_layers(x, "encoder", opts["encoder_layers"], segment_ids, positions)
      z = BoundaryPredictor(opts["predictor_dim"] or cfg.mlp_dim or layers.default_mlp_dim(cfg.d_model), dtype,
                            name="boundary_predictor")(x)
      sample = self.train and source == "learned"
      uniform = jax.random.uniform(self.make_rng(BOUNDARY_RNG), z.shape) if sample else None
      ends, straight = pooling.learned_boundaries(z, inputs, uniform=uniform, temperature=opts["temperature"])
    else:
      ends, known = boundaries(inputs, opts)
    groups = pooling.group_ids(ends, capacity(opts, t), known=known,
                               rule="inclusive" if known is None else "exclusive")
    if source not in TRAINED_SOURCES:
      if opts["encoder_scope"] == "patch":  # each group on its own (causal within it)
        x = self._byte_layers(x, "encoder", opts["encoder_layers"], pooling.run_ids(groups.exclusive, segment_ids),
                              pooling.group_offsets(groups, segment_ids))
      else:
        x = self._byte_layers(x, "encoder", opts["encoder_layers"], segment_ids, positions)

    slots = self._pool(opts, x, groups, segment_ids, straight)
    # Each slot carries its group's document; the null slot (0) is a segment of its own (0).
    slot_segments = pooling.pool(segment_ids[..., None].astype(jnp.float32), groups, mode="last")[0][..., 0]
    slot_segments = jnp.round(slot_segments).astype(jnp.int32)

    gcfg = global_config(cfg, opts)
    s = self._to_global(opts, slots, gcfg, dtype)
    slot_positions = jnp.broadcast_to(jnp.arange(s.shape[1], dtype=jnp.int32), s.shape[:2])
    for i in range(opts["global_layers"]):
      s = Block(gcfg, gcfg.mixer, layer_index=i, name=f"global_layer_{i}")(s, slot_segments, slot_positions)

    # The slot byte t reads: its read slot, the last stored one for overflow bytes, and the null slot when
    # that slot belongs to another document.
    read = jnp.where(groups.overflow, groups.capacity - 1, groups.reads)
    read = jnp.where(jnp.take_along_axis(slot_segments, read, axis=1) == segment_ids, read, 0)
    gather = lambda v: jnp.take_along_axis(v, read[..., None], axis=1)
    offsets = pooling.read_offsets(read, segment_ids)

    h = x
    if opts["decoder_input"] != "encoder":  # MEGABYTE / LYT: the decoder embeds the bytes afresh
      embed = layers.Embed(vocab, cfg.d_model, dtype, name="decoder_embed")
      h = embed(inputs)
      if opts["decoder_input"] == "embed_pad":
        pad = self.param("decoder_pad", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                     (layers.NORM,)), (cfg.d_model,), jnp.float32)
        h = jnp.where((offsets == 0)[..., None], pad.astype(dtype), h)
    mode = opts["upsampling"]
    if mode in ("gather", "boundary"):
      u = gather(self._to_bytes(opts, s, dtype))
      if mode == "boundary":
        u = jnp.where((ends & ~groups.overflow)[..., None], u, jnp.zeros((), u.dtype))
      h = h + u
    elif mode == "linear":
      h = h + self._linear_upsample(opts, s, gather, offsets, dtype)
    elif mode == "slice":
      width = group_width(opts)
      if gcfg.d_model % width:
        raise ValueError(f"model.hierarchical.upsampling='slice' needs global_d_model ({gcfg.d_model}) to be "
                         f"a multiple of the width {width}.")
      h = h + layers.DenseGeneral((cfg.d_model,), (layers.MLP_AXIS, layers.EMBED), dtype=dtype, name="up")(
          pooling.offset_slices(gather(s), offsets, width))
    elif mode == "attention":  # Hourglass: U = x + LinearUpsample(s'), U + Attn(U, readable slots), MLP
      h = h + self._linear_upsample(opts, s, gather, offsets, dtype)
      q = layers.RMSNorm(cfg.norm_eps, dtype, name="up_query_norm")(h)
      kv = layers.RMSNorm(cfg.norm_eps, dtype, name="up_kv_norm")(self._to_bytes(opts, s, dtype))
      mask = pooling.upsampling_mask(read, slot_segments, segment_ids)
      h = _mlp(cfg, h + SlotAttention(cfg, cfg.d_model, name="up_attention")(q, kv, mask), dtype, "up_mlp")
    if opts["decoder_scope"] == "patch":  # MEGABYTE's local model: each read run on its own
      dec_segments, dec_positions = pooling.run_ids(read, segment_ids), offsets
    else:
      dec_segments, dec_positions = segment_ids, positions
    for i in range(opts["decoder_layers"]):
      if mode == "cross":  # HAT: h += CrossAttn(RMSNorm(h), RMSNorm(p_{w(t)})) before each decoder layer
        h = h + gather(PredictiveEmbedding(cfg, name=f"decoder_cross_{i}")(s))
      h = Block(cfg, cfg.mixer, layer_index=i, name=f"decoder_layer_{i}")(h, dec_segments, dec_positions)
    logits = layers.output_logits(cfg, embed, h, dtype)
    if not self.with_aux:
      return logits
    aux = {"overflow": groups.overflow, "patches": jnp.minimum(groups.counts, groups.capacity - 1)}
    if source in TRAINED_SOURCES:
      aux["boundary_loss"] = boundary_loss(opts, inputs, segment_ids, z, straight, logits)
    return logits, aux


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
    del decode  # generation recomputes the forward (no cache yet)
    return HierarchicalLM(self.config, train=train)

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
    return decoding.generate_by_recompute(self.module(), params, prompt, rng, max_new=max_new,
                                          temperature=float(temperature), top_k=int(top_k))
