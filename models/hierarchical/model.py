"""The hierarchical byte LM module (models/hierarchical/__init__.py has the maths and the options)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.hierarchical.options import (BOUNDARY_RNG, EOT_ID, TRAINED_SOURCES, boundaries, capacity,
                                         global_config, group_width, options)
from models.transformer import Block
from ops import pooling


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


def _document_read(read: jax.Array, slot_segments: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """The slot each byte reads [B, T]: `read`, or the null slot 0 where that slot holds another document."""
  return jnp.where(jnp.take_along_axis(slot_segments, read, axis=1) == segment_ids, read, 0)


def _mlp(cfg: Any, x: jax.Array, dtype: Any, name: str) -> jax.Array:
  """x + MLP(RMSNorm(x)), the feed-forward half of a block (Hourglass's resampling layers end with one)."""
  h = layers.RMSNorm(cfg.norm_eps, dtype, name=f"{name}_norm")(x)
  return x + layers.GatedMLP(cfg.mlp_dim or layers.default_mlp_dim(cfg.d_model), cfg.mlp_activation, dtype,
                             name=name)(h)


class Pooling(nn.Module):
  """Byte states x [B, T, D] -> slots [B, S, D] ([B, S, width * D] for "concat"), slot 0 the learned null
  group (`model.hierarchical.pooling`, options module)."""
  config: Any

  @nn.compact
  def __call__(self, x: jax.Array, groups: pooling.Groups, segment_ids: jax.Array,
               straight: jax.Array | None) -> jax.Array:
    cfg = self.config
    opts = options(cfg)
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
    kv = layers.RMSNorm(cfg.norm_eps, dtype, name="kv_norm")(x)
    if mode == "latent":  # HAT connector: e_j = CrossAttn(q = latent, kv = bytes of group j)
      latent = self.param("latent_query", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                       (layers.NORM,)), (cfg.d_model,),
                          jnp.float32)
      queries = jnp.broadcast_to(latent.astype(dtype), slots.shape)
      pooled = SlotAttention(cfg, cfg.d_model, name="attention")(queries, kv, pooling.pooling_mask(groups))
    else:  # Hourglass attention pooling: S(x) + Attn(Q = S(x), K = V = x of the group), S = the mean
      q = layers.RMSNorm(cfg.norm_eps, dtype, name="query_norm")(slots)
      pooled = _mlp(cfg, slots + SlotAttention(cfg, cfg.d_model, name="attention")(
          q, kv, pooling.pooling_mask(groups)), dtype, "mlp")
    return pooled.at[:, 0].set(null.astype(dtype))


