"""Helpers shared by the model tests: the tiny model config, per-mixer test options, jitted applies.

XLA compiles dominate on CPU, so every apply is a module-level `jax.jit` with the (hashable) Flax module
as a static argument: tests using the same model and shapes reuse one executable.

Per-mixer test options: a mixer that needs small test-time settings (say a chunk or block size that fits
T = 23) gets a row in `MIXER_TEST_OVERRIDES` (dotted keys under config.model), applied on top of
`TINY_MODEL`; a mixer without a row runs with its defaults.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import models
from configs import base
from models import decoding
from training import train_step as ts

# The tiny model every model test starts from: configs/base.py defaults with small sizes.
TINY_MODEL: dict[str, Any] = {
    "num_layers": 2,
    "d_model": 32,
    "num_heads": 4,
    "num_kv_heads": 0,
    "head_dim": 0,
    "mlp_dim": 64,
    "dtype": "float32",
    "scan_layers": False,
    "remat": "none",
}
BATCH = 2
SEQ_LEN = 23  # awkward on purpose: not a multiple of any block or chunk size
FIRST_BYTE_ID = 3  # ids 0..2 are pad / eos / unk
BYTE_ID_END = 259  # byte b is id b + 3

# mixer name -> {dotted key under config.model: value} for the tiny model (T = 23).
MIXER_TEST_OVERRIDES: dict[str, dict[str, Any]] = {
    # Several chunks (and a partial one) exercise the inter-chunk state.
    "gla": {"gla.chunk_size": 8},
    # The LM with landmark insertion; block size 5 gives 5 landmarks; exact inference for decode == forward.
    "landmark": {"name": "landmark_lm", "landmark.block_size": 5, "landmark.inference": "full"},
    # Non-trivial temperatures (s ~ 0.55, tau_tok ~ +-0.5), so decode == forward checks the absolute
    # positions and the cached scaled values.
    "ssa": {"ssa.position_init": -0.5, "ssa.token_init_scale": 0.5},
    # Several query blocks at T = 23 (the carried column sums matter).
    "selective": {"selective.block_q": 8},
}


def mixer_test_overrides(mixer: str) -> dict[str, Any]:
  """Test-time config.model overrides of one mixer (empty for a mixer without a row)."""
  models.get_mixer(mixer)
  return dict(MIXER_TEST_OVERRIDES.get(mixer, {}))


def _set_dotted(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *parents, leaf = key.split(".")
  for name in parents:
    if name not in config:
      config[name] = ml_collections.ConfigDict()
    config = config[name]
  config[leaf] = value


def tiny_model_config(mixer: str | Sequence[str] = "softmax",
                      **overrides: Any) -> ml_collections.FrozenConfigDict:
  """Frozen `config.model` of a tiny model whose mixer is `mixer` (a name or one name per layer).

  The test overrides of every named mixer are applied first, then `overrides` (config.model keys).
  """
  config = base.get_config().model
  config.update(TINY_MODEL)
  names = [mixer] if isinstance(mixer, str) else list(mixer)
  for name in sorted(set(names)):
    for key, value in mixer_test_overrides(name).items():
      _set_dotted(config, key, value)
  config.mixer = mixer if isinstance(mixer, str) else list(mixer)
  for key, value in overrides.items():
    _set_dotted(config, key, value)
  return models.freeze(config)


def random_ids(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  """Uniform byte ids (never pad / eos / unk, nor special ids above 258), int32."""
  return np.random.default_rng(seed).integers(FIRST_BYTE_ID, BYTE_ID_END, shape).astype(np.int32)


def two_segments(split_points: Sequence[int], length: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
  """Two packed documents per row: segment_ids [1]*split + [2]*(length - split) and positions restarting
  at each segment, both int32 [len(split_points), length]."""
  index = np.arange(length)
  segment_ids = np.stack([np.where(index < s, 1, 2) for s in split_points]).astype(np.int32)
  positions = np.stack([np.where(index < s, index, index - s) for s in split_points]).astype(np.int32)
  return segment_ids, positions


def key(seed: int) -> jax.Array:
  """A PRNG key for initialisers. The "rbg" generator compiles several times faster than threefry on
  CPU (each threefry normal draw costs ~0.4 s of XLA compile), which dominates a tiny model's init."""
  return jax.random.key(seed, impl="rbg")


