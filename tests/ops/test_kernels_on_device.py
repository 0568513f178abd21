"""Compiled (not interpreted) Pallas kernels on a real accelerator, against the f32 references.

Every test carries a `gpu` and a `tpu` parametrisation; tests/conftest.py skips the ones whose backend is
not the current one, so on CPU (CI) all of them skip. On a GPU or TPU machine:

    python -m pytest -q tests/ops/test_kernels_on_device.py        # or: pytest -m gpu / -m tpu

Shapes are realistic (T = 1000 / 1030, head dims 64 and 128) so tile boundaries, padding and multi-tile
online softmax all happen; bf16 inputs are compared against the reference on the same bf16-rounded values
upcast to f32, with the DESIGN.md section 8 ratios.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import testing
from ops.attention import attention
from ops.gla import gla
from ops.landmark import landmark_attention

DEVICES = [pytest.param("gpu", marks=pytest.mark.gpu), pytest.param("tpu", marks=pytest.mark.tpu)]
DTYPES = [(jnp.float32, testing.F32_RATIO, testing.F32_RATIO),
          (jnp.bfloat16, testing.BF16_FWD_RATIO, testing.BF16_GRAD_RATIO)]


def _compare(name, fn, reference, args, dtype, fwd_ratio, grad_ratio, seed=0):
  """Forward and every gradient of `fn` (inputs in `dtype`) vs `reference` on the same rounded values."""
  cast = [jnp.asarray(a, dtype) for a in args]
  upcast = [a.astype(jnp.float32) for a in cast]
  out = jax.jit(fn)(*cast)
  cotangent = jnp.asarray(np.random.default_rng(seed).standard_normal(out.shape), jnp.float32)
  o, grads = testing.vjp_outputs(fn, tuple(cast), cotangent.astype(out.dtype))
  o_ref, grads_ref = testing.vjp_outputs(reference, tuple(upcast), cotangent)
  testing.assert_close(f"{name}/o", o_ref, o, fwd_ratio)
  for i, (r, g) in enumerate(zip(grads_ref, grads)):
    testing.assert_close(f"{name}/grad{i}", r, g, grad_ratio)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, fwd_ratio, grad_ratio", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("variant", ["causal", "bidirectional", "signed", "key_bias", "segments_gqa"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_kernel(device, dtype, fwd_ratio, grad_ratio, variant, head_dim):
  del device  # selected by the marker; impl=None picks the backend's kernel
  b, t, h = 2, 1030, 4
  hkv = 2 if variant == "segments_gqa" else h
  gen = testing.rng(f"device_attention_{variant}_{head_dim}")
  q, k, v = testing.random_qkv(gen, b, t, t, h, hkv, head_dim)
  bias = testing.randn(gen, (b, t)) if variant == "key_bias" else None
  segments = testing.random_segment_ids(gen, b, t, 4) if variant == "segments_gqa" else None
  kwargs = dict(causal=variant != "bidirectional", signed=variant == "signed", segment_ids=segments)

  def run(impl, q, k, v, *bias_arg):
    return attention(q, k, v, key_bias=bias_arg[0] if bias_arg else None, impl=impl, **kwargs)
  args = (q, k, v) + ((bias,) if bias is not None else ())
  _compare(variant, functools.partial(run, None), functools.partial(run, "reference"), args, dtype,
           fwd_ratio, grad_ratio)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, fwd_ratio, grad_ratio", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gla_kernel(device, dtype, fwd_ratio, grad_ratio, head_dim):
  del device
  b, t, h = 2, 1000, 4
  gen = np.random.default_rng(head_dim)
  q, k, v = (jnp.asarray(gen.random((b, t, h, head_dim), dtype=np.float32)) for _ in range(3))
  log_gate = jnp.asarray(-np.logaddexp(0.0, -gen.random((b, t, h, head_dim), dtype=np.float32)) / 16.0)
  initial = jnp.asarray(gen.standard_normal((b, h, head_dim, head_dim)).astype(np.float32))

  def run(impl, q, k, v, log_gate, initial):
    o, final = gla(q, k, v, log_gate, initial_state=initial.astype(jnp.float32), impl=impl)
    # One output carrying both o and the final state, so every gradient path is compared.
    return jnp.concatenate([o.reshape(b, -1).astype(jnp.float32), final.reshape(b, -1)], axis=1)
  _compare("gla", functools.partial(run, None), functools.partial(run, "reference"),
           (q, k, v, log_gate, initial), dtype, fwd_ratio, grad_ratio)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, fwd_ratio, grad_ratio", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_landmark_kernel(device, dtype, fwd_ratio, grad_ratio, head_dim):
  del device
  b, t, h, block = 2, 1024, 4, 64  # the Triton kernel's block (63 regular + 1 landmark)
  q, k, v = testing.random_qkv(testing.rng(f"device_landmark_{head_dim}"), b, t, t, h, h, head_dim)

  def run(impl, q, k, v):
    return landmark_attention(q, k, v, block_size=block, impl=impl)
  _compare("landmark", functools.partial(run, None), functools.partial(run, "reference"), (q, k, v), dtype,
           fwd_ratio, grad_ratio)
