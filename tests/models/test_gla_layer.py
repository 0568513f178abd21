"""GLA layer specifics (models/gla.py); the generic mixer checks are in tests/models/test_mixers.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import gla as gla_model
from ops import gla as gla_ops
from tests.models import model_testing as mt

D, H = 32, 4


def _layer(**gla_options):
  overrides = {f"gla.{name}": value for name, value in gla_options.items()}
  config = mt.tiny_model_config("gla", **overrides)
  return gla_model.GatedLinearAttention(config=config, layer_index=0, decode=False), config


def _x(t=23, seed=0, batch=2):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, t, D)), jnp.float32)


def _params(module, x):
  return nn.unbox(jax.jit(module.init)(mt.key(1), x)["params"])


def _reference_layer(params, x, output_norm="rmsnorm", use_output_gate=True, eps=1e-5):
  """The layer written out from spec §1.2 on the f32 recurrent oracle (no segments)."""
  p = params
  q = jnp.einsum("btd,dhk->bthk", x, p["query"]["kernel"])
  k = jnp.einsum("btd,dhk->bthk", x, p["key"]["kernel"])
  v = jnp.einsum("btd,dhk->bthk", x, p["value"]["kernel"])
  low = x @ p["gate"]["down"]["kernel"]
  log_gate = jax.nn.log_sigmoid(jnp.einsum("btr,rhk->bthk", low, p["gate"]["up"]["kernel"])
                                + p["gate"]["bias"]) / 16.0
  o, _ = gla_ops.gla(q, k, v, log_gate, impl="reference")
  if output_norm == "rmsnorm":
    o = o * jax.lax.rsqrt(jnp.mean(o * o, -1, keepdims=True) + eps) * p["output_norm"]["scale"]
  elif output_norm == "layernorm":
    o = o - o.mean(-1, keepdims=True)
    o = o * jax.lax.rsqrt(jnp.mean(o * o, -1, keepdims=True) + eps)
  if use_output_gate:
    o = o * jax.nn.silu(jnp.einsum("btd,dhk->bthk", x, p["output_gate"]["kernel"]))
  return jnp.einsum("bthk,hkd->btd", o, p["out"]["kernel"])


@pytest.mark.parametrize("expand_k, expand_v, num_heads", [(0.5, 1.0, 0), (1.0, 2.0, 2)])
def test_parameter_shapes(expand_k, expand_v, num_heads):
  module, _ = _layer(expand_k=expand_k, expand_v=expand_v, num_heads=num_heads)
  params = _params(module, _x())
  h = num_heads or H
  dk, dv = int(D * expand_k) // h, int(D * expand_v) // h
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes == {
      "query": {"kernel": (D, h, dk)}, "key": {"kernel": (D, h, dk)}, "value": {"kernel": (D, h, dv)},
      "gate": {"down": {"kernel": (D, 16)}, "up": {"kernel": (16, h, dk)}, "bias": (h, dk)},
      "output_norm": {"scale": (dv,)}, "output_gate": {"kernel": (D, h, dv)},
      "out": {"kernel": (h, dv, D)}}
  assert gla_model.gla_dims(mt.tiny_model_config("gla", **{"gla.expand_k": expand_k,
                                                           "gla.expand_v": expand_v,
                                                           "gla.num_heads": num_heads})) == (h, dk, dv)


def test_bad_options_raise():
  with pytest.raises(ValueError, match="unknown model.gla option"):
    gla_model.gla_options(mt.tiny_model_config("gla", **{"gla.expandk": 0.5}))
  with pytest.raises(ValueError, match="multiples of num_heads"):
    gla_model.gla_dims(mt.tiny_model_config("gla", **{"gla.expand_k": 0.3}))


@pytest.mark.parametrize("clamp_min", [None, -0.05])
def test_gate_is_scaled_logsigmoid(clamp_min):
  gate = gla_model.LowRankGate(H, 4, rank=16, normalizer=16.0, clamp_min=clamp_min)
  x = _x() * 30  # large logits: strong decay, so the clamp is active somewhere
  variables = gate.init(mt.key(2), x)
  p = nn.unbox(variables["params"])
  p["bias"] = jnp.asarray(np.random.default_rng(5).normal(size=p["bias"].shape), jnp.float32)
  log_gate = gate.apply({"params": p}, x)
  want = jax.nn.log_sigmoid(jnp.einsum("btr,rhk->bthk", x @ p["down"]["kernel"], p["up"]["kernel"])
                            + p["bias"]) / 16.0
  if clamp_min is not None:
    assert float(jnp.min(want)) < clamp_min  # the clamp matters in this test
    want = jnp.maximum(want, clamp_min)
  assert log_gate.shape == (2, 23, H, 4) and log_gate.dtype == jnp.float32
  assert bool(jnp.all(log_gate <= 0))
  np.testing.assert_allclose(log_gate, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("output_norm, use_output_gate",
                         [("rmsnorm", True), ("layernorm", True), ("none", True), ("rmsnorm", False)])
def test_layer_matches_written_out_reference(output_norm, use_output_gate):
  module, _ = _layer(output_norm=output_norm, use_output_gate=use_output_gate)
  x = _x()
  params = _params(module, x)
  assert ("output_gate" in params) == use_output_gate
  assert ("output_norm" in params) == (output_norm == "rmsnorm")
  if output_norm == "rmsnorm":  # a non-trivial learnable weight
    params["output_norm"]["scale"] = params["output_norm"]["scale"] * jnp.linspace(0.5, 1.5, 8)
  y = module.apply({"params": params}, x)
  want = _reference_layer(params, x, output_norm, use_output_gate)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_output_norm_makes_layer_invariant_to_value_scale():
  """Per-head RMSNorm / LayerNorm cancel a rescaling of W_v; without a norm the output scales with it."""
  x = _x()
  for output_norm in ("rmsnorm", "layernorm", "none"):
    module, _ = _layer(output_norm=output_norm, norm_eps=1e-12)  # eps would matter at t = 0
    params = _params(module, x)
    y = module.apply({"params": params}, x)
    scaled = jax.tree.map(lambda a: a, params)
    scaled["value"] = {"kernel": params["value"]["kernel"] * 3.0}
    y3 = module.apply({"params": scaled}, x)
    want = y * 3.0 if output_norm == "none" else y
    np.testing.assert_allclose(y3, want, rtol=1e-4, atol=1e-5, err_msg=output_norm)
  params = _params(_layer()[0], x)  # has output_norm/scale (ignored by the layernorm layer: no affine)
  outputs = [_layer(output_norm=n)[0].apply({"params": params}, x) for n in ("rmsnorm", "layernorm")]
  assert float(jnp.max(jnp.abs(outputs[0] - outputs[1]))) > 1e-3


def test_output_gate_bias_switch():
  module, _ = _layer(output_gate_bias=True)
  x = _x()
  params = _params(module, x)
  assert params["output_gate_bias"].shape == (H, 8)
  y0 = module.apply({"params": params}, x)
  params["output_gate_bias"] = params["output_gate_bias"] + 1.0
  assert float(jnp.max(jnp.abs(module.apply({"params": params}, x) - y0))) > 1e-3


def test_reference_and_xla_impls_agree_with_segments():
  """Same layer output and input gradient through impl="reference" and impl="xla" (chunk 8, T = 37)."""
  x = _x(t=37)
  segment_ids = jnp.asarray(np.stack([np.repeat([1, 2, 3], [5, 20, 12]), np.repeat([1, 2], [30, 7])]),
                            jnp.int32)
  ref_module, _ = _layer(impl="reference")
  xla_module, _ = _layer(impl="xla")
  params = _params(ref_module, x)
  weights = jnp.asarray(np.random.default_rng(9).normal(size=(2, 37, D)), jnp.float32)
  for seg in (None, segment_ids):
    def loss(x, module, seg=seg):
      return jnp.sum(module.apply({"params": params}, x, seg) * weights)
    (ref, ref_grad), (got, got_grad) = (
        jax.value_and_grad(loss)(x, m) for m in (ref_module, xla_module))
    np.testing.assert_allclose(got, ref, atol=1e-4)  # a sum of ~1e3 terms of order 1
    err = float(jnp.sqrt(jnp.mean((got_grad - ref_grad) ** 2) / jnp.mean(ref_grad ** 2)))
    assert err < 1e-4, err  # spec §1.4 metric; the f32 chunked op lands ~1e-5
    y_ref = ref_module.apply({"params": params}, x, seg)
    y_xla = xla_module.apply({"params": params}, x, seg)
    np.testing.assert_allclose(y_xla, y_ref, rtol=0, atol=1e-5)  # outputs of order 0.1


def test_segment_reset_accuracy_with_long_segments():
  """A segment starting mid-chunk (chunk 64) equals the segment run alone, to f32-level accuracy."""
  module, _ = _layer(chunk_size=64)
  t, split = 128, 40
  x = _x(t=t, batch=1)
  params = _params(module, x)
  segment_ids = jnp.asarray((np.arange(t) >= split) + 1, jnp.int32)[None]
  packed = module.apply({"params": params}, x, segment_ids)
  alone = module.apply({"params": params}, x[:, split:])
  scale = float(jnp.max(jnp.abs(alone)))
  assert float(jnp.max(jnp.abs(packed[:, split:] - alone))) <= 1e-5 * scale


def test_segmented_cumsum_is_exact_per_segment():
  x = jnp.arange(1.0, 8.0)[None, :, None]
  ends = gla_model.segment_ends(jnp.asarray([[1, 1, 2, 2, 2, 3, 3]]))
  np.testing.assert_array_equal(gla_model._segmented_reverse_cumsum(x, ends)[0, :, 0],
                                [3.0, 2.0, 12.0, 9.0, 5.0, 13.0, 7.0])


def test_mixer_is_registered():
  assert models.get_mixer("gla") is gla_model.GatedLinearAttention