class ToGlobal(nn.Module):
  """Slots [B, S, Dp] -> the global width [B, S, Dg]: Linear + RMSNorm, or SpaceByte's zero-padding."""
  config: Any
  global_dim: int

  @nn.compact
  def __call__(self, slots: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    if options(cfg)["projection"] == "pad":
      if self.global_dim < slots.shape[-1]:
        raise ValueError(f"model.hierarchical.projection='pad' needs global_d_model >= the pooled width "
                         f"{slots.shape[-1]}, got {self.global_dim}.")
      return jnp.pad(slots, ((0, 0), (0, 0), (self.global_dim - slots.shape[-1], 0))).astype(dtype)
    s = layers.DenseGeneral((self.global_dim,), (layers.EMBED, layers.MLP_AXIS), dtype=dtype, name="down")(slots)
    return layers.RMSNorm(cfg.norm_eps, dtype, name="down_norm")(s)


class HierarchicalLM(nn.Module):
  """inputs [B, T] -> logits [B, T, vocab] f32 (the interface every autoregressive byte model shares).

  with_aux: return (logits, aux): aux["overflow"] [B, T] bool (bytes whose group did not fit),
  aux["patches"] [B] (stored groups per row) and, for a trained source, aux["boundary_loss"] (scalar).
  train: the "learned" source samples its boundaries (Gumbel noise from the BOUNDARY_RNG stream, which
  `apply` then needs: rngs={"boundaries": key}); otherwise every source is deterministic.
  decode: incremental decoding, one byte per call against the `cache` collection (`step`); the init call
  (models.decoding.init_cache) runs the parallel forward and sizes every cache to its length.
  """
  config: Any
  with_aux: bool = False
  train: bool = False
  decode: bool = False

  def _byte_layers(self, x, prefix, count, segment_ids, positions):
    for i in range(count):
      x = Block(self.config, self.config.mixer, layer_index=i, decode=self.decode, name=f"{prefix}_layer_{i}")(
          x, segment_ids, positions)
    return x

  def _global_stack(self, gcfg):
    """(pooling, to_global, global blocks), created where they run (the parallel forward, or inside the
    decode step's switch: a cached module must be created in the lifted context to keep its writes)."""
    blocks = [Block(gcfg, gcfg.mixer, layer_index=i, decode=self.decode, name=f"global_layer_{i}")
              for i in range(gcfg.num_layers)]
    return Pooling(self.config, name="pooling"), ToGlobal(self.config, gcfg.d_model, name="to_global"), blocks

  def _predictor(self, opts, x, dtype):
    cfg = self.config
    return BoundaryPredictor(opts["predictor_dim"] or cfg.mlp_dim or layers.default_mlp_dim(cfg.d_model), dtype,
                             name="boundary_predictor")(x)

  def _to_bytes(self, opts, s, dtype):
    """Global slots [B, S, Dg] -> [B, S, D] (linear "up", or SpaceByte's truncation to the last D dims)."""
    d = self.config.d_model
    if opts["projection"] == "pad":
      return s[..., s.shape[-1] - d:]
    return layers.DenseGeneral((d,), (layers.MLP_AXIS, layers.EMBED), dtype=dtype, name="up")(s)

  def _decode_bytes(self, opts, inputs, x, s, read, offsets, at_boundary, slot_segments, segment_ids,
                    dec_segments, dec_positions, embed):
    """Upsampling, the decoder byte layers and the logits, for the bytes [B, N] at once (the parallel
    forward) or one byte (decode). s [B, S, Dg]: the global outputs; read / offsets / at_boundary [B, N]:
    each byte's read slot, read offset and whether it is a stored group's boundary."""
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    gather = lambda v: jnp.take_along_axis(v, read[..., None], axis=1)
    # A map f applied per slot commutes with the gather: per slot over S (parallel forward) or per byte.
    of_read_slot = (lambda f: f(gather(s))) if self.decode else (lambda f: gather(f(s)))
    h = x
    if opts["decoder_input"] != "encoder":  # MEGABYTE / LYT: the decoder embeds the bytes afresh
      embed = layers.Embed(embed.num_embeddings, cfg.d_model, dtype, name="decoder_embed")
      h = embed(inputs)
      if opts["decoder_input"] == "embed_pad":
        pad = self.param("decoder_pad", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                     (layers.NORM,)), (cfg.d_model,), jnp.float32)
        h = jnp.where((offsets == 0)[..., None], pad.astype(dtype), h)
    mode, width = opts["upsampling"], group_width(opts)

    def linear_upsample():  # Hourglass LinearUpsampling: Linear(Dg -> width x D), byte t takes slice o_t
      y = of_read_slot(layers.DenseGeneral((width * cfg.d_model,), (layers.MLP_AXIS, layers.EMBED), dtype=dtype,
                                           name="up_linear"))
      return pooling.offset_slices(y, offsets, width)

    if mode in ("gather", "boundary"):
      u = of_read_slot(lambda v: self._to_bytes(opts, v, dtype))
      if mode == "boundary":
        u = jnp.where(at_boundary[..., None], u, jnp.zeros((), u.dtype))
      h = h + u
    elif mode == "linear":
      h = h + linear_upsample()
    elif mode == "slice":
      if s.shape[-1] % width:
        raise ValueError(f"model.hierarchical.upsampling='slice' needs global_d_model ({s.shape[-1]}) to be "
                         f"a multiple of the width {width}.")
      h = h + layers.DenseGeneral((cfg.d_model,), (layers.MLP_AXIS, layers.EMBED), dtype=dtype, name="up")(
          pooling.offset_slices(gather(s), offsets, width))
    elif mode == "attention":  # Hourglass: U = x + LinearUpsample(s'), U + Attn(U, readable slots), MLP
      h = h + linear_upsample()
      q = layers.RMSNorm(cfg.norm_eps, dtype, name="up_query_norm")(h)
      kv = layers.RMSNorm(cfg.norm_eps, dtype, name="up_kv_norm")(self._to_bytes(opts, s, dtype))
      mask = pooling.upsampling_mask(read, slot_segments, segment_ids)
      h = _mlp(cfg, h + SlotAttention(cfg, cfg.d_model, name="up_attention")(q, kv, mask), dtype, "up_mlp")
    for i in range(opts["decoder_layers"]):
      if mode == "cross":  # HAT: h += CrossAttn(RMSNorm(h), RMSNorm(p_{w(t)})) before each decoder layer
        h = h + of_read_slot(PredictiveEmbedding(cfg, name=f"decoder_cross_{i}"))
      h = Block(cfg, cfg.mixer, layer_index=i, decode=self.decode, name=f"decoder_layer_{i}")(
          h, dec_segments, dec_positions)
    return layers.output_logits(cfg, embed, h, dtype)

  @nn.compact
  def __call__(self, inputs: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None):
    cfg = self.config
    opts = options(cfg)
    dtype = layers.dtype_of(cfg.dtype)
    embed = layers.Embed(layers.padded_vocab_size(cfg.vocab_size, cfg.vocab_pad_multiple), cfg.d_model, dtype,
                         name="embed")
    if self.decode and self.has_variable("cache", "step"):
      return (self._end_of_token_step if opts["end_of_token"] else self._step)(opts, inputs, embed)
    b, t = inputs.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = embed(inputs)

    source, z, straight, known = opts["boundaries"], None, None, None
    if source in TRAINED_SOURCES:
      x = self._byte_layers(x, "encoder", opts["encoder_layers"], segment_ids, positions)
      z = self._predictor(opts, x, dtype)
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

    gcfg = global_config(cfg, opts)
    pool, to_global, global_blocks = self._global_stack(gcfg)
    slots = pool(x, groups, segment_ids, straight)
    # Each slot carries its group's document; the null slot (0) the row's first, whose groups attend to it
    # as to any earlier slot (s = [s_null; Pool(h)] is one sequence). Later documents' groups do not see
    # it; their bytes still read it before their first group (s'[0] depends on the params only).
    slot_segments = pooling.pool(segment_ids[..., None].astype(jnp.float32), groups, mode="last")[0][..., 0]
    slot_segments = jnp.round(slot_segments).astype(jnp.int32).at[:, 0].set(segment_ids[:, 0])

    s = to_global(slots)
    slot_positions = jnp.broadcast_to(jnp.arange(s.shape[1], dtype=jnp.int32), s.shape[:2])
    for block in global_blocks:
      s = block(s, slot_segments, slot_positions)

    if opts["end_of_token"]:
      expanded, layout = self._end_of_token_decoder(opts, x, s, ends, groups, slot_segments, segment_ids,
                                                    positions, embed)
      logits, overflow = pooling.next_byte_view(expanded, layout), layout.overflow
      extra = {"expanded_logits": expanded, "layout": layout}
    else:
      # The slot byte t reads: its read slot, the last stored one for overflow bytes, and the null slot
      # when that slot belongs to another document.
      read = _document_read(jnp.where(groups.overflow, groups.capacity - 1, groups.reads), slot_segments,
                            segment_ids)
      offsets = pooling.read_offsets(read, segment_ids)
      if opts["decoder_scope"] == "patch":  # MEGABYTE's local model: each read run on its own
        dec_segments, dec_positions = pooling.run_ids(read, segment_ids), offsets
      else:
        dec_segments, dec_positions = segment_ids, positions
      logits = self._decode_bytes(opts, inputs, x, s, read, offsets, ends & ~groups.overflow, slot_segments,
                                  segment_ids, dec_segments, dec_positions, embed)
      overflow, extra = groups.overflow, {}
    if self.decode:  # the init call: the decode state, sized to this length
      self._decode_state(b, t, groups.capacity, s.shape[-1], dtype)
    if not self.with_aux:
      return logits
    aux = {"overflow": overflow, "patches": jnp.minimum(groups.counts, groups.capacity - 1), **extra}
    if source in TRAINED_SOURCES:
      aux["boundary_loss"] = boundary_loss(opts, inputs, segment_ids, z, straight, logits)
    return logits, aux

  def _end_of_token_decoder(self, opts, x, s, ends, groups, slot_segments, segment_ids, positions, embed):
    """Toucan's decoder over the expanded stream (ops/pooling/end_of_token.py): byte t continues its
    encoder state plus its read slot (the groups before its own), its EOT the EOT embedding plus the slot
    of the group it closes. Returns (logits [B, T', vocab] of the expanded stream, the layout)."""
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    layout = pooling.eot_layout(ends, groups, segment_ids, positions)
    slots = self._to_bytes(opts, s, dtype)
    gather = lambda read: jnp.take_along_axis(slots, _document_read(read, slot_segments, segment_ids)[..., None],
                                              axis=1)
    eot = embed(jnp.full(ends.shape, EOT_ID, jnp.int32))
    h = pooling.expand_layout(layout, x + gather(layout.reads),
                              eot + gather(jnp.minimum(layout.reads + 1, groups.capacity - 1)), 0)
    for i in range(opts["decoder_layers"]):
      h = Block(cfg, cfg.mixer, layer_index=i, decode=self.decode, name=f"decoder_layer_{i}")(
          h, layout.segment_ids, layout.positions)
    return layers.output_logits(cfg, embed, h, dtype), layout

  def _decode_state(self, b=0, t=0, s=0, global_dim=0, dtype=jnp.float32):
    """The decode buffers (created on the init call, fetched afterwards): the ids, boundaries and encoder
    states of every byte so far, the global outputs of the processed slots, the byte count `step` and
    the processed slot count `slots_done`."""
    d = self.config.d_model
    var = lambda name, shape, dt: self.variable("cache", name, jnp.zeros, shape, dt)
    return {"ids": var("ids", (b, t), jnp.int32), "ends": var("ends", (b, t), jnp.bool_),
            "encoded": var("encoded", (b, t, d), dtype), "global_out": var("global_out", (b, s, global_dim), dtype),
            "slots_done": var("slots_done", (), jnp.int32), "step": var("step", (), jnp.int32),
            "proposed_end": var("proposed_end", (b,), jnp.bool_)}

  def _global_slots(self, gcfg, encoded, groups, first, count):
    """Slots first .. first + count - 1 pooled from the stored encoder states, each one cached step of the
    global stack -> [1, count, Dg]. Call it once per (lifted) branch: it creates the pooling and global
    modules there."""
    pool, to_global, global_blocks = self._global_stack(gcfg)
    slots = pool(encoded, groups, jnp.ones(groups.exclusive.shape, jnp.int32), None)
    outs = []
    for i in range(count):
      s = to_global(jax.lax.dynamic_slice_in_dim(slots, first + i, 1, axis=1))
      for block in global_blocks:
        s = block(s, None, None)
      outs.append(s.astype(layers.dtype_of(self.config.dtype)))
    return jnp.concatenate(outs, axis=1)

  def _end_of_token_step(self, opts, inputs, embed):
    """Toucan's decoding, one token of the expanded stream per call: inputs [1, 1], a byte or EOT_ID ->
    logits [1, 1, vocab] of the next token. A byte runs the encoder byte layers (KV cache) and records
    the boundary its source proposes (`proposed_end`: the prompt's tokenization comes from it); an EOT
    closes the current group, pools it and steps the global stack once. The decoder layers run on
    every token. The first call also steps the null slot."""
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    if inputs.shape != (1, 1):
      raise ValueError(f"incremental decoding takes one token of one row per call ([1, 1]), got {inputs.shape}.")
    state = self._decode_state()
    gcfg = global_config(cfg, opts)
    num_slots = state["global_out"].value.shape[1]
    carry = (state["ids"].value, state["encoded"].value, state["ends"].value, state["global_out"].value,
             state["slots_done"].value, state["step"].value, state["proposed_end"].value)

    def read_slot(module, global_out, j):
      return module._to_bytes(opts, jax.lax.dynamic_slice_in_dim(global_out, j, 1, axis=1), dtype)

    def byte(module, carry, with_null):
      ids, encoded, ends, global_out, done, t, _ = carry
      ids = jax.lax.dynamic_update_slice(ids, inputs, (0, t))
      x = module._byte_layers(embed(inputs), "encoder", opts["encoder_layers"], None, None)
      encoded = jax.lax.dynamic_update_slice(encoded, x.astype(dtype), (0, t, 0))
      if opts["boundaries"] in TRAINED_SOURCES:
        proposed, _ = pooling.learned_boundaries(module._predictor(opts, x, dtype), inputs)
        proposed = proposed[:, 0]
      else:
        proposed = jax.lax.dynamic_index_in_dim(boundaries(ids, opts)[0], t, axis=1, keepdims=False)
      if with_null:  # the very first token: the null slot through the global stack first
        global_out = global_out.at[:, :1].set(
            module._global_slots(gcfg, encoded, pooling.group_ids(ends, num_slots), 0, 1))
        done = jnp.ones_like(done)
      h = x + read_slot(module, global_out, done - 1)
      return h.astype(dtype), (ids, encoded, ends, global_out, done, t + 1, proposed)

    def eot(module, carry, stored):
      ids, encoded, ends, global_out, done, t, proposed = carry
      if stored:  # the group of the last byte ends: pool it into slot `done`, one global step
        ends = jax.lax.dynamic_update_slice(ends, jnp.ones((1, 1), bool), (0, t - 1))
        closed = module._global_slots(gcfg, encoded, pooling.group_ids(ends, num_slots), done, 1)
        global_out = jax.lax.dynamic_update_slice(global_out, closed, (0, done, 0))
        done = done + 1
      h = embed(jnp.full((1, 1), EOT_ID, jnp.int32)) + read_slot(module, global_out, done - 1)
      return h.astype(dtype), (ids, encoded, ends, global_out, done, t, proposed)

    branches = [lambda m, c: byte(m, c, False), lambda m, c: byte(m, c, True),
                lambda m, c: eot(m, c, True), lambda m, c: eot(m, c, False)]
    done = carry[4]
    is_eot = inputs[0, 0] == EOT_ID
    index = jnp.where(is_eot, jnp.where(done < num_slots, 2, 3), jnp.where(done == 0, 1, 0))
    h, carry = nn.switch(index, branches, self, carry)
    for i in range(opts["decoder_layers"]):
      h = Block(cfg, cfg.mixer, layer_index=i, decode=True, name=f"decoder_layer_{i}")(h, None, None)
    names = ("ids", "encoded", "ends", "global_out", "slots_done", "step", "proposed_end")
    for name, value in zip(names, carry):
      state[name].value = value
    return layers.output_logits(cfg, embed, h, dtype)

  def _step(self, opts, inputs, embed):
    """One byte of incremental decoding: inputs [1, 1] -> logits [1, 1, vocab] (vmap for more rows).

    The byte layers run against their KV caches; the boundary of byte t comes from the same rule (on the
    ids so far, prefix-stable) or the predictor; when byte t makes new slots readable (its read slot is
    past the processed ones) each is pooled from the stored encoder states and the global stack steps once
    on it (its own cache), inside a switch on their count, so the global stack runs once per completed
    patch. Up to MAX_SLOTS_PER_BYTE slots per byte: the null slot and a boundary at byte 0, one per byte
    after that.
    """
    cfg = self.config
    dtype = layers.dtype_of(cfg.dtype)
    if inputs.shape != (1, 1):
      raise ValueError(f"incremental decoding takes one byte of one row per call ([1, 1]), got {inputs.shape}.")
    state = self._decode_state()
    t = state["step"].value
    ids = jax.lax.dynamic_update_slice(state["ids"].value, inputs, (0, t))
    num_slots = state["global_out"].value.shape[1]
    ones = jnp.ones_like(ids)
    at_t = lambda v: jax.lax.dynamic_slice_in_dim(v, t, 1, axis=1)
    if opts["boundaries"] not in TRAINED_SOURCES:
      ends, known = boundaries(ids, opts)
      groups = pooling.group_ids(ends, num_slots, known=known, rule="inclusive" if known is None else "exclusive")
      enc_segments = at_t(pooling.run_ids(groups.exclusive, ones)) if opts["encoder_scope"] == "patch" else None
      x = self._byte_layers(embed(inputs), "encoder", opts["encoder_layers"], enc_segments, None)
    else:
      x = self._byte_layers(embed(inputs), "encoder", opts["encoder_layers"], None, None)
      b_t, _ = pooling.learned_boundaries(self._predictor(opts, x, dtype), inputs)
      ends = jax.lax.dynamic_update_slice(state["ends"].value, b_t, (0, t))
      groups = pooling.group_ids(ends, num_slots)
    encoded = jax.lax.dynamic_update_slice(state["encoded"].value, x.astype(dtype), (0, t, 0))
    read_all = jnp.where(groups.overflow, num_slots - 1, groups.reads)
    read = at_t(read_all)

    gcfg = global_config(cfg, opts)

    def global_steps(count):  # the next `count` slots through the global stack, one cached step each
      def run(module, encoded, groups, done):  # module: the lifted HierarchicalLM, where they are created
        pad = jnp.zeros((1, MAX_SLOTS_PER_BYTE - count, gcfg.d_model), dtype)
        if count == 0:
          return pad
        return jnp.concatenate([module._global_slots(gcfg, encoded, groups, done, count), pad], axis=1)
      return run

    done = state["slots_done"].value
    new = jnp.clip(read[0, 0] + 1 - done, 0, MAX_SLOTS_PER_BYTE)
    outs = nn.switch(new, [global_steps(c) for c in range(MAX_SLOTS_PER_BYTE + 1)], self, encoded, groups, done)
    slot = jnp.arange(num_slots)[None, :, None]
    shifted = jnp.zeros_like(state["global_out"].value).at[:, :MAX_SLOTS_PER_BYTE].set(outs)
    shifted = jnp.roll(shifted, done, axis=1)  # outs[i] at slot done + i
    global_out = jnp.where((slot >= done) & (slot < done + new), shifted, state["global_out"].value)
    done = done + new

    offsets = at_t(pooling.read_offsets(read_all, ones))
    dec_segments = at_t(pooling.run_ids(read_all, ones)) if opts["decoder_scope"] == "patch" else None
    slot_segments = (jnp.arange(num_slots) > 0).astype(jnp.int32)[None]
    logits = self._decode_bytes(opts, inputs, x, global_out, read, offsets, at_t(ends & ~groups.overflow),
                                slot_segments, jnp.ones_like(inputs), dec_segments, None, embed)
    state["ids"].value, state["ends"].value, state["encoded"].value = ids, ends, encoded
    state["global_out"].value, state["slots_done"].value, state["step"].value = global_out, done, t + 1
    return logits


MAX_SLOTS_PER_BYTE = 2
