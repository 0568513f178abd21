"""SSA-specific tests (models/attention.py "ssa", specs/attention_variants.md §4A / §7.1 / §7.3); the shared
mixer suite (tests/models/test_mixers.py) covers shapes, causality, segments, decoding and training.

- With the position scale exactly 0 and u = 0 the SSA model reproduces the "softmax" model's logits
  bitwise (same shared params); the default init is near (not exactly) that.
- The temperatures follow the documented formulas for every switch (add / mul, value_position,
  token / value temperature, exp_exp / sigmoid), and the switches change the layer output.
- Decoding uses absolute positions: single-token decode == forward, while the official code's bug
  (position = row within the current block, spec §7.1) breaks that equality.
- bf16 temperatures keep the activation dtype; unknown options raise.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import attention as attention_lib
from tests.models import model_testing as mt

B, T, D = 2, 13, 32
NUM_HEADS, NUM_KV_HEADS = 4, 2
HEAD_DIM = D // NUM_HEADS
# Non-trivial temperatures: s = exp(-exp(-0.5)) ~ 0.55 and tau_tok ~ +-0.5.
ACTIVE = {"ssa.position_init": -0.5, "ssa.token_init_scale": 0.5}


def _config(**ssa_options):
  overrides = {f"ssa.{name}": value for name, value in ssa_options.items()}
  return mt.tiny_model_config("ssa", num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, **overrides)


def _x(seed=0, t=T, batch=B):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, t, D)), jnp.float32)


def _params(module, x):
  return nn.unbox(jax.jit(module.init)(mt.key(1), x)["params"])


@functools.partial(jax.jit, static_argnames="module")
def _apply(module, params, x, segment_ids=None, positions=None):
  return module.apply({"params": params}, x, segment_ids, positions)


@functools.partial(jax.jit, static_argnames="module")
def _temperatures(module, params, x, positions):
  """(q projection, v, tau_q, tau_v): the `temperatures` hook's inputs and outputs in a layer call."""
  captured = {}

  def capture(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "temperatures":
      captured["q"], captured["v"] = args[:2]
      captured["tau_q"], captured["tau_v"] = out
    return out

  with nn.intercept_methods(capture):
    module.apply({"params": params}, x, None, positions)
  return captured["q"], captured["v"], captured["tau_q"], captured["tau_v"]


def _merge(base, extra):
  """base params with the keys only `extra` has (the SSA parameters) added, recursively."""
  if not isinstance(base, dict):
    return base
  merged = {key: _merge(value, extra[key]) for key, value in base.items()}
  merged.update({key: value for key, value in extra.items() if key not in base})
  return merged


@pytest.fixture(scope="module")
def softmax_setup():
  model = models.get_model(mt.tiny_model_config("softmax"))
  return model, mt.init_params(model, seed=3)


def test_exact_identity_init_reproduces_softmax(softmax_setup):
  """position_init 30 (s = exp(-e^30) == 0 in f32) and u = 0: tau == 1, logits == softmax's."""
  softmax_model, softmax_params = softmax_setup
  model = models.get_model(mt.tiny_model_config("ssa", **{"ssa.position_init": 30.0,
                                                          "ssa.token_init_scale": 0.0}))
  ssa_params = mt.init_params(model)
  params = _merge(softmax_params, ssa_params)
  assert set(params["layer_0"]["mixer"]) == {"query", "key", "value", "out", "position_scale",
                                             "query_temperature", "value_temperature"}
  inputs = mt.random_ids(5, (B, mt.SEQ_LEN))
  segment_ids = np.where(np.arange(mt.SEQ_LEN) < 9, 1, 2).astype(np.int32)[None].repeat(B, 0)
  positions = np.where(np.arange(mt.SEQ_LEN) < 9, np.arange(mt.SEQ_LEN), np.arange(mt.SEQ_LEN) - 9)
  positions = positions.astype(np.int32)[None].repeat(B, 0)
  for args in ((), (segment_ids, positions)):
    want = np.asarray(mt.forward(softmax_model, softmax_params, inputs, *args))
    got = np.asarray(mt.forward(model, params, inputs, *args))
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_default_init_is_near_identity(softmax_setup):
  """Defaults (beta = 2: s ~ 6.2e-4, u = 0) move the logits a little, not a lot."""
  softmax_model, softmax_params = softmax_setup
  model = models.get_model(mt.tiny_model_config("ssa", **{"ssa.position_init": None,
                                                          "ssa.token_init_scale": 0.0}))
  params = _merge(softmax_params, mt.init_params(model))
  assert float(params["layer_0"]["mixer"]["position_scale"]) == 2.0
  inputs = mt.random_ids(6, (B, mt.SEQ_LEN))
  diff = mt.max_abs_diff(mt.forward(model, params, inputs), mt.forward(softmax_model, softmax_params,
                                                                        inputs))
  assert 0 < diff < 0.05, diff


# (options, expected tau_q, expected tau_v) as functions of (tau_pos, tok_q, tok_v).
SWITCHES = {
    "add": ({}, lambda p, tq, tv: p + tq, lambda p, tq, tv: p + tv),
    "mul": ({"combine": "mul"}, lambda p, tq, tv: p * (1 + tq), lambda p, tq, tv: p * (1 + tv)),
    "add_no_value_position": ({"value_position": False}, lambda p, tq, tv: p + tq,
                              lambda p, tq, tv: 1 + tv),
    "mul_no_value_position": ({"combine": "mul", "value_position": False},
                              lambda p, tq, tv: p * (1 + tq), lambda p, tq, tv: 1 + tv),
    "position_only": ({"token_temperature": False}, lambda p, tq, tv: p, lambda p, tq, tv: p),
    "no_value_temperature": ({"value_temperature": False}, lambda p, tq, tv: p + tq,
                             lambda p, tq, tv: np.ones_like(tv)),
    "sigmoid": ({"position_param": "sigmoid", "position_init": -1.0}, lambda p, tq, tv: p + tq,
                lambda p, tq, tv: p + tv),
}


SLOW_SWITCHES = ("mul_no_value_position", "no_value_temperature", "sigmoid")


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_SWITCHES
                                  else name for name in SWITCHES])
