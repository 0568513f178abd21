"""ByT5 encoder-decoder (T5 v1.1 blocks) with MrT5's delete gate and Local Byte Fusion, and its family.

specs/token_free.md §2.3 (architecture), §3 (MrT5), DESIGN §5:

    encoder: embed -> L_enc x [x + attn(norm(x)); x + geglu(norm(x))] -> norm      (bidirectional)
    decoder: embed -> L_dec x [x + self(norm(x)); x + cross(norm(x), enc); x + geglu(norm(x))] -> norm
    logits = lm_head(decoder output)                                               (untied, 384 rows)

Pre-norm RMSNorm without mean or bias, GeGLU (tanh GELU, HF "gelu_new"), no biases, no 1/sqrt(d) logit
scale (scale=1, T5), heads x head_dim free of d_model. The T5 relative position bias (32 buckets, max
distance 128) is one [H, buckets] table per stack, bidirectional in the encoder and causal in the decoder,
and is applied by ops.attention from the query / key positions per tile, so every layer of a stack shares
it and a hard-deleted (compacted) encoder keeps its original positions (§3.9).

MrT5 (`model.byt5.delete_gate.enabled`, §3.2-3.5): at the input of encoder layer `layer` a gate
G = k sigmoid(-(w . RMSNorm(h) + b)) (pads: G = k). Soft deletion (training): G is the key bias of every
later encoder self-attention and of every decoder cross-attention, with softmax1. Hard deletion
(evaluation, generation): tokens with G > threshold are compacted into a static capacity (one of
`capacity_buckets` sizes, chosen per batch by lax.switch, so one compiled program covers every batch) and
the later layers and cross-attention run on the compacted sequence. Loss: CE + alpha * mean(G), alpha
fixed or from the PI controller whose state lives in the train state (`aux_state`).

Local Byte Fusion (LOBEF, Sreedhar et al. 2023) encoder options (`model.byt5.lobef`): `ngram` adds
causal-free depthwise n-gram convolutions (n in `ngram_sizes`, averaged) to the embeddings of the encoder;
`word_layers` restricts the first that many encoder self-attentions to the bytes of the same
whitespace-delimited word (through segment ids).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from models import decoding
from models import layers
from models.family import ModelFamily, register_family
from models.registry import mixer_options
from ops import deletion
from ops import losses
from ops import pooling
from ops.attention import attention

PAD_ID = 0  # also the decoder start id (§2.4)
EOS_ID = 1
BUCKETS = "relative_buckets"  # logical axis of the relative-bias table (replicated)

# Options under `config.model.byt5` (configs/byt5.py takes them with `byt5_config()`).
BYT5_DEFAULTS: dict[str, Any] = {
    "relative_buckets": 32,
    "relative_max_distance": 128,
    "dropout": 0.0,  # residual, embedding and feed-forward dropout (T5: 0 in pretraining, 0.1 fine-tuning)
    "z_loss": 1e-4,  # t5x: z_loss * logsumexp(logits)^2 per target
    "softmax1": False,  # exp(s) / (1 + sum exp(s)) in every attention (MrT5 --use_softmax1)
}
DELETE_GATE_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "layer": 3,  # encoder layer whose input is gated (0-based; §3.1: after the third layer)
    "scale": -30.0,  # k
    "threshold": -15.0,  # theta of hard deletion
    "bias_init": 1.0,
    "alpha": 0.0,  # gate-loss weight (initial alpha when the controller is on)
    "controller": True,  # PI controller on alpha (§3.5)
    "target": 0.5,  # delta, the target deletion rate
    "kp": 0.5,
    "ki": 1e-5,
    "regularizer_delay": 0,  # steps of CE only
    "scores_loss": 0.0,  # beta of the attention-score regulariser (0: off; materialises logits)
    "hard_eval": True,  # evaluation and generation use hard deletion
    "capacity_buckets": 4,  # static capacities C = T * j / buckets, j = 1..buckets (rounded up to 8)
}
LOBEF_DEFAULTS: dict[str, Any] = {
    "ngram_sizes": (),  # e.g. (2, 3, 4): n-gram convolutions added to the encoder embeddings
    "word_layers": 0,  # the first N encoder self-attentions stay within whitespace-delimited words
}
_SPACE_IDS = tuple(b + 3 for b in b" \t\n\r\x0b\x0c")


_SUBSECTIONS = {"delete_gate": DELETE_GATE_DEFAULTS, "lobef": LOBEF_DEFAULTS}


def byt5_options(config: Any) -> dict[str, Any]:
  """The model config's `byt5` options with their defaults; `delete_gate` and `lobef` as sub-dicts."""
  section = dict(config.byt5.items()) if "byt5" in config else {}
  flat = {k: v for k, v in section.items() if k not in _SUBSECTIONS}
  options = mixer_options(ml_collections.ConfigDict({"byt5": flat}), "byt5", BYT5_DEFAULTS)
  for name, defaults in _SUBSECTIONS.items():
    given = ml_collections.ConfigDict({name: section[name]}) if name in section else {}
    options[name] = mixer_options(given, name, defaults)
  return options


