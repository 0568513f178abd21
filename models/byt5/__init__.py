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

from models import decoding
from models.byt5.model import ByT5, Attention, DecoderLayer, DeleteGate, Encoder, EncoderLayer, RelativeBias
from models.byt5.options import (BUCKETS, BYT5_DEFAULTS, DELETE_GATE_DEFAULTS, EOS_ID, LOBEF_DEFAULTS, PAD_ID,
                                 byt5_config, byt5_options, capacities, capacity_for,
                                 word_segments)
from models.family import ModelFamily, register_family
from ops import deletion
from ops import losses

__all__ = ["BUCKETS", "BYT5_DEFAULTS", "DELETE_GATE_DEFAULTS", "EOS_ID", "LOBEF_DEFAULTS", "PAD_ID", "Attention",
           "ByT5", "ByT5Family", "DecoderLayer", "DeleteGate", "Encoder", "EncoderLayer", "RelativeBias",
           "byt5_config", "byt5_options", "capacities", "capacity_for", "word_segments", "z_loss_sum"]


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
  eval_tasks = ("bpb", "generate", "encoder_ablation")
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
      capacity = capacity_for(prompt.shape[1], gate["capacity_buckets"], kept)
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
