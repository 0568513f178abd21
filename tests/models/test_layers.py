"""Tests for models/layers.py: RMSNorm, GatedMLP, DenseGeneral, vocab padding, MLP width, KV-cache helpers."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers
from tests.models import model_testing as mt


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_rmsnorm_matches_formula_and_has_unit_rms():
  x = _normal(0, (2, 5, 16)) * 3.0 + 1.0
  norm = layers.RMSNorm(eps=1e-6)
  params = norm.init(mt.key(0), x)
  assert nn.unbox(params)["params"]["scale"].shape == (16,)
  y = norm.apply(params, x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(y), axis=-1)), 1.0, rtol=1e-5)
  expected = x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  # The learned scale multiplies each feature.
  scale = jnp.arange(16, dtype=jnp.float32)
  scaled = norm.apply({"params": {"scale": scale}}, x)
  np.testing.assert_allclose(scaled, expected * np.asarray(scale), rtol=1e-5, atol=1e-5)


def test_rmsnorm_computes_in_f32_and_returns_dtype():
  x = (_normal(1, (3, 8)) * 100.0).astype(jnp.bfloat16)
  norm = layers.RMSNorm(dtype=jnp.bfloat16)
  y = norm.apply(norm.init(mt.key(0), x), x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(np.asarray(y, np.float32)), axis=-1)), 1.0,
                             rtol=1e-2)
  # A zero vector stays finite (eps).
  zeros = jnp.zeros((1, 8))
  assert np.all(np.isfinite(layers.RMSNorm().apply({"params": {"scale": jnp.ones(8)}}, zeros)))


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_gated_mlp_shapes(activation):
  x = _normal(2, (2, 7, 12))
  mlp = layers.GatedMLP(hidden_dim=20, activation=activation)
  params = nn.unbox(mlp.init(mt.key(0), x))["params"]
  assert params["wi_gate"]["kernel"].shape == (12, 20)
  assert params["wi_up"]["kernel"].shape == (12, 20)
  assert params["wo"]["kernel"].shape == (20, 12)
  y = mlp.apply({"params": params}, x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  act = nn.silu if activation == "swiglu" else nn.gelu
  expected = (act(x @ params["wi_gate"]["kernel"]) * (x @ params["wi_up"]["kernel"])) @ params["wo"]["kernel"]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_gated_mlp_rejects_unknown_activation():
  with pytest.raises(ValueError, match="unknown mlp_activation 'relu'"):
    layers.GatedMLP(hidden_dim=8, activation="relu").init(mt.key(0), jnp.zeros((1, 2, 4)))


def test_dense_general_contracts_trailing_dims():
  x = _normal(3, (2, 3, 4, 5))
  dense = layers.DenseGeneral((6,), (layers.HEADS, layers.HEAD_DIM, layers.EMBED), in_dims=2)
  params = nn.unbox(dense.init(mt.key(0), x))["params"]
  assert params["kernel"].shape == (4, 5, 6)
  y = dense.apply({"params": params}, x)
  np.testing.assert_allclose(y, np.einsum("bthd,hde->bte", x, params["kernel"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab,multiple,expected", [(259, 128, 384), (256, 128, 256), (257, 128, 384),
                                                     (259, 1, 259), (259, 0, 259), (1, 8, 8)])
def test_padded_vocab_size(vocab, multiple, expected):
  assert layers.padded_vocab_size(vocab, multiple) == expected


@pytest.mark.parametrize("d_model,expected", [(32, 64), (64, 192), (96, 256), (256, 704), (768, 2048),
                                              (1024, 2752)])
def test_default_mlp_dim(d_model, expected):
  assert layers.default_mlp_dim(d_model) == expected
  assert expected % 64 == 0


def test_attention_dims():
  config = mt.tiny_model_config("softmax")
  assert layers.attention_dims(config) == (4, 4, 8)
  assert layers.attention_dims(mt.tiny_model_config("softmax", num_kv_heads=2, head_dim=16)) == (4, 2, 16)


def test_dtype_of():
  assert layers.dtype_of("bfloat16") == jnp.bfloat16
  assert layers.dtype_of(jnp.float32) == jnp.float32
  with pytest.raises(ValueError, match="unknown dtype 'float8'"):
    layers.dtype_of("float8")


def test_embed_lookup_and_tied_logits():
  embed = layers.Embed(num_embeddings=16, features=4)
  params = nn.unbox(embed.init(mt.key(0), jnp.zeros((1, 2), jnp.int32)))["params"]
  table = params["embedding"]
  ids = jnp.array([[0, 3, 15]])
  np.testing.assert_array_equal(embed.apply({"params": params}, ids), table[ids])
  x = _normal(4, (1, 3, 4))
  logits = embed.apply({"params": params}, x, method=layers.Embed.attend)
  assert logits.shape == (1, 3, 16) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, np.einsum("btd,vd->btv", x, table) / 2.0, rtol=1e-5, atol=1e-5)


class _CacheUser(nn.Module):
  """Appends k = v = x to a KV cache and returns what `cache_append` hands to attention."""

  @nn.compact
  def __call__(self, x):
    cache = layers.declare_kv_cache(self, x.shape, x.shape, x.dtype)
    return layers.cache_append(cache, x, x)


def test_kv_cache_append_positions_and_masking_of_empty_slots():
  module = _CacheUser()
  cache = module.init(mt.key(0), jnp.zeros((1, 6, 1, 2)))["cache"]
  assert int(cache["index"]) == 0
  assert cache["keys"].shape == (1, 6, 1, 2)
  chunk = jnp.ones((1, 2, 1, 2))
  (keys, _, q_pos, kv_pos), mutated = module.apply({"cache": cache}, chunk, mutable=["cache"])
  np.testing.assert_array_equal(q_pos, [[0, 1]])
  # Filled slots keep their index as position; empty ones come after every query (hidden by causality).
  assert kv_pos[0, :2].tolist() == [0, 1] and np.all(np.asarray(kv_pos[0, 2:]) > 10**9)
  (keys, _, q_pos, kv_pos), mutated = module.apply({"cache": mutated["cache"]}, 2 * chunk[:, :1],
                                                   mutable=["cache"])
  np.testing.assert_array_equal(q_pos, [[2]])
  assert kv_pos[0, :3].tolist() == [0, 1, 2] and int(mutated["cache"]["index"]) == 3
  np.testing.assert_array_equal(keys[0, :, 0, 0], [1, 1, 2, 0, 0, 0])
