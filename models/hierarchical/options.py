"""`config.model.hierarchical`: every option with its default, validation, the static capacity and the
rule-based boundary sources (models/hierarchical/__init__.py describes the model they configure)."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models.family import freeze
from models.registry import mixer_options
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
    # Toucan (§7): after every stored boundary the decoder byte layers see an EOT token, which the
    # boundary byte predicts and which predicts the next token's first byte; generation then decides the
    # boundaries by emitting EOT (ops/pooling/end_of_token.py). Needs model.vocab_size > EOT_ID.
    "end_of_token": False,
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
EOT_ID = 259  # Toucan's end-of-token id: the first id after the ByT5 bytes (data/bytes.py)


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
  if opts["capacity"] < 0 or opts["capacity"] == 1:
    raise ValueError(f"model.hierarchical.capacity must be 0 (seq_len // expected_patch + 1) or >= 2 (the null "
                     f"slot and at least one group), got {opts['capacity']}.")
  if opts["expected_patch"] < 1 or opts["patch_size"] < 1:
    raise ValueError("model.hierarchical.expected_patch and patch_size must be >= 1, got "
                     f"{opts['expected_patch']} and {opts['patch_size']}.")
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
  if opts["end_of_token"]:
    if config.vocab_size <= EOT_ID:
      raise ValueError(f"model.hierarchical.end_of_token needs model.vocab_size > {EOT_ID} (the EOT id), got "
                       f"{config.vocab_size}.")
    if (opts["upsampling"], opts["decoder_scope"], opts["decoder_input"]) != ("gather", "stream", "encoder"):
      raise ValueError("model.hierarchical.end_of_token runs with upsampling='gather', decoder_scope='stream' "
                       "and decoder_input='encoder' (dynamic pooling's decoder, which Toucan extends).")
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
