"""Shared test helpers for ops/: the DESIGN.md §8 closeness metric and small random inputs.

Metric (specs/attention_variants.md §1.4, fla's `assert_close`):
  err = rms(ref - x) / (rms(ref) + 1e-8);  pass iff max|ref - x| <= 1e-6 or err < ratio;  NaN fails.
Always compare against an f32 reference; use the ratio constants below.
"""

import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

F32_RATIO = 5e-3  # f32 forward, final state and every gradient
BF16_FWD_RATIO = 1e-2  # bf16 forward vs f32 reference
BF16_GRAD_RATIO = 4e-2  # bf16 gradients vs f32 reference
ABS_PASS = 1e-6  # max |ref - x| at or below this passes whatever the ratio
_RMS_EPS = 1e-8


def _as_f64(x: Any) -> np.ndarray:
  return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def rms(x: Any) -> float:
  """Root mean square of all elements (0 for an empty array)."""
  x = _as_f64(x)
  return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def error_ratio(ref: Any, x: Any) -> float:
  """rms(ref - x) / (rms(ref) + 1e-8)."""
  ref, x = _as_f64(ref), _as_f64(x)
  return rms(ref - x) / (rms(ref) + _RMS_EPS)


def assert_close(name: str, ref: Any, x: Any, ratio: float) -> None:
  """Asserts `x` matches `ref` under the DESIGN.md §8 metric.

  Args:
    name: label used in the failure message.
    ref: reference array (any float dtype; compared in float64).
    x: candidate array, same shape.
    ratio: pass threshold for the relative RMS error (e.g. F32_RATIO).

  Raises:
    AssertionError: on a shape mismatch, NaN in either array, or when both criteria fail.
  """
  ref, x = _as_f64(ref), _as_f64(x)
  if ref.shape != x.shape:
    raise AssertionError(f"{name}: shape mismatch, ref {ref.shape} vs x {x.shape}")
  if np.isnan(ref).any():
    raise AssertionError(f"{name}: NaN in the reference")
  if np.isnan(x).any():
    raise AssertionError(f"{name}: NaN in the candidate ({int(np.isnan(x).sum())} elements)")
  if ref.size == 0:
    return
  max_abs = float(np.max(np.abs(ref - x)))
  err = error_ratio(ref, x)
  if max_abs <= ABS_PASS or err < ratio:
    return
  raise AssertionError(f"{name}: err ratio {err:.3e} >= {ratio:.1e} (max abs diff {max_abs:.3e}, "
                       f"rms(ref) {rms(ref):.3e})")


def rng(name: str, seed: int = 0) -> np.random.Generator:
  """A numpy Generator seeded from a string (e.g. the test name): fresh per test, reproducible.

  Inputs are drawn with numpy rather than jax.random so building them compiles nothing (XLA compiles
  dominate the runtime of small-shape tests on CPU).
  """
  return np.random.default_rng([zlib.crc32(name.encode()), seed])


def randn(gen: np.random.Generator, shape: Sequence[int], dtype: Any = jnp.float32,
          scale: float = 1.0) -> jax.Array:
  """N(0, scale^2) samples drawn in f32 and cast, so f32 and bf16 runs can share one draw."""
  x = (scale * gen.standard_normal(tuple(shape))).astype(np.float32)
  return jnp.asarray(x.astype(jnp.dtype(dtype)))


def random_qkv(gen: np.random.Generator, batch: int, q_len: int, kv_len: int, num_heads: int,
               num_kv_heads: int, head_dim: int, dtype: Any = jnp.float32,
               scale: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q [B, T, H, D], k and v [B, S, Hkv, D] with N(0, scale^2) entries."""
  return (randn(gen, (batch, q_len, num_heads, head_dim), dtype, scale),
          randn(gen, (batch, kv_len, num_kv_heads, head_dim), dtype, scale),
          randn(gen, (batch, kv_len, num_kv_heads, head_dim), dtype, scale))


def random_segment_ids(gen: np.random.Generator, batch: int, length: int,
                       num_segments: int) -> np.ndarray:
  """[B, L] int32 packed-document ids 1..num_segments: non-decreasing, every id present (L >= n)."""
  ids = np.empty((batch, length), np.int32)
  for row in ids:
    cuts = np.sort(gen.choice(np.arange(1, length), num_segments - 1, replace=False))
    row[:] = 1 + np.searchsorted(cuts, np.arange(length), side="right")
  return ids


def vjp_outputs(fn: Callable[..., jax.Array], args: Sequence[Any],
                cotangent: jax.Array) -> tuple[jax.Array, tuple[Any, ...]]:
  """Returns fn(*args) and the VJP of `cotangent` (cast to the output dtype) w.r.t. every arg.

  Using one f32 cotangent for the reference and the candidate makes their gradients comparable.
  """
  out, pullback = jax.vjp(fn, *args)
  return out, pullback(cotangent.astype(out.dtype))


def largest_intermediate(jaxpr: Any) -> int:
  """Largest element count of any value produced in a jaxpr, sub-jaxprs (scan, cond, jit) included.

  Memory tests use it to show a blockwise op never materialises a T x S array.
  """
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          largest = max(largest, largest_intermediate(getattr(inner, "jaxpr", inner)))
  return largest
