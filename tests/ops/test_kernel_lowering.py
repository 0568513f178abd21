"""Every Pallas kernel lowers for real hardware, checked on CPU: Mosaic TPU (a TPU v5e target) and the
Triton GPU backend (an H100 target), forward and backward, at realistic shapes with default block sizes.

Interpret mode (the other kernel tests) checks the maths but not that a kernel is expressible for the
backend. Here `jax.export` runs the whole Pallas lowering (Pallas -> Mosaic MLIR / Triton IR) for an
abstract device, which rejects unsupported ops, dtypes and block shapes; what remains unchecked without a
device is the backend compiler itself (Mosaic layout passes, ptxas) and speed.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from ops.attention import attention
from ops.gla import gla
import ops.landmark as landmark_ops
from ops.landmark import landmark_attention

TARGETS = {
    # platform -> (abstract device kind, Pallas impl)
    "tpu": ("TPU v5 lite", "pallas_tpu"),
    "cuda": ("NVIDIA H100 80GB HBM3", "pallas_gpu"),
}
# The Triton kernels are custom calls without export-compatibility guarantees; we only lower, never load.
_TRITON_CALL = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def _target(platform: str):
  kind, _ = TARGETS[platform]
  device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1 if platform == "tpu" else None,
                                       platform="tpu" if platform == "tpu" else "gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                   abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


def _grads(fn, num_diff: int):
  return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=tuple(range(num_diff)))


def _cases(impl: str, head_dim: int):
  b, t, h = 1, 1024, 2
  x = jax.ShapeDtypeStruct((b, t, h, head_dim), jnp.bfloat16)
  gate = jax.ShapeDtypeStruct((b, t, h, head_dim), jnp.float32)
  gqa_kv = jax.ShapeDtypeStruct((b, t, 1, head_dim), jnp.bfloat16)
  ints = jax.ShapeDtypeStruct((b, t), jnp.int32)
  bias = jax.ShapeDtypeStruct((b, t), jnp.float32)
  table = jax.ShapeDtypeStruct((h, 32), jnp.float32)  # T5 relative-bias table [H, num_buckets]
  return {
      "attention_causal": (_grads(lambda q, k, v: attention(q, k, v, impl=impl), 3), (x, x, x)),
      "attention_cog_bias_segments_gqa": (
          _grads(lambda q, k, v, b_, s: attention(q, k, v, key_bias=b_, segment_ids=s, signed=True,
                                                  impl=impl), 4), (x, gqa_kv, gqa_kv, bias, ints)),
      "attention_bidirectional": (_grads(lambda q, k, v: attention(q, k, v, causal=False, impl=impl), 3),
                                  (x, x, x)),
      "attention_t5_relative_bias_softmax1_key_bias_gqa": (
          _grads(lambda q, k, v, b_, t_: attention(q, k, v, key_bias=b_, relative_bias=t_, softmax1=True,
                                                   causal=False, scale=1.0, impl=impl), 5),
          (x, gqa_kv, gqa_kv, bias, table)),
      "gla": (_grads(lambda q, k, v, g: gla(q, k, v, g, impl=impl)[0], 4), (x, x, x, gate)),
      "landmark": (_grads(lambda q, k, v: landmark_attention(q, k, v, block_size=64, impl=impl), 3),
                   (x, x, x)),
  }


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("platform", list(TARGETS))
def test_kernels_lower_for_hardware(platform, head_dim):
  _, impl = TARGETS[platform]
  failures = []
  for name, (fn, args) in _cases(impl, head_dim).items():
    try:
      with _target(platform):
        exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=[_TRITON_CALL])(*args)
    except Exception as e:  # noqa: BLE001 - collect every kernel's failure, report them together
      failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
      continue
    text = exported.mlir_module()
    marker = "tpu_custom_call" if platform == "tpu" else "xla.gpu.triton"
    if marker not in text:
      failures.append(f"{name}: no {marker} kernel in the lowered module")
  assert not failures, "\n".join(failures)


def test_landmark_tpu_tiles_for_blocks_that_do_not_divide_128():
  """Block 48 (lcm with 128 = 384) gets TPU-legal default tiles and lowers; the paper's 51 has no legal
  tile: impl=None on a TPU falls back to "xla", an explicit kernel request is a clear error."""
  b, t, h, d = 1, 1024, 2, 128
  x = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  tiles = landmark_ops.BlockSizes.get_default(t, t, d, 48, backend="tpu")
  assert tiles.block_kv % 384 == 0
  fn = _grads(lambda q, k, v: landmark_attention(q, k, v, block_size=48, impl="pallas_tpu",
                                                 block_sizes=tiles), 3)
  with _target("tpu"):
    export.export(jax.jit(fn), platforms=["tpu"])(x, x, x)

  choose = landmark_ops.tpu_kernel_or_fallback
  assert choose("pallas", None, 51, False, "tpu") == "xla"
  assert choose("pallas", None, 64, False, "tpu") == "pallas"
  assert choose("pallas", None, 51, False, "gpu") == "pallas"  # the GPU kernel spreads blocks itself
  assert choose("pallas_tpu", "pallas_tpu", 51, True, "cpu") == "pallas_tpu"  # interpret: no tiling
  with pytest.raises(ValueError, match="TPU landmark kernel needs key tiles"):
    choose("pallas", "pallas", 51, False, "tpu")
