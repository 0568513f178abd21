"""The ByT5 encoder-decoder modules: T5 v1.1 blocks, MrT5's delete gate and hard compaction, LOBEF (the
package docstring has the maths)."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.byt5.options import BUCKETS, PAD_ID, byt5_options, capacities, word_segments
from ops import deletion
from ops import pooling
from ops.attention import attention


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