@functools.partial(jax.jit, static_argnames=("model", "seq_len"))
def _init(model: nn.Module, rng: jax.Array, seq_len: int) -> Any:
  return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def init_params(model: nn.Module, seed: int = 0, seq_len: int = SEQ_LEN) -> Any:
  """Unboxed float32 params of `model` (a decode=False model)."""
  return nn.unbox(_init(model, key(seed), seq_len))


@functools.partial(jax.jit, static_argnames="model")
def forward(model: nn.Module, params: Any, inputs: jax.Array, segment_ids: jax.Array | None = None,
            positions: jax.Array | None = None) -> jax.Array:
  """Parallel forward: logits [B, T, vocab_size]."""
  return model.apply({"params": params}, inputs, segment_ids, positions)


@functools.partial(jax.jit, static_argnames="model")
def decode_call(model: nn.Module, params: Any, cache: Any, inputs: jax.Array) -> tuple[jax.Array, Any]:
  """One incremental call of a decode=True model on inputs [B, t]: (logits [B, t, V], new cache)."""
  logits, mutated = model.apply({"params": params, "cache": cache}, inputs, mutable=["cache"])
  return logits, mutated["cache"]


def decode_in_pieces(decode_model: nn.Module, params: Any, inputs: np.ndarray, piece_lengths: Sequence[int],
                     cache_len: int) -> jax.Array:
  """Feeds inputs [B, T] to the decode model in consecutive pieces; returns the logits [B, T, V]."""
  assert sum(piece_lengths) == inputs.shape[1], (piece_lengths, inputs.shape)
  cache = decoding.init_cache(decode_model, inputs.shape[0], cache_len)
  outputs, start = [], 0
  for length in piece_lengths:
    logits, cache = decode_call(decode_model, params, cache, inputs[:, start:start + length])
    outputs.append(logits)
    start += length
  return jnp.concatenate(outputs, axis=1)


def decode_mixer_in_pieces(module: nn.Module, params: Any, x: jax.Array, piece_lengths: Sequence[int],
                           cache_len: int) -> tuple[jax.Array, Any]:
  """Feeds x [B, T, D] to a decode=True mixer (no LM around it) in consecutive pieces.

  Returns (y [B, T, D], the final cache); the cache is sized by an init call of length cache_len.
  """
  shapes = jax.eval_shape(lambda: module.init(key(0), jnp.zeros((x.shape[0], cache_len, x.shape[2]))))
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
  step = jax.jit(lambda cache, x: module.apply({"params": params, "cache": cache}, x, mutable=["cache"]))
  outputs, start = [], 0
  for length in piece_lengths:
    y, mutated = step(cache, x[:, start:start + length])
    cache = mutated["cache"]
    outputs.append(y)
    start += length
  return jnp.concatenate(outputs, axis=1), cache


def lm_batch(inputs: np.ndarray) -> dict[str, np.ndarray]:
  """A train batch predicting each row's next id (the last target wraps around)."""
  return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1),
          "weights": np.ones(inputs.shape, np.float32)}


def optimizer_config() -> ml_collections.ConfigDict:
  config = base.get_config().optimizer
  config.lr = 1e-2
  config.warmup_steps = 1
  return config


@functools.lru_cache(maxsize=None)
def train_functions(model: nn.Module, total_steps: int) -> tuple[Any, Any]:
  """(optax transform, jitted train step) for `model`'s family, cached so tests share one compile."""
  tx, schedule = ts.make_optimizer(optimizer_config(), total_steps)
  step = jax.jit(functools.partial(ts.train_step, family=models.get_family(model.config), tx=tx,
                                   schedule=schedule))
  return tx, step


def init_state(params: Any, tx: Any) -> ts.TrainState:
  """A fresh TrainState around `params` (as `training.train_step.init_train_state`, without re-init)."""
  return ts.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def max_abs_diff(a: Any, b: Any) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
