"""Gated Linear Attention token mixer (Yang et al. 2024; specs/attention_variants.md §1.2).

The maths (recurrent / chunkwise GLA) lives in `ops.gla`; this module owns the projections, the low-rank
forget gate, the per-head output normalisation and swish output gate, segment resets and the decode state.

Per layer, with H heads, d_k = expand_k * d / H and d_v = expand_v * d / H per head (spec §1.2):

  q, k = x W_q, x W_k                                    [B, T, H, d_k]   (optional feature map)
  v    = x W_v                                           [B, T, H, d_v]
  log_alpha = logsigmoid(x W_1 W_2 + b) / normalizer     [B, T, H, d_k]   (f32, low rank, <= 0)
  o    = GLA(q, k, v, log_alpha)                         [B, T, H, d_v]   (q scaled by d_k^-1/2 inside)
  y    = (Norm_head(o) * swish(x W_r)) W_o               [B, T, D]
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from models import layers
from models.registry import mixer_options, register_mixer
from ops import gla as gla_ops

# Options under `config.model.gla` and their defaults (the one place they are written; configs/gla.py takes
# them with `mixer_config("gla")`, and a model config without a `gla` section gets them). Defaults follow fla's `GatedLinearAttention`
# layer (the code-confirmed form, spec §1.2); the paper / original-repo (berlino) variants are switches.
DEFAULTS: dict[str, Any] = {
    "expand_k": 0.5,  # d_k = expand_k * d_model (paper d/2; fla expand_k=0.5)
    "expand_v": 1.0,  # d_v = expand_v * d_model (paper d; fla expand_v=1)
    "num_heads": 0,  # 0 = model.num_heads (paper and fla: 4)
    "gate_low_rank_dim": 16,  # W_1 [d, 16], W_2 [16, d_k] (+ bias)
    "gate_logit_normalizer": 16.0,  # tau: alpha = sigmoid(.)^(1/tau)
    # fla default None; berlino clamps each step's log gate at -3.0
    "clamp_min": ml_collections.FieldReference(None, field_type=float),
    "use_output_gate": True,  # r = swish(x W_r); False: y = Norm(o) W_o
    "output_gate_bias": False,  # fla: no bias; paper and berlino: with bias
    # rmsnorm (fla FusedRMSNormGated) | layernorm (paper; berlino: no affine) | none
    "output_norm": "rmsnorm",
    "norm_eps": 1e-5,  # fla layer and berlino default
    "feature_map": "none",  # none (paper, fla default) | relu | swish, applied to q and k
    "chunk_size": 64,  # chunk length of the "xla" op (fla: 64)
    "impl": "",  # "" = model.attention_impl; "reference" | "xla" | "pallas" (Pallas TPU/GPU kernels)
}

# Packed segments: the log gate at the first token of each segment is replaced so that the state carried
# in from the previous segment is forgotten. A -inf gate gives NaN in the chunked op (spec §1.6), and a
# large magnitude costs accuracy: the "xla" op forms exp(G_t - G_s) from within-chunk f32 cumsums whose
# rounding grows with |G| (~|G| * 6e-8, see ops/gla/xla.py). So the forward uses -24: the carried state
# is scaled by e^-24 ~ 4e-11, far below f32 resolution of the outputs, while the cumsums stay in the
# [16, 32) binade (at -120 the suite's 1e-5 segment check failed by rounding). The backward uses -120
# (e^-120 == 0 in f32, below the smallest subnormal), so gradients across segments are exactly zero.
# Exact alternative for later: segment resets (varlen) inside ops.gla.
SEGMENT_RESET_LOG_GATE = -24.0
SEGMENT_RESET_LOG_GATE_BWD = -120.0

_FEATURE_MAPS = {"none": lambda x: x, "relu": jax.nn.relu, "swish": jax.nn.silu}
_OUTPUT_NORMS = ("rmsnorm", "layernorm", "none")


def gla_options(config: Any) -> dict[str, Any]:
  """`DEFAULTS` updated by `config.gla` (the model config's optional sub-config); rejects unknown keys."""
  options = mixer_options(config, "gla", DEFAULTS)
  if options["feature_map"] not in _FEATURE_MAPS:
    raise ValueError(f"unknown model.gla.feature_map {options['feature_map']!r}; "
                     f"expected one of {sorted(_FEATURE_MAPS)}.")
  if options["output_norm"] not in _OUTPUT_NORMS:
    raise ValueError(f"unknown model.gla.output_norm {options['output_norm']!r}; "
                     f"expected one of {list(_OUTPUT_NORMS)}.")
  return options


def gla_dims(config: Any) -> tuple[int, int, int]:
  """(num_heads, head_k_dim, head_v_dim) of the GLA layer for the model config."""
  options = gla_options(config)
  num_heads = options["num_heads"] or config.num_heads
  key_dim = int(config.d_model * options["expand_k"])
  value_dim = int(config.d_model * options["expand_v"])
  if key_dim % num_heads or value_dim % num_heads or not key_dim or not value_dim:
    raise ValueError(f"model.gla: key dim {key_dim} (d_model * expand_k) and value dim {value_dim} "
                     f"(d_model * expand_v) must be positive multiples of num_heads {num_heads}.")
  return num_heads, key_dim // num_heads, value_dim // num_heads


def segment_starts(segment_ids: jax.Array) -> jax.Array:
  """[B, T] int -> [B, T] bool: True where a token starts a new segment after position 0."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.pad(change, ((0, 0), (1, 0)))  # position 0 has no previous state to forget


def segment_ends(segment_ids: jax.Array) -> jax.Array:
  """[B, T] int -> [B, T] bool: True at the last token of every segment (and at position T - 1)."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.pad(change, ((0, 0), (0, 1)), constant_values=True)


def _segmented_reverse_cumsum(x: jax.Array, ends: jax.Array) -> jax.Array:
  """y_t = sum of x_s over s >= t in t's segment. x [B, T, ...], ends [B, T] bool (segment_ends).

  A segmented scan: values of other segments are never added (a select, not a subtraction), so the
  result is exactly independent of them.
  """
  ends = ends.reshape(ends.shape + (1,) * (x.ndim - 2))

  def combine(a, b):  # a comes first in scan order (here: later in time)
    (xa, fa), (xb, fb) = a, b
    return jnp.where(fb, xb, xa + xb), fa | fb

  y, _ = jax.lax.associative_scan(combine, (jnp.flip(x, 1), jnp.flip(ends, 1)), axis=1)
  return jnp.flip(y, 1)


def _segmented_gla(q, k, v, log_gate, segment_ids, **run):
  """`ops.gla.gla` output [B, T, H, d_v] over packed segments (segment_ids [B, T]; no carried state).

  Forward: the op with the log gate at each segment's first token set to SEGMENT_RESET_LOG_GATE.
  Backward (custom VJP): dq, dk, dv from the op's VJP with the reset gate SEGMENT_RESET_LOG_GATE_BWD
  (exactly zero across segments). The log-gate gradient is not the op's: through its within-chunk
  cumsums, d o_t / d log_gate_s for s in an earlier segment of the same chunk is a rounding residue of a
  cancellation (~1e-9, mathematically 0). Instead the closed form of spec §1.1 "Gate gradient",
  d log b_t = q_t * dq_t - k_t * dk_t and d log alpha_t = sum_{i >= t} d log b_i, is summed only within
  t's segment: exact there and zero across segments. (No final-state term: the final state is not an
  output here.) The reset positions' own gates get zero gradient (they are replaced).
  """
  starts = segment_starts(segment_ids)[:, :, None, None]
  ends = segment_ends(segment_ids)

  def reset(log_gate, value):
    return jnp.where(starts, jnp.float32(value), log_gate)

  @jax.custom_vjp
  def f(q, k, v, log_gate):
    return gla_ops.gla(q, k, v, reset(log_gate, SEGMENT_RESET_LOG_GATE), **run)[0]

  def fwd(q, k, v, log_gate):
    return f(q, k, v, log_gate), (q, k, v, log_gate)

  def bwd(res, do):
    q, k, v, log_gate = res
    bwd_gate = reset(log_gate, SEGMENT_RESET_LOG_GATE_BWD)
    _, vjp = jax.vjp(lambda q, k, v: gla_ops.gla(q, k, v, bwd_gate, **run)[0], q, k, v)
    dq, dk, dv = vjp(do)
    f32 = lambda x: x.astype(jnp.float32)
    d_log_b = f32(q) * f32(dq) - f32(k) * f32(dk)
    d_log_gate = jnp.where(starts, 0.0, _segmented_reverse_cumsum(d_log_b, ends))
    return dq, dk, dv, d_log_gate.astype(log_gate.dtype)

  f.defvjp(fwd, bwd)
  return f(q, k, v, log_gate)


class LowRankGate(nn.Module):
  """log alpha = logsigmoid(x W_1 W_2 + b) / normalizer (spec §1.2 "gate" row).

  x [B, T, D] -> [B, T, H, d_k].

  W_1 [D, rank] (no bias), W_2 [rank, H, d_k], b [H, d_k] (zeros). Computed in float32 whatever the model
  dtype: the op's cumulative sums of it set the decay accuracy. Result <= 0, and >= clamp_min if set. The
  rank dim is tiny, so it takes the replicated NORM axis name.
  """
  num_heads: int
  head_dim: int
  rank: int = 16
  normalizer: float = 16.0
  clamp_min: float | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    low = layers.DenseGeneral((self.rank,), (layers.EMBED, layers.NORM), dtype=jnp.float32,
                              name="down")(x.astype(jnp.float32))
    logits = layers.DenseGeneral((self.num_heads, self.head_dim),
                                 (layers.NORM, layers.HEADS, layers.HEAD_DIM), dtype=jnp.float32,
                                 name="up")(low)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                           (layers.HEADS, layers.HEAD_DIM)),
                      (self.num_heads, self.head_dim), jnp.float32)
    log_gate = jax.nn.log_sigmoid(logits + bias) / self.normalizer
    if self.clamp_min is not None:
      log_gate = jnp.maximum(log_gate, self.clamp_min)
    return log_gate


