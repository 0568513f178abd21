"""Tests for models/transformer.py (the layer stack shared by every mixer) and its RoPE / GQA options.

Mixer-generic properties (causality, segments, decode == forward, training, checkpoints) live in
test_mixers.py; here are the stack's own options: nn.scan, remat, per-layer mixer lists, GQA, qk-norm,
the tied (padded) embedding, and the rotary embedding's maths.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from configs import base
from models import layers
from models import decoding
from models import transformer
from tests.models import model_testing as mt
from ops import losses

B, T = mt.BATCH, mt.SEQ_LEN
ATOL = 1e-5


def _stack_layers(params, num_layers):
  """Unrolled params {layer_0, layer_1, ...} -> the nn.scan layout {layers: leaves stacked on axis 0}."""
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layer_{i}"] for i in range(num_layers)])
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  out["layers"] = stacked
  return out


@functools.partial(jax.jit, static_argnames="model")
def _loss_and_grads(model, params, batch):
  def loss(params):
    nll, count = losses.weighted_nll(model.apply({"params": params}, batch["inputs"]), batch["targets"],
                                 batch["weights"])
    return nll / count
  return jax.value_and_grad(loss)(params)


def _assert_trees_close(actual, expected, atol, rtol=0.0):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol, rtol=rtol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def unrolled():
  """The tiny softmax model (unrolled layers), its params, inputs and parallel logits."""
  config = mt.tiny_model_config("softmax")
  model = models.get_model(config)
  params = mt.init_params(model)
  inputs = mt.random_ids(5, (B, T))
  return config, model, params, inputs, mt.forward(model, params, inputs)


def test_scan_layers_equals_unrolled_stack(unrolled):
  config, model, params, inputs, expected = unrolled
  scan_config = mt.tiny_model_config("softmax", scan_layers=True)
  scan_model = models.get_model(scan_config)
  scan_params = _stack_layers(params, config.num_layers)
  # The converted tree is exactly what the scanned model would initialise.
  abstract = jax.eval_shape(scan_model.init, mt.key(0), jnp.zeros((1, T), jnp.int32))["params"]
  assert jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(abstract)) == jax.tree.map(
      lambda x: (x.shape, x.dtype), scan_params)
  assert mt.max_abs_diff(mt.forward(scan_model, scan_params, inputs), expected) <= ATOL

  batch = mt.lm_batch(inputs)
  loss, grads = _loss_and_grads(model, params, batch)
  scan_loss, scan_grads = _loss_and_grads(scan_model, scan_params, batch)
  np.testing.assert_allclose(float(scan_loss), float(loss), rtol=1e-6)
  _assert_trees_close(scan_grads, _stack_layers(grads, config.num_layers), atol=1e-6, rtol=1e-4)

  # Decoding with the stacked (per-layer) cache reproduces the forward.
  decode_model = models.get_model(scan_config, decode=True)
  cache = decoding.init_cache(decode_model, B, T)
  assert cache["layers"]["mixer"]["index"].shape == (config.num_layers,)
  decoded = mt.decode_in_pieces(decode_model, scan_params, inputs, (T - 1, 1), cache_len=T)
  assert mt.max_abs_diff(decoded, expected) <= ATOL


@pytest.mark.parametrize("remat,scan", [("full", False), ("dots_saveable", True)])
def test_remat_gives_same_loss_and_grads(unrolled, remat, scan):
  config, _, params, inputs, _ = unrolled
  if scan:
    params = _stack_layers(params, config.num_layers)
  batch = mt.lm_batch(inputs)
  plain = models.get_model(mt.tiny_model_config("softmax", scan_layers=scan))
  rematted = models.get_model(mt.tiny_model_config("softmax", scan_layers=scan, remat=remat))
  loss, grads = _loss_and_grads(plain, params, batch)
  remat_loss, remat_grads = _loss_and_grads(rematted, params, batch)
  np.testing.assert_allclose(float(remat_loss), float(loss), rtol=1e-6)
  _assert_trees_close(remat_grads, grads, atol=1e-6, rtol=1e-5)


def _init_shapes(config):
  return jax.eval_shape(models.get_model(config).init, mt.key(0), jnp.zeros((1, 8), jnp.int32))


def test_per_layer_mixer_list():
  # A config file may replace the default name by a list (base.py types the field as `object`).
  config = base.get_config().model
  config.update(mt.TINY_MODEL, num_layers=3)
  config.mixer = ["softmax", "softmax", "softmax"]
  config = models.freeze(config)
  assert transformer.layer_mixers(config) == ("softmax",) * 3
  params = _init_shapes(config)["params"]
  assert {"layer_0", "layer_1", "layer_2"} <= set(params)
  assert transformer.layer_mixers(mt.tiny_model_config("softmax")) == ("softmax",) * 2


@pytest.mark.parametrize("scan", [False, True])
def test_mixer_list_of_wrong_length_is_a_clear_error(scan):
  config = mt.tiny_model_config(["softmax", "softmax", "softmax"], num_layers=2, scan_layers=scan)
  with pytest.raises(ValueError, match=r"model.mixer lists 3 mixers but model.num_layers is 2"):
    _init_shapes(config)


def test_unknown_mixer_is_a_clear_error_listing_registered_ones():
  config = base.get_config().model
  config.update(mt.TINY_MODEL, mixer="no_such_mixer")
  with pytest.raises(ValueError, match="unknown model.mixer 'no_such_mixer'") as error:
    _init_shapes(models.freeze(config))
  for name in models.mixer_names():
    assert name in str(error.value)
  with pytest.raises(ValueError, match="no_such_mixer"):
    models.get_mixer("no_such_mixer")


def test_unknown_remat_and_bad_gqa_are_clear_errors():
  with pytest.raises(ValueError, match="unknown model.remat 'sometimes'"):
    _init_shapes(mt.tiny_model_config("softmax", remat="sometimes"))
  with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple of model.num_kv_heads \(3\)"):
    _init_shapes(mt.tiny_model_config("softmax", num_kv_heads=3))


def test_gqa_and_qk_norm_decode_matches_forward():
  kv_heads = 2
  config = mt.tiny_model_config("softmax", num_kv_heads=kv_heads, qk_norm=True)
  model = models.get_model(config)
  params = mt.init_params(model)
  attn = params["layer_0"]["mixer"]
  head_dim = config.d_model // config.num_heads
  assert attn["query"]["kernel"].shape == (config.d_model, config.num_heads, head_dim)
  assert attn["key"]["kernel"].shape == (config.d_model, kv_heads, head_dim)
  assert attn["value"]["kernel"].shape == (config.d_model, kv_heads, head_dim)
  assert attn["query_norm"]["scale"].shape == attn["key_norm"]["scale"].shape == (head_dim,)
  inputs = mt.random_ids(6, (B, T))
  expected = mt.forward(model, params, inputs)
  assert bool(jnp.all(jnp.isfinite(expected)))
  decoded = mt.decode_in_pieces(models.get_model(config, decode=True), params, inputs, (T - 1, 1),
                                cache_len=T)
  assert mt.max_abs_diff(decoded, expected) <= ATOL


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_logits_exclude_padded_vocab_rows(tie, unrolled):
  config = mt.tiny_model_config("softmax", tie_embeddings=tie)
  assert layers.padded_vocab_size(config.vocab_size, config.vocab_pad_multiple) == 384
  model = models.get_model(config)
  params = unrolled[2] if tie else mt.init_params(model)
  inputs = unrolled[3]
  assert params["embed"]["embedding"].shape == (384, config.d_model)
  logits = mt.forward(model, params, inputs)
  assert logits.shape == (B, T, 259)
  # The padding rows (ids 259..383) can never influence the logits: change them arbitrarily.
  changed = jax.tree.map(lambda x: x, params)
  changed["embed"] = {"embedding": params["embed"]["embedding"].at[259:].set(1e3)}
  if not tie:
    assert params["unembed"]["kernel"].shape == (config.d_model, 384)
    changed["unembed"] = {"kernel": params["unembed"]["kernel"].at[:, 259:].set(1e3)}
  np.testing.assert_array_equal(np.asarray(mt.forward(model, changed, inputs)), np.asarray(logits))


def _rope_inputs(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_rope_preserves_norms():
  x = _rope_inputs(0, (2, 9, 3, 16))
  positions = jnp.asarray(np.random.default_rng(1).integers(0, 5000, (2, 9)), jnp.int32)
  y = layers.rope(x, positions)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  # Position 0 is the identity.
  np.testing.assert_allclose(layers.rope(x, jnp.zeros((2, 9), jnp.int32)), x, rtol=0, atol=0)


def test_rope_scores_depend_only_on_relative_position():
  q = _rope_inputs(2, (1, 1, 2, 32))
  k = _rope_inputs(3, (1, 1, 2, 32))

  def score(q_pos, k_pos, theta=10_000.0):
    rq = layers.rope(q, jnp.full((1, 1), q_pos, jnp.int32), theta)
    rk = layers.rope(k, jnp.full((1, 1), k_pos, jnp.int32), theta)
    return np.asarray(jnp.sum(rq * rk, axis=-1))[0, 0]  # one score per head

  for q_pos, k_pos in ((5, 2), (7, 7), (3, 11)):
    for offset in (1, 40, 1000):
      np.testing.assert_allclose(score(q_pos + offset, k_pos + offset), score(q_pos, k_pos),
                                 rtol=1e-4, atol=1e-4)
  # ... and it does depend on the relative position.
  assert np.abs(score(9, 2) - score(2, 2)).max() > 1e-3
  # Same position: the rotation cancels, the score is the plain dot product.
  np.testing.assert_allclose(score(123, 123), np.asarray(jnp.sum(q * k, axis=-1))[0, 0], rtol=1e-4)


def test_rope_rejects_odd_head_dim():
  with pytest.raises(ValueError, match="even head_dim"):
    layers.rope(jnp.zeros((1, 2, 1, 5)), jnp.zeros((1, 2), jnp.int32))


def test_rope_tables_computed_once_for_q_and_k_forward_and_backward():
  """Structural, not timed: the compiled gradient of RoPE on q and k evaluates one sine and one cosine
  (XLA:CPU otherwise fuses them into each elementwise consumer, 8x per layer at [B, T, H, D/2])."""
  q, k = _rope_inputs(4, (2, 16, 3, 8)), _rope_inputs(5, (2, 16, 3, 8))
  positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
  loss = lambda q, k: jnp.sum(layers.rope(q, positions) * layers.rope(k, positions))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(q, k).compile().as_text()
  assert hlo.count(" sine(") == 1 and hlo.count(" cosine(") == 1
