"""Cog-specific tests (specs/attention_variants.md §3); the shared mixer suite covers the rest.

- The "cog" mixer equals a materialised sign(s) * softmax(|s|) attention (§3.1) computed here in float64
  from the layer's own q/k/v/out kernels, with GQA, RoPE and packed segments.
- It is SelfAttention(signed=True) exactly, and differs from softmax with the same params.
- configs/cog.py keeps softmax in the first and last layer (§3.2), and its switch / num_layers overrides
  rebuild the per-layer list.
- Masked keys, zero scores (sign(0) = 0, §3.6) and very large scores stay finite, gradients included.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import attention as attention_lib
from models import layers
from models import transformer
from ops.attention import attention
from tests.models import model_testing as mt
from training import cli

B, T, D = 2, 13, 32
NUM_HEADS, NUM_KV_HEADS = 4, 2  # GQA: query head h reads kv head h // 2
CONFIG = mt.tiny_model_config("cog", d_model=D, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS)
HEAD_DIM = D // NUM_HEADS


def _module(signed: bool | None = None):
  if signed is None:
    return models.get_mixer("cog")(config=CONFIG, layer_index=1, decode=False)
  return attention_lib.SelfAttention(config=CONFIG, layer_index=1, decode=False, signed=signed)


@functools.partial(jax.jit, static_argnames="module")
def _apply(module, params, x, segment_ids, positions):
  return module.apply({"params": params}, x, segment_ids, positions)


def _params(seed: int = 0):
  x = jnp.zeros((1, T, D), jnp.float32)
  return nn.unbox(jax.jit(_module().init)(mt.key(seed), x)["params"])


def _inputs(seed: int = 1, scale: float = 1.0):
  return scale * jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


def _packed_segments():
  """Row 0: one document; row 1: documents [0, 5) and [5, 11), then 2 padding tokens (segment 0)."""
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[1, 5:] = 2
  segment_ids[1, 11:] = 0
  positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  positions[1, 5:11] -= 5
  positions[1, 11:] -= 11
  return segment_ids, positions


def _materialised_cog(params, x, segment_ids, positions) -> np.ndarray:
  """§3.1 in float64: w_ij = sign(s_ij) exp(|s_ij|) / sum_{j' visible} exp(|s_ij'|); o_i = sum_j w_ij v_j."""
  kernel = {name: np.asarray(params[name]["kernel"], np.float64)
            for name in ("query", "key", "value", "out")}
  x = np.asarray(x, np.float64)
  q = np.einsum("btd,dhk->bthk", x, kernel["query"])
  k = np.einsum("btd,dhk->bthk", x, kernel["key"])
  v = np.einsum("btd,dhk->bthk", x, kernel["value"])
  # RoPE itself is tested in tests/models/test_layers.py; here it only has to match the layer's.
  q = np.asarray(layers.rope(jnp.asarray(q, jnp.float32), jnp.asarray(positions)), np.float64)
  k = np.asarray(layers.rope(jnp.asarray(k, jnp.float32), jnp.asarray(positions)), np.float64)
  group = NUM_HEADS // NUM_KV_HEADS
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM)
  visible = (np.tril(np.ones((T, T), bool))[None]
             & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]  # [B, 1, T, T]
  a = np.where(visible, np.abs(s), -np.inf)  # mask |s|, not s (§3.1)
  p = np.exp(a - a.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  w = np.sign(s) * p  # masked entries have p = 0
  o = np.einsum("bhqk,bkhd->bqhd", w, v)
  return np.einsum("bthk,hkd->btd", o, kernel["out"])


def test_cog_layer_matches_materialised_reference():
  params = _params()
  x = _inputs()
  segment_ids, positions = _packed_segments()
  y = np.asarray(_apply(_module(), params, x, segment_ids, positions))
  expected = _materialised_cog(params, x, segment_ids, positions)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_cog_is_signed_self_attention_and_not_softmax():
  params = _params()
  x = _inputs()
  segment_ids, positions = _packed_segments()
  cog = np.asarray(_apply(_module(), params, x, segment_ids, positions))
  signed = np.asarray(_apply(_module(signed=True), params, x, segment_ids, positions))
  softmax = np.asarray(_apply(_module(signed=False), params, x, segment_ids, positions))
  np.testing.assert_array_equal(cog, signed)
  assert mt.max_abs_diff(cog, softmax) > 1e-3
  # Same parameter tree as softmax, so checkpoints and param counts compare like for like (§3.1).
  softmax_params = nn.unbox(jax.jit(_module(signed=False).init)(mt.key(0), jnp.zeros((1, T, D)))["params"])
  assert jax.tree.structure(params) == jax.tree.structure(softmax_params)


def _config_mixers(*overrides: str) -> tuple[str, ...]:
  config, _ = cli.parse(["train.py", "--config=configs/cog.py", *overrides])
  return transformer.layer_mixers(models.freeze(config.model))


def test_config_keeps_softmax_in_first_and_last_layer():
  assert _config_mixers() == ("softmax", "cog", "cog", "softmax")  # base num_layers = 4
  assert _config_mixers("--config.model.num_layers=6") == ("softmax",) + ("cog",) * 4 + ("softmax",)
  assert _config_mixers("--config.model.cog.softmax_first_last=False") == ("cog",) * 4
  assert _config_mixers("--config.model.num_layers=3", "--config.model.cog.softmax_first_last=false") == (
      ("cog",) * 3)


@pytest.mark.parametrize("case", ["zero_input", "large_scores", "random"])
def test_masked_keys_stay_finite_with_gradients(case):
  """Padding / packed segments with zero scores (sign(0) = 0: every weight 0) or |s| ~ 1e3 (exp overflow
  without the max subtraction): outputs and gradients w.r.t. x and every parameter stay finite."""
  params = _params()
  x = {"zero_input": _inputs(scale=0.0), "large_scores": _inputs(scale=30.0), "random": _inputs()}[case]
  segment_ids, positions = _packed_segments()
  cotangent = _inputs(seed=7)

  def loss(params, x):
    return jnp.sum(_module().apply({"params": params}, x, segment_ids, positions) * cotangent)

  value, (grad_params, grad_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  assert bool(jnp.isfinite(value))
  for name, g in [("x", grad_x)] + [(jax.tree_util.keystr(p), g)
                                      for p, g in jax.tree_util.tree_leaves_with_path(grad_params)]:
    assert bool(jnp.all(jnp.isfinite(g))), f"non-finite gradient for {name} ({case})"
  if case == "zero_input":  # all scores are 0, so every Cog weight is sign(0) * p = 0 and y = 0
    y = _apply(_module(), params, x, segment_ids, positions)
    np.testing.assert_array_equal(np.asarray(y), 0.0)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_fully_masked_rows_are_zero_and_finite(impl):
  """In the layer every query sees itself, so a query with no visible key only arises with separate key
  segments (cross-segment / cache use): the signed op must give o = 0 and finite gradients there (§3.6)."""
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 6, 2, 8)) for i in range(3))
  segment_ids = jnp.array([[1, 1, 3, 3, 2, 2]], jnp.int32)  # queries of segment 3 see no key
  kv_segment_ids = jnp.array([[1, 1, 1, 2, 2, 2]], jnp.int32)

  def f(q, k, v):
    return attention(q, k, v, causal=False, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                     signed=True, impl=impl)

  o = f(q, k, v)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  assert bool(jnp.all(jnp.isfinite(o)))
  np.testing.assert_array_equal(np.asarray(o[:, 2:4]), 0.0)
  for g in grads:
    assert bool(jnp.all(jnp.isfinite(g)))
  np.testing.assert_array_equal(np.asarray(grads[0][:, 2:4]), 0.0)
