"""Leviathan selective attention token mixer (Leviathan, Kalman, Matias 2024; spec §4B).

Multi-head causal attention (RoPE, GQA, optional qk-norm, KV cache: the "softmax" mixer's layout) whose
logits are reduced by an accumulated selection mask shared by all heads of the layer:

  L_h = Q_h K_h^T / sqrt(d) (causal, segment-masked);  S = ReLU(L_0) with S[:, BOS] = 0, S_ii = 0
  F   = exclusive cumsum of S over the query axis;     A_h = softmax(L_h - F) for every head

The maths lives in `ops.selective`; this module owns the projections, the decode cache (keys, values and
the running column sums F_j of the selection matrix) and the optional memory loss. BOS is each document's
first token: within-segment position 0 (and every segment start) in the parallel forward, stream
position 0 when decoding. (A model file imports no other model file, so the projection code is this
file's own copy of models/attention.py's.)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from models import layers
from models.registry import mixer_options, register_mixer
from ops import selective as selective_ops

# Options under `config.model.selective` and their defaults (configs/selective.py takes them with
# `mixer_config("selective")`).
DEFAULTS: dict[str, Any] = {
    "selection_head": 0,  # query head whose logits give S (spec §4B and x-transformers: head 0)
    # [VERIFY] memory loss of spec §4B (andrew-healey reproduction): L += w * sum_l max_i M_i^l /
    # (L * n_nonpad), M_i = n_i - sum_j min(F_ij, tau) / tau. Off (0) by default; the reproduction uses 0.1.
    # Sown into the "losses" collection (models/transformer.py's nn.scan stacks it per layer).
    "memory_loss_weight": 0.0,
    "memory_tau": 1.0,
    # Context pruning: keys whose accumulated F_ij exceeds this are masked (evictable from the cache).
    # None = off. Applied in the forward too, so decoding with pruning still equals the forward.
    "prune_threshold": ml_collections.FieldReference(None, field_type=float),
    "block_q": 0,  # query block of the "xla" op; 0 = ops.selective default (128)
    "impl": "",  # "" = follow model.attention_impl; "reference" | "xla" | "pallas"
}


def selective_options(config: Any) -> dict[str, Any]:
  """`DEFAULTS` updated by `config.selective` (optional sub-config); rejects unknown keys and bad values."""
  options = mixer_options(config, "selective", DEFAULTS)
  if options["memory_loss_weight"] < 0 or options["memory_tau"] <= 0:
    raise ValueError(f"model.selective needs memory_loss_weight >= 0 and memory_tau > 0, got "
                     f"{options['memory_loss_weight']} and {options['memory_tau']}.")
  return options


def document_starts(positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """[B, T] bool: True at each document's first token (position 0 or a change of segment id)."""
  starts = positions == 0
  if segment_ids is not None:
    change = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    starts |= change
  return starts


@register_mixer("selective", defaults=DEFAULTS)
class SelectiveAttention(nn.Module):
  """Leviathan selective attention. x [B, T, D] -> [B, T, D].

  Options from `config` (the model config): num_heads, num_kv_heads, head_dim, qk_norm, rope_theta,
  attention_impl, interpret, dtype, num_layers (memory loss normaliser), and `config.selective`
  (`DEFAULTS`). With memory_loss_weight > 0 the parallel forward sows its loss term into the "losses"
  collection (`training.train_step` adds everything sown there to the objective):

    w * mean_b [ max_{i non-pad} M_bi / n_nonpad_b ] / num_layers,
    M_i = n_i - sum_j min(F_ij, tau) / tau,  n_i = within-segment position + 1 (visible keys).

  Padding (segment id 0) is left out of the max and of n_nonpad. [VERIFY] spec §4B: the reproduction's
  normalisation over the batch is not confirmed; this averages the per-row ratio.
  """
  config: Any
  layer_index: int = 0
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    options = selective_options(cfg)
    dtype = layers.dtype_of(cfg.dtype)
    batch, t, _ = x.shape
    q, _, k, v = layers.qkv_projections(cfg, x, dtype)

    q_positions = kv_positions = bos_mask = column_sums = None
    if self.decode:
      cache = layers.declare_kv_cache(self, k.shape, v.shape, k.dtype)
      # Running column sums F_j of the selection matrix over all tokens decoded so far, per cache slot.
      column_sums = self.variable("cache", "column_sums", jnp.zeros, k.shape[:2], jnp.float32)
      positions = cache.positions(batch, t)
      segment_ids = None
    elif positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    q = layers.rope(q, positions, cfg.rope_theta)
    k = layers.rope(k, positions, cfg.rope_theta)
    if self.decode:
      k, v, q_positions, kv_positions = layers.cache_append(cache, k, v)
      bos_mask = kv_positions == 0  # stream position 0 (unfilled slots have huge positions)
    else:
      bos_mask = document_starts(positions, segment_ids)

    memory_loss = options["memory_loss_weight"] > 0 and not self.decode
    block_q = options["block_q"] or None
    outputs = selective_ops.selective_attention(
        q, k, v, segment_ids=segment_ids, q_positions=q_positions, kv_positions=kv_positions,
        bos_mask=bos_mask,
        initial_column_sums=column_sums.value if column_sums is not None and cache.initialized else None,
        selection_head=options["selection_head"],
        prune_threshold=(None if options["prune_threshold"] is None
                         else float(options["prune_threshold"])),
        memory_tau=float(options["memory_tau"]) if memory_loss else None,
        impl=options["impl"] or cfg.attention_impl or None, interpret=cfg.interpret,
        block_sizes=selective_ops.BlockSizes.get_default(t, block_q))
    o, final_column_sums = outputs[:2]
    if self.decode and cache.initialized:
      column_sums.value = final_column_sums
    if memory_loss:
      self._sow_memory_loss(outputs[2], positions, segment_ids, options["memory_loss_weight"])
    return layers.attention_output(cfg, o, dtype)

  def _sow_memory_loss(self, masked: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                       weight: float) -> None:
    """Sows this layer's memory-loss term (class docstring) under ("losses", "aux_loss")."""
    live = (positions + 1).astype(jnp.float32) - masked  # M_i [B, T]
    nonpad = jnp.ones(masked.shape, bool) if segment_ids is None else segment_ids != 0
    per_row = jnp.max(jnp.where(nonpad, live, 0.0), axis=1) / jnp.maximum(jnp.sum(nonpad, axis=1), 1)
    self.sow("losses", "aux_loss", weight * jnp.mean(per_row) / self.config.num_layers)
