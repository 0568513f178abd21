"""ByT5 / MrT5 / LOBEF options (`config.model.byt5`), the special ids and the shape helpers shared by the
model and the family (the package docstring has the maths)."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from models.registry import mixer_options

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


def capacity_for(length: int, buckets: int, kept: int) -> int:
  """The smallest static capacity (`capacities`) that holds `kept` tokens: the one the hard path picks."""
  return next(c for c in capacities(length, buckets) if c >= kept)


def word_segments(ids: jax.Array) -> jax.Array:
  """LOBEF word fusion: segment ids [B, T] that change after every whitespace byte; 0 at padding.

  A whitespace byte ends its word (it belongs to the word before it), like an EOS ends a document.
  """
  space = jnp.isin(ids, jnp.asarray(_SPACE_IDS))
  starts = jnp.concatenate([jnp.zeros_like(space[:, :1]), space[:, :-1]], axis=1)
  seg = jnp.cumsum(starts, axis=1, dtype=jnp.int32) + 1
  return jnp.where(ids == PAD_ID, 0, seg)