def test_temperatures_follow_the_documented_formulas(name):
  options, want_q, want_v = SWITCHES[name]
  options = {"position_init": -0.5, "token_init_scale": 0.5, **options}
  module = models.get_mixer("ssa")(config=_config(**options))
  params = _params(module, _x())
  positions = jnp.asarray(np.random.default_rng(7).integers(0, 1000, (B, T)), jnp.int32)
  q, v, tau_q, tau_v = _temperatures(module, params, _x(5), positions)
  assert q.shape == (B, T, NUM_HEADS, HEAD_DIM) and v.shape == (B, T, NUM_KV_HEADS, HEAD_DIM)
  np.testing.assert_allclose(np.asarray(q), np.einsum("btd,dhk->bthk", _x(5), params["query"]["kernel"]),
                             rtol=1e-5, atol=1e-5)  # the hook sees W_q x (weight sharing)

  raw = float(params["position_scale"])
  s = 1 / (1 + np.exp(-raw)) if options.get("position_param") == "sigmoid" else np.exp(-np.exp(raw))
  tau_pos = (1 + s * np.log(np.asarray(positions, np.float64) + 1))[..., None]
  gelu = lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))  # exact GELU
  if options.get("token_temperature", True):
    tok_q = np.tanh(np.einsum("bthd,hd->bth", gelu(np.asarray(q, np.float64)),
                              np.asarray(params["query_temperature"])))
    tok_v = (np.tanh(np.einsum("bthd,hd->bth", gelu(np.asarray(v, np.float64)),
                               np.asarray(params["value_temperature"])))
             if "value_temperature" in params else np.zeros((B, T, NUM_KV_HEADS)))
    assert np.abs(tok_q).max() > 0.1
  else:
    assert "query_temperature" not in params and "value_temperature" not in params
    tok_q = tok_v = np.zeros((B, T, 1))
  np.testing.assert_allclose(np.asarray(tau_q), np.broadcast_to(want_q(tau_pos, tok_q, tok_v),
                                                                tau_q.shape), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(tau_v), np.broadcast_to(want_v(tau_pos, tok_q, tok_v),
                                                                tau_v.shape), rtol=1e-5, atol=1e-6)
  assert np.abs(tau_pos - 1).max() > 0.5  # the position part is active


def test_switches_change_the_layer_output():
  x = _x(2)
  outputs = {}
  params = None
  for name in ("add", "mul", "add_no_value_position"):
    module = models.get_mixer("ssa")(config=_config(**{"position_init": -0.5, "token_init_scale": 0.5},
                                                    **SWITCHES[name][0]))
    params = _params(module, x) if params is None else params  # one set of params for all switches
    outputs[name] = np.asarray(_apply(module, params, x))
  names = list(outputs)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert np.abs(outputs[a] - outputs[b]).max() > 1e-3, (a, b)


class RowWithinBlockSSA(attention_lib.SelectiveSelfAttention):
  """The official code's bug (spec §7.1): the position factor indexed by the row within the block."""

  def temperatures(self, q, v, positions):
    return super().temperatures(q, v, positions - positions[:, :1])


def test_decoding_uses_absolute_positions():
  """Single-token decoding == forward; the row-within-block bug (tau_pos = 1 when T = 1) fails this."""
  config = _config(**{"position_init": -0.5, "token_init_scale": 0.5})
  x = _x(3)
  pieces = (6,) + (1,) * (T - 6)
  params = _params(models.get_mixer("ssa")(config=config), x)
  for cls, should_match in ((attention_lib.SelectiveSelfAttention, True), (RowWithinBlockSSA, False)):
    forward = np.asarray(_apply(cls(config=config), params, x))
    decoded, _ = mt.decode_mixer_in_pieces(cls(config=config, decode=True), params, x, pieces, T + 3)
    decoded = np.asarray(decoded)
    np.testing.assert_allclose(decoded[:, :6], forward[:, :6], rtol=0, atol=1e-5)  # the prefill
    diff = np.abs(decoded[:, 6:] - forward[:, 6:]).max()
    assert (diff <= 1e-5) if should_match else (diff > 1e-3), (cls.__name__, diff)


def test_bf16_keeps_the_activation_dtype():
  config = mt.tiny_model_config("ssa", dtype="bfloat16", **ACTIVE)
  module = models.get_mixer("ssa")(config=config)
  x = _x(4).astype(jnp.bfloat16)
  params = _params(module, x)
  _, _, tau_q, tau_v = _temperatures(module, params, x, jnp.zeros((B, T), jnp.int32))
  assert tau_q.dtype == jnp.bfloat16 and tau_v.dtype == jnp.bfloat16
  y = _apply(module, params, x)
  assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_bad_options_raise():
  x = _x()
  with pytest.raises(ValueError, match="unknown model.ssa option"):
    models.get_mixer("ssa")(config=_config(temperature=2.0)).init(mt.key(0), x)
  with pytest.raises(ValueError, match="model.ssa.combine"):
    models.get_mixer("ssa")(config=_config(combine="max")).init(mt.key(0), x)
  with pytest.raises(ValueError, match="model.ssa.position_param"):
    models.get_mixer("ssa")(config=_config(position_param="softplus")).init(mt.key(0), x)