def byt5_config() -> ml_collections.ConfigDict:
  """Every `config.model.byt5` option with its default, for config files."""
  section = ml_collections.ConfigDict(dict(BYT5_DEFAULTS))
  section.delete_gate = ml_collections.ConfigDict(dict(DELETE_GATE_DEFAULTS))
  section.lobef = ml_collections.ConfigDict(
      {k: ml_collections.FieldReference(v, field_type=object) if k == "ngram_sizes" else v
       for k, v in LOBEF_DEFAULTS.items()})
  return section


def capacities(length: int, buckets: int) -> tuple[int, ...]:
  """Static hard-deletion capacities for an encoder of `length`: T j / buckets rounded up to 8, <= T."""
  return tuple(sorted({min(length, -(-(length * j // buckets) // 8) * 8) for j in range(1, buckets + 1)}))


def word_segments(ids: jax.Array) -> jax.Array:
  """LOBEF word fusion: segment ids [B, T] that change after every whitespace byte; 0 at padding.

  A whitespace byte ends its word (it belongs to the word before it), like an EOS ends a document.
  """
  space = jnp.isin(ids, jnp.asarray(_SPACE_IDS))
  starts = jnp.concatenate([jnp.zeros_like(space[:, :1]), space[:, :-1]], axis=1)
  seg = jnp.cumsum(starts, axis=1, dtype=jnp.int32) + 1
  return jnp.where(ids == PAD_ID, 0, seg)


class RelativeBias(nn.Module):
  """The stack's T5 relative-position bias table [H, buckets] (applied inside ops.attention)."""
  num_heads: int
  num_buckets: int

  @nn.compact
  def __call__(self) -> jax.Array:
    init = nn.initializers.normal(stddev=1.0)
    return self.param("table", nn.with_logical_partitioning(init, (layers.HEADS, BUCKETS)),
                      (self.num_heads, self.num_buckets), jnp.float32)


class Attention(nn.Module):
  """T5 multi-head attention (no scale, no biases). x [B, T, D], kv [B, S, D] -> [B, T, D].

  `decode`: self-attention appends to a KV cache; cross-attention keeps the K/V of the encoder output in
  the cache, written by a call with x=None (`Decoder.cross_kv`) and read by calls with kv=None.
  """
  config: Any
  decode: bool = False
  cross: bool = False

  @nn.compact
  def __call__(self, x: jax.Array | None, kv: jax.Array | None, *, causal: bool, options: dict,
               segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None,
               relative_bias=None, key_bias=None, sow_scores=False) -> jax.Array | None:
    cfg = self.config
    h, dh = cfg.num_heads, cfg.head_dim
    dtype = layers.dtype_of(cfg.dtype)
    head_axes = (layers.EMBED, layers.HEADS, layers.HEAD_DIM)
    key = layers.DenseGeneral((h, dh), head_axes, dtype=dtype, name="key")
    value = layers.DenseGeneral((h, dh), head_axes, dtype=dtype, name="value")
    cached_cross = self.cross and self.decode
    if cached_cross and kv is not None:  # store the encoder's K/V once per generation
      k, v = key(kv), value(kv)
      self.variable("cache", "cross_keys", lambda: k).value = k
      self.variable("cache", "cross_values", lambda: v).value = v
      if x is None:
        return None
    elif cached_cross:
      k = self.variable("cache", "cross_keys", lambda: None).value
      v = self.variable("cache", "cross_values", lambda: None).value
    else:
      source = x if kv is None else kv
      k, v = key(source), value(source)
    # T5's init: q gets an extra head_dim^-0.5 since logits are not scaled.
    q = layers.DenseGeneral((h, dh), head_axes, dtype=dtype, init_scale=dh ** -0.5, name="query")(x)
    if self.decode and not self.cross:
      cache = layers.declare_kv_cache(self, k.shape, v.shape, k.dtype)
      k, v, q_positions, kv_positions = layers.cache_append(cache, k, v)
      segment_ids = kv_segment_ids = None
    if sow_scores:
      valid = jnp.ones(k.shape[:2], bool) if kv_segment_ids is None else kv_segment_ids > 0
      total, count = deletion.scores_penalty(q, k, valid)
      self.sow("losses", "scores_sum", total)
      self.sow("losses", "scores_count", count)
    o = attention(q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                  q_positions=q_positions, kv_positions=kv_positions, key_bias=key_bias,
                  relative_bias=relative_bias, relative_bidirectional=not causal,
                  relative_max_distance=options["relative_max_distance"], softmax1=options["softmax1"],
                  scale=1.0, impl=cfg.attention_impl or None, interpret=cfg.interpret)
    return layers.DenseGeneral((cfg.d_model,), (layers.HEADS, layers.HEAD_DIM, layers.EMBED), in_dims=2,
                               dtype=dtype, name="out")(o)


class EncoderLayer(nn.Module):
  config: Any

  @nn.compact
  def __call__(self, x, *, options, train, segment_ids, positions, relative_bias, key_bias=None,
               sow_scores=False):
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    drop = nn.Dropout(options["dropout"], deterministic=not train)
    h = layers.RMSNorm(cfg.norm_eps, dtype, name="attention_norm")(x)
    h = Attention(cfg, name="attention")(h, None, causal=False, options=options, segment_ids=segment_ids,
                                         q_positions=positions, kv_positions=positions,
                                         relative_bias=relative_bias, key_bias=key_bias,
                                         sow_scores=sow_scores)
    x = x + drop(h)
    h = layers.RMSNorm(cfg.norm_eps, dtype, name="mlp_norm")(x)
    return x + drop(layers.GatedMLP(cfg.mlp_dim, "geglu", dtype, name="mlp")(h))


class DecoderLayer(nn.Module):
  config: Any
  decode: bool = False

  def setup(self):
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    self.self_attention_norm = layers.RMSNorm(cfg.norm_eps, dtype)
    self.self_attention = Attention(cfg, decode=self.decode)
    self.cross_attention_norm = layers.RMSNorm(cfg.norm_eps, dtype)
    self.cross_attention = Attention(cfg, decode=self.decode, cross=True)
    self.mlp_norm = layers.RMSNorm(cfg.norm_eps, dtype)
    self.mlp = layers.GatedMLP(cfg.mlp_dim, "geglu", dtype)
    self.dropout = nn.Dropout(byt5_options(cfg)["dropout"])

  def __call__(self, x, encoded, *, options, train, encoder_valid, relative_bias, key_bias=None,
               sow_scores=False):
    drop = functools.partial(self.dropout, deterministic=not train)
    h = self.self_attention(self.self_attention_norm(x), None, causal=True, options=options,
                            relative_bias=relative_bias)
    x = x + drop(h)
    queries = jnp.ones(x.shape[:2], jnp.int32)
    h = self.cross_attention(self.cross_attention_norm(x), encoded, causal=False, options=options,
                             segment_ids=queries, kv_segment_ids=encoder_valid.astype(jnp.int32),
                             key_bias=key_bias, sow_scores=sow_scores)
    x = x + drop(h)
    return x + drop(self.mlp(self.mlp_norm(x)))


class DeleteGate(nn.Module):
  """MrT5's gate logits z = w . RMSNorm(h) + b (§3.2). h [B, T, D] -> z [B, T] f32."""
  config: Any
  bias_init: float

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    h = layers.RMSNorm(self.config.norm_eps, jnp.float32, name="norm")(h)
    proj = nn.Dense(1, kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                               (layers.EMBED, None)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.constant(self.bias_init), (None,)),
                    name="proj")
    return proj(h.astype(jnp.float32))[..., 0]


class Encoder(nn.Module):
  """inputs [B, T] -> (encoded [B, C, D], valid [B, C] bool, gates [B, T] or None); C = T unless hard."""
  config: Any

  def setup(self):
    cfg = self.config
    opts = byt5_options(cfg)
    self.relative_bias = RelativeBias(cfg.num_heads, opts["relative_buckets"])
    self.layer = [EncoderLayer(cfg) for _ in range(cfg.num_layers)]  # params "layer_0", "layer_1", ...
    self.final_norm = layers.RMSNorm(cfg.norm_eps, layers.dtype_of(cfg.dtype))
    gate = opts["delete_gate"]
    if gate["enabled"]:
      self.delete_gate = DeleteGate(cfg, gate["bias_init"])
    if opts["lobef"]["ngram_sizes"]:
      self.ngram = [nn.Conv(cfg.d_model, (n,), padding="SAME", feature_group_count=cfg.d_model,
                            use_bias=False) for n in opts["lobef"]["ngram_sizes"]]

  def lower(self, x, ids, *, options, train):
    """Embeddings x [B, T, D] -> the gate layer's input, and the stack's shared pieces."""
    cfg = self.config
    b, t = ids.shape
    valid = ids != PAD_ID
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    table = self.relative_bias()
    if options["lobef"]["ngram_sizes"]:
      x = x + sum(conv(x) for conv in self.ngram) / len(self.ngram)
    words = word_segments(ids) if options["lobef"]["word_layers"] else None
    gate = options["delete_gate"]
    stop = gate["layer"] if gate["enabled"] else cfg.num_layers
    for i in range(stop):
      seg = words if i < options["lobef"]["word_layers"] else valid.astype(jnp.int32)
      x = self.layer[i](x, options=options, train=train, segment_ids=seg, positions=positions,
                         relative_bias=table)
    return x, valid, positions, table

  def upper(self, x, valid, positions, table, *, options, train, key_bias=None, sow_scores=False):
    """Encoder layers from the gate layer on, then the final norm."""
    cfg = self.config
    gate = options["delete_gate"]
    for i in range(gate["layer"] if gate["enabled"] else cfg.num_layers, cfg.num_layers):
      x = self.layer[i](x, options=options, train=train, segment_ids=valid.astype(jnp.int32),
                         positions=positions, relative_bias=table, key_bias=key_bias, sow_scores=sow_scores)
    return self.final_norm(x)

  def gates(self, x, ids, *, options):
    return deletion.gate_values(self.delete_gate(x), ids == PAD_ID, scale=options["delete_gate"]["scale"])


class Decoder(nn.Module):
  config: Any
  decode: bool = False

  def setup(self):
    cfg = self.config
    self.relative_bias = RelativeBias(cfg.num_heads, byt5_options(cfg)["relative_buckets"])
    self.layer = [DecoderLayer(cfg, decode=self.decode) for _ in range(cfg.num_decoder_layers)]
    self.final_norm = layers.RMSNorm(cfg.norm_eps, layers.dtype_of(cfg.dtype))

  def __call__(self, x, encoded, encoder_valid, *, options, train, key_bias=None, sow_scores=False):
    table = self.relative_bias()
    for layer in self.layer:
      x = layer(x, encoded, options=options, train=train, encoder_valid=encoder_valid, relative_bias=table,
                key_bias=key_bias, sow_scores=sow_scores)
    return self.final_norm(x)

  def cross_kv(self, encoded):
    options = byt5_options(self.config)
    for layer in self.layer:
      layer.cross_attention(None, encoded, causal=False, options=options)


class ByT5(nn.Module):
  """The encoder-decoder. `__call__(inputs [B, T], decoder_inputs [B, U]) -> logits [B, U, V] f32`.

  `hard` (evaluation): MrT5 hard deletion. Methods `encode` and `decode_step` serve generation.
  """
  config: Any
  decode: bool = False

  def setup(self):
    cfg = self.config
    self.options = byt5_options(cfg)
    dtype = layers.dtype_of(cfg.dtype)
    self.embed = layers.Embed(layers.padded_vocab_size(cfg.vocab_size, cfg.vocab_pad_multiple), cfg.d_model,
                              dtype)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg, decode=self.decode)
    self.lm_head = layers.DenseGeneral((self.embed.num_embeddings,), (layers.EMBED, layers.VOCAB), dtype=dtype)
    self.dropout = nn.Dropout(self.options["dropout"])

  def _embed(self, ids, train):
    return self.dropout(self.embed(ids), deterministic=not train)

  def logits(self, decoder_out):
    return self.lm_head(decoder_out).astype(jnp.float32)[..., :self.config.vocab_size]

  def __call__(self, inputs, decoder_inputs, *, train: bool = False, hard: bool = False):
    opts = self.options
    gate = opts["delete_gate"]
    sow_scores = train and gate["enabled"] and gate["scores_loss"] > 0
    x, valid, positions, table = self.encoder.lower(self._embed(inputs, train), inputs, options=opts,
                                                    train=train)
    y = self._embed(decoder_inputs, train)
    if not gate["enabled"]:
      enc = self.encoder.upper(x, valid, positions, table, options=opts, train=train)
      return self.logits(self.decoder(y, enc, valid, options=opts, train=train)), None
    gates = self.encoder.gates(x, inputs, options=opts)
    if not hard:  # soft deletion: G as the key bias of every later attention over encoder positions
      enc = self.encoder.upper(x, valid, positions, table, options=opts, train=train, key_bias=gates,
                               sow_scores=sow_scores)
      out = self.decoder(y, enc, valid, options=opts, train=train, key_bias=gates, sow_scores=sow_scores)
      return self.logits(out), gates
    keep = deletion.hard_keep(gates, ~valid, threshold=gate["threshold"])
    sizes = capacities(inputs.shape[1], gate["capacity_buckets"])

    def branch(capacity):
      return lambda mdl, x, y, keep, table: mdl._compacted(x, y, keep, table, capacity)

    bucket = jnp.searchsorted(jnp.asarray(sizes), jnp.max(jnp.sum(keep, axis=1)))
    logits = nn.switch(jnp.minimum(bucket, len(sizes) - 1), [branch(c) for c in sizes], self, x, y, keep,
                       table)
    return logits, gates

  def _compacted_encoder(self, x, keep, table, capacity):
    """Hard deletion: the kept rows of x [B, T, D] (keep [B, T]) in `capacity` slots, at their original
    positions, through the later encoder layers -> (encoded [B, C, D], valid [B, C])."""
    idx, kept = pooling.compact_indices(keep, capacity)
    enc = self.encoder.upper(pooling.gather_rows(x, idx), kept, jnp.where(kept, idx, 0), table,
                             options=self.options, train=False)
    return enc, kept

  def _compacted(self, x, y, keep, table, capacity):
    """Hard deletion through the later encoder layers and the decoder -> logits."""
    enc, kept = self._compacted_encoder(x, keep, table, capacity)
    return self.logits(self.decoder(y, enc, kept, options=self.options, train=False))

  def forward_kept(self, inputs, decoder_inputs, keep, capacity: int):
    """Teacher-forced logits with a given hard-deletion mask keep [B, T] (benchmarks/mrt5.py): the gate is
    bypassed, everything else is the hard-deletion path with `capacity` (static) slots."""
    x, _, _, table = self.encoder.lower(self._embed(inputs, False), inputs, options=self.options, train=False)
    return self._compacted(x, self._embed(decoder_inputs, False), keep, table, capacity)

  def encode(self, inputs, *, capacity: int | None = None):
    """Generation: inputs [B, T] -> (encoded [B, C, D], valid [B, C], key_bias [B, C] or None).

    With the gate on and hard_eval, tokens are hard-deleted into `capacity` slots (static; the family
    picks it per batch from `capacities`); otherwise soft (the gates become the cross-attention bias).
    """
    opts = self.options
    gate = opts["delete_gate"]
    x, valid, positions, table = self.encoder.lower(self._embed(inputs, False), inputs, options=opts,
                                                    train=False)
    if not gate["enabled"]:
      return self.encoder.upper(x, valid, positions, table, options=opts, train=False), valid, None
    gates = self.encoder.gates(x, inputs, options=opts)
    if capacity is None:
      enc = self.encoder.upper(x, valid, positions, table, options=opts, train=False, key_bias=gates)
      return enc, valid, gates
    keep = deletion.hard_keep(gates, ~valid, threshold=gate["threshold"])
    return (*self._compacted_encoder(x, keep, table, capacity), None)

  def kept_counts(self, inputs):
    """Hard-deletion kept tokens per row [B] (host-side capacity choice for generation)."""
    opts = self.options
    x, valid, _, _ = self.encoder.lower(self._embed(inputs, False), inputs, options=opts, train=False)
    gates = self.encoder.gates(x, inputs, options=opts)
    return jnp.sum(deletion.hard_keep(gates, ~valid, threshold=opts["delete_gate"]["threshold"]), axis=1)

  def prefill_cross(self, encoded):
    """Stores every decoder layer's cross-attention K/V of `encoded` in the cache (decode mode)."""
    self.decoder.cross_kv(encoded)

  def decode_step(self, decoder_inputs, encoder_valid, key_bias=None):
    """decode=True: decoder ids [B, N] (after the cached ones) -> logits [B, N, V]."""
    y = self._embed(decoder_inputs, False)
    return self.logits(self.decoder(y, None, encoder_valid, options=self.options, train=False,
                                    key_bias=key_bias))


def _sown_total(sown: Any, name: str) -> jax.Array:
  """Sum of every value sown under `name` (any module) in the "losses" collection."""
  leaves = jax.tree_util.tree_leaves_with_path(sown.get("losses", {}))
  return sum((v for path, v in leaves if any(getattr(p, "key", None) == name for p in path)),
             jnp.zeros((), jnp.float32))


def z_loss_sum(logits: jax.Array, weights: jax.Array) -> jax.Array:
  """sum over weighted targets of logsumexp(logits)^2 (t5x's z-loss, before its coefficient)."""
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.square(lse) * weights)


@register_family("byt5")
class ByT5Family(ModelFamily):
  """ByT5 / MrT5 over span-corruption batches {inputs, decoder_inputs, targets, weights[, special_weights]}.

  Metric sums: "weight"/"nll" over the weighted targets (training: every non-pad target; evaluation: real
  bytes only, so bpb is bits per target byte), "special_nll"/"special_weight" (sentinels and EOS, eval),
  and with the gate "deleted"/"gated"/"gate_sum" (deletion rate, gate loss), plus "soft_nll" at evaluation
  (soft deletion beside the hard-deletion "nll").
  """

  batch_format = "span_corruption"
  eval_tasks = ("bpb", "generate")
  count_keys = ("special_nll", "special_weight", "deleted", "gated", "gate_sum", "soft_nll", "scores",
                "scores_count")

  def __init__(self, config: Any):
    super().__init__(config)
    cfg = self.config
    self.options = byt5_options(cfg)
    gate = self.options["delete_gate"]
    if not cfg.head_dim:
      raise ValueError("model.head_dim must be set for byt5 (heads x head_dim need not equal d_model).")
    if gate["enabled"] and not 0 < gate["layer"] < cfg.num_layers:
      raise ValueError(f"model.byt5.delete_gate.layer ({gate['layer']}) must be between 1 and "
                       f"model.num_layers - 1 ({cfg.num_layers - 1}): the gate sits inside the encoder.")
    if gate["enabled"] and not gate["scale"] < gate["threshold"] < 0:
      raise ValueError(f"model.byt5.delete_gate needs scale < threshold < 0, got scale {gate['scale']} and "
                       f"threshold {gate['threshold']}.")
    if self.options["lobef"]["word_layers"] > (gate["layer"] if gate["enabled"] else cfg.num_layers):
      raise ValueError("model.byt5.lobef.word_layers must not exceed the encoder layers before the gate.")

  def module(self, *, decode: bool = False) -> nn.Module:
    return ByT5(self.config, decode=decode)

  def example_batch(self, batch_size: int, seq_len: int) -> dict[str, jax.Array]:
    ids = jnp.zeros((batch_size, seq_len), jnp.int32)
    out = jnp.zeros((batch_size, max(seq_len // 4, 1)), jnp.int32)
    return {"inputs": ids, "decoder_inputs": out, "targets": out, "weights": jnp.zeros(out.shape, jnp.float32)}

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> Any:
    return self.module().init({"params": rng}, batch["inputs"], batch["decoder_inputs"])["params"]

  def init_aux_state(self) -> Any:
    gate = self.options["delete_gate"]
    if gate["enabled"] and gate["controller"]:
      return deletion.pi_controller_init(gate["alpha"])
    return {}

  def update_aux_state(self, aux_state: Any, sums: dict[str, jax.Array]) -> Any:
    gate = self.options["delete_gate"]
    if not aux_state:
      return aux_state
    rate = sums["deleted"] / jnp.maximum(sums["gated"], 1.0)
    return deletion.pi_controller_update(aux_state, rate, target=gate["target"], kp=gate["kp"], ki=gate["ki"])

  def summarize(self, sums: dict[str, Any]) -> dict[str, Any]:
    out = {}
    if "deleted" in sums:
      out["deletion_rate"] = sums["deleted"] / jnp.maximum(sums["gated"], 1.0)
      out["gate_mean"] = sums["gate_sum"] / jnp.maximum(sums["gated"], 1.0)
    if "special_weight" in sums:
      out["special_bits"] = sums["special_nll"] / jnp.maximum(sums["special_weight"], 1.0) / jnp.log(2.0)
      out["special_targets"] = sums["special_weight"]
    if "soft_nll" in sums:
      out["soft_bpb"] = sums["soft_nll"] / jnp.maximum(sums["weight"], 1.0) / jnp.log(2.0)
    return out

  def loss(self, params: Any, batch: dict[str, jax.Array], *, rng: jax.Array | None = None,
           train: bool = True, aux_state: Any = None, step: jax.Array | None = None
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    gate = self.options["delete_gate"]
    rngs = {"dropout": rng} if (train and rng is not None and self.options["dropout"] > 0) else {}
    model = self.module()
    hard = not train and gate["enabled"] and gate["hard_eval"]
    (logits, gates), sown = model.apply({"params": params}, batch["inputs"], batch["decoder_inputs"],
                                        train=train, hard=hard, rngs=rngs, mutable=["losses"])
    nll, weight = losses.weighted_nll(logits, batch["targets"], batch["weights"])
    metrics = {"weight": weight, "nll": nll}
    objective = nll
    if self.options["z_loss"] > 0 and train:
      metrics["aux_loss"] = self.options["z_loss"] * z_loss_sum(logits, batch["weights"])
    if "special_weights" in batch:
      metrics["special_nll"], metrics["special_weight"] = losses.weighted_nll(
          logits, batch["targets"], batch["special_weights"])
    if gates is not None:
      sums = deletion.deletion_sums(gates, batch["inputs"] == PAD_ID, threshold=gate["threshold"])
      metrics.update(sums)
      if train:
        alpha = aux_state["alpha"] if aux_state else jnp.float32(gate["alpha"])
        if gate["regularizer_delay"] and step is not None:
          alpha = jnp.where(step >= gate["regularizer_delay"], alpha, 0.0)
        # L_G = mean(G over real tokens), weighted by the target count so the caller's /weight leaves it.
        gate_term = alpha * sums["gate_sum"] / jnp.maximum(sums["gated"], 1.0) * jax.lax.stop_gradient(weight)
        metrics["aux_loss"] = metrics.get("aux_loss", 0.0) + gate_term
        if gate["scores_loss"] > 0:
          total, count = _sown_total(sown, "scores_sum"), _sown_total(sown, "scores_count")
          penalty = gate["scores_loss"] * total / jnp.maximum(count, 1.0) * jax.lax.stop_gradient(weight)
          metrics["aux_loss"] = metrics["aux_loss"] + penalty
      elif hard:
        soft_logits, _ = model.apply({"params": params}, batch["inputs"], batch["decoder_inputs"])
        metrics["soft_nll"] = losses.weighted_nll(soft_logits, batch["targets"], batch["weights"])[0]
    if "aux_loss" in metrics:
      objective = objective + metrics["aux_loss"]
    if not train:
      metrics["correct"] = losses.weighted_correct(logits, batch["targets"], batch["weights"])
    return objective, metrics

  def generate(self, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new: int,
               temperature: float = 0.0, top_k: int = 0) -> jax.Array:
    """Encoder inputs [B, P] (an EOS is appended if the row has none) -> decoded ids [B, max_new].

    The encoder runs once; the decoder starts from id 0 with a self-attention KV cache and the
    cross-attention K/V precomputed per layer. After an EOS a row emits padding.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if not bool(jnp.all(jnp.any(prompt == EOS_ID, axis=1))):
      prompt = jnp.concatenate([prompt, jnp.full((prompt.shape[0], 1), EOS_ID, jnp.int32)], axis=1)
    gate = self.options["delete_gate"]
    capacity = None
    if gate["enabled"] and gate["hard_eval"]:
      kept = int(jnp.max(_kept_counts(self.module(), params, prompt)))
      sizes = capacities(prompt.shape[1], gate["capacity_buckets"])
      capacity = next(c for c in sizes if c >= kept)
    return _generate(self.module(), self.module(decode=True), params, prompt, rng, capacity=capacity,
                     max_new=max_new, temperature=float(temperature), top_k=int(top_k))


@functools.partial(jax.jit, static_argnames=("model",))
def _kept_counts(model, params, prompt):
  return model.apply({"params": params}, prompt, method=ByT5.kept_counts)


@functools.partial(jax.jit, static_argnames=("model", "decoder", "capacity", "max_new", "temperature", "top_k"))
def _generate(model, decoder, params, prompt, rng, *, capacity, max_new, temperature, top_k):
  encoded, valid, key_bias = model.apply({"params": params}, prompt, capacity=capacity, method=ByT5.encode)
  batch = prompt.shape[0]
  cache = _decoder_cache(decoder, params, encoded, valid, key_bias, batch, max_new)
  tokens = jnp.full((batch,), PAD_ID, jnp.int32)
  done = jnp.zeros((batch,), bool)

  def body(carry, _):
    cache, token, done, rng = carry
    logits, mutated = decoder.apply({"params": params, "cache": cache}, token[:, None], valid, key_bias,
                                    method=ByT5.decode_step, mutable=["cache"])
    rng, sub = jax.random.split(rng)
    nxt = jnp.where(done, PAD_ID, decoding.sample_logits(logits[:, -1], sub, temperature, top_k))
    return (mutated["cache"], nxt, done | (nxt == EOS_ID), rng), nxt

  _, out = jax.lax.scan(body, (cache, tokens, done, rng), None, length=max_new)
  return out.T


def _decoder_cache(decoder, params, encoded, valid, key_bias, batch, max_len):
  """Zero self-attention caches for max_len decoder tokens, with the cross-attention K/V of `encoded`."""
  dummy = jnp.zeros((batch, max_len), jnp.int32)

  def init_fn():
    variables = decoder.init(jax.random.key(0), dummy, valid, key_bias, method=_init_decoder(encoded))
    return variables["cache"]

  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init_fn))
  _, mutated = decoder.apply({"params": params, "cache": cache}, encoded, method=ByT5.prefill_cross,
                             mutable=["cache"])
  return mutated["cache"]


def _init_decoder(encoded):
  """An init method that creates every decode cache variable: cross K/V of `encoded`, then self-attn."""
  def method(mdl, ids, valid, key_bias):
    mdl.prefill_cross(encoded)
    return mdl.decode_step(ids, valid, key_bias)
  return method