@register_mixer("gla", defaults=DEFAULTS)
class GatedLinearAttention(nn.Module):
  """GLA token mixer (spec §1.2, fla `fla/layers/gla.py` defaults). x [B, T, D] -> [B, T, D].

  Options come from `config.model.gla` (see `DEFAULTS`; missing keys take the defaults). Where the paper,
  fla and the original repo (berlino) differ (spec §1.2 table), the default is fla's code-confirmed form
  and the alternative is a switch:
    * output norm: per-head RMSNorm with a learnable weight shared across heads, eps 1e-5, then times
      swish(x W_r) (fla `FusedRMSNormGated`); `output_norm="layernorm"` is the paper / berlino per-head
      LayerNorm (no affine, as berlino), "none" drops it.
    * output gate: swish, no bias (fla); `output_gate_bias=True` is the paper / berlino form;
      `use_output_gate=False` drops the gate.
    * gate clamp: none (fla, `clamp_min=None`); berlino clamps log alpha >= -3 (`clamp_min=-3.0`).
    * scale: q is scaled by d_k^-1/2 inside `ops.gla` (fla); berlino's (d/H)^-1/2 on k is not offered
      (checkpoints are not interchangeable, spec §1.6).
  Not from fla: initialisers are the codebase's (fan-in normal; output projection scaled by
  (2 num_layers)^-1/2) rather than fla's normal(0.02); no short convolution (fla's default is off too).
  No positional embedding: the decay supplies relative position, so `positions` is unused.

  Packed documents: at the first token of every new segment the log gate is SEGMENT_RESET_LOG_GATE, which
  forgets the carried state to far below f32 resolution; gradients across segments are exactly zero
  (`_segmented_gla`; see the constants' comment for the accuracy trade-off).

  Decode (`decode=True`): the cache holds the recurrent state S [B, H, d_k, d_v] in float32. The init
  call (cache not yet created) makes a zero state; later calls take T new tokens: one token uses
  `ops.gla.gla_step`, several use `ops.gla.gla` with the cached state as initial state. Segment ids are
  ignored when decoding (one sequence per row), as in the softmax mixer.
  """
  config: Any
  layer_index: int = 0
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """x [B, T, D], segment_ids [B, T] int or None, positions (unused) -> [B, T, D] in model dtype."""
    del positions  # GLA has no positional encoding (spec §1.2 "Block").
    cfg = self.config
    opts = gla_options(cfg)
    dtype = layers.dtype_of(cfg.dtype)
    num_heads, head_k, head_v = gla_dims(cfg)
    batch, t, _ = x.shape

    def dense(features, axes, name, **kwargs):
      return layers.DenseGeneral(features, axes, dtype=dtype, name=name, **kwargs)

    qk_axes = (layers.EMBED, layers.HEADS, layers.HEAD_DIM)
    feature_map = _FEATURE_MAPS[opts["feature_map"]]
    q = feature_map(dense((num_heads, head_k), qk_axes, "query")(x))
    k = feature_map(dense((num_heads, head_k), qk_axes, "key")(x))
    v = dense((num_heads, head_v), qk_axes, "value")(x)
    log_gate = LowRankGate(num_heads, head_k, opts["gate_low_rank_dim"], opts["gate_logit_normalizer"],
                           opts["clamp_min"], name="gate")(x)  # [B, T, H, d_k] f32

    impl = opts["impl"] or cfg.attention_impl or None
    run = dict(chunk_size=opts["chunk_size"], impl=impl, interpret=cfg.interpret)
    if self.decode:
      initialized = self.has_variable("cache", "state")
      state = self.variable("cache", "state", jnp.zeros, (batch, num_heads, head_k, head_v), jnp.float32)
      if not initialized:  # the init call only creates the zero state
        o, _ = gla_ops.gla(q, k, v, log_gate, **run)
      elif t == 1:
        o, state.value = gla_ops.gla_step(q[:, 0], k[:, 0], v[:, 0], log_gate[:, 0], state.value)
        o = o[:, None]
      else:
        o, state.value = gla_ops.gla(q, k, v, log_gate, initial_state=state.value, **run)
    elif segment_ids is not None:
      o = _segmented_gla(q, k, v, log_gate, segment_ids, **run)
    else:
      o, _ = gla_ops.gla(q, k, v, log_gate, **run)
    o = nn.with_logical_constraint(o, (layers.BATCH, layers.LENGTH, layers.ACT_HEADS, layers.HEAD_DIM))

    o = self._output_norm(o, opts, dtype)
    if opts["use_output_gate"]:
      gate = dense((num_heads, head_v), qk_axes, "output_gate")(x)
      if opts["output_gate_bias"]:
        gate = gate + self.param(
            "output_gate_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (layers.HEADS, layers.HEAD_DIM)),
            (num_heads, head_v), jnp.float32).astype(dtype)
      o = o * nn.silu(gate)
    return dense((cfg.d_model,), (layers.HEADS, layers.HEAD_DIM, layers.EMBED), "out", in_dims=2,
                 init_scale=(2 * cfg.num_layers) ** -0.5)(o)

  def _output_norm(self, o: jax.Array, opts: dict[str, Any], dtype: Any) -> jax.Array:
    """Per-head normalisation over d_v (spec §1.2 "per-head norm" row). o [B, T, H, d_v] -> same."""
    if opts["output_norm"] == "rmsnorm":
      return layers.RMSNorm(opts["norm_eps"], dtype, name="output_norm")(o)
    if opts["output_norm"] == "layernorm":  # berlino: LayerNorm(head_dim, elementwise_affine=False)
      o32 = o.astype(jnp.float32)
      mean = jnp.mean(o32, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(o32 - mean), axis=-1, keepdims=True)
      return ((o32 - mean) * jax.lax.rsqrt(var + opts["norm_eps"])).astype(dtype)
    return o.astype(dtype)
