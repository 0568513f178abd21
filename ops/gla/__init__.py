"""Gated linear attention (GLA, specs/attention_variants.md §1): parallel forward and decode step.

Public entries: `gla` (a whole sequence) and `gla_step` (one token, for decoding). Implementations of
`gla` (`impl`):
  "reference": `ops.gla.reference`, the f32 recurrent `lax.scan` over time, the test oracle.
  "xla":       `ops.gla.xla`, the chunkwise-parallel log-space form with secondary chunking; reverse-mode
               autodiff (custom VJP on the diagonal sub-blocks).
  "pallas":    the Pallas kernel of the current backend: `ops.gla.pallas_tpu` (Mosaic TPU) on TPU,
               `ops.gla.pallas_gpu` (Triton lowering) on GPU; on CPU it needs interpret=True and runs the
               TPU kernel in interpret mode. "pallas_tpu" / "pallas_gpu" force one kernel (e.g. to
               interpret the GPU kernel on CPU).
`impl=None` picks "pallas" on TPU and GPU and "xla" on CPU.
"""

import functools

import jax
import jax.numpy as jnp

from ops import dispatch
from ops import validation
from ops.gla import pallas_gpu
from ops.gla import pallas_tpu
from ops.gla import reference
from ops.gla import xla
from ops.gla.block_sizes import BlockSizes
from ops.gla.step import gla_step

__all__ = ["gla", "gla_step", "BlockSizes", "IMPLEMENTATIONS"]


def _pallas(*args, interpret: bool, **kwargs) -> tuple[jax.Array, jax.Array]:
  """impl="pallas": the kernel of the current backend (the TPU kernel, interpreted, on CPU)."""
  backend = dispatch.pallas_backend("ops.gla", interpret)
  kernel = {"tpu": pallas_tpu.gla, "gpu": pallas_gpu.gla}[backend]
  return kernel(*args, interpret=interpret, **kwargs)


# impl name -> implementation. Each takes (q, k, v, log_gate, initial_state [f32], *, scale), plus the
# options of `dispatch.impl_options`: block_sizes ("xla", Pallas) and interpret (Pallas).
IMPLEMENTATIONS = {
    "reference": reference.gla,
    "xla": xla.gla,
    "pallas": _pallas,
    "pallas_tpu": pallas_tpu.gla,
    "pallas_gpu": pallas_gpu.gla,
}


@functools.partial(jax.jit, static_argnames=("impl", "scale", "block_sizes", "interpret"))
def _call(q, k, v, log_gate, initial_state, *, impl, scale, block_sizes, interpret):
  """The op's one jit: fills the default state and runs IMPLEMENTATIONS[impl]."""
  if initial_state is None:
    b, _, h, dk = q.shape
    initial_state = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)
  return IMPLEMENTATIONS[impl](q, k, v, log_gate, initial_state.astype(jnp.float32), scale=scale,
                               **dispatch.impl_options(impl, block_sizes, interpret))


def gla(q: jax.Array, k: jax.Array, v: jax.Array, log_gate: jax.Array, *,
        initial_state: jax.Array | None = None, scale: float | None = None, chunk_size: int = 64,
        impl: str | None = None, interpret: bool = False,
        sub_chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Gated linear attention over a sequence (spec §1.1), per batch b and head h.

  With S_0 = initial_state and alpha_t = exp(log_gate_t) (per key channel):
    S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t,    o_t = (scale * q_t) S_t,    final_state = S_T.

  Notes:
    * log_gate must be finite and <= 0 (alpha in (0, 1]). This is not checked (it is traced). A
      positive log_gate is not a GLA, and the chunked form may overflow on it; a -inf gate (hard reset)
      gives NaN in the chunked form (spec §1.6: use segment resets instead, once they exist).
    * The output is causal: o_t depends only on positions <= t (and on initial_state).
    * Differentiable w.r.t. q, k, v, log_gate and initial_state: reverse mode for every impl ("xla"
      has a custom VJP for its diagonal sub-blocks and the Pallas kernels one for the whole op, so
      `jax.jvp` / `jacfwd` need impl="reference").
    * log_gate values summing to ~-1e4 or below within one chunk cost the "xla" impl relative accuracy
      (~|sum| * 6e-8; see `ops.gla.xla`).

  Args:
    q: [B, T, H, K] queries.
    k: [B, T, H, K] keys.
    v: [B, T, H, V] values.
    log_gate: [B, T, H, K] float log(alpha) <= 0 (e.g. logsigmoid(x) / 16); may be f32 with
      low-precision q/k/v.
    initial_state: [B, H, K, V] S_0 (float; computed in float32), default zeros.
    scale: applied to q (Python float), default K ** -0.5.
    chunk_size: chunk length C of the "xla" and Pallas impls (a positive int; ignored by "reference").
      Sequences shorter than C use one shorter chunk; results do not depend on C beyond f32 rounding.
      The GPU kernel rounds C and c up to powers of two (>= 16); the compiled TPU kernel needs
      multiples of 8.
    impl: None or "" (best for jax.default_backend(): "pallas" on TPU/GPU, "xla" on CPU), "reference",
      "xla", "pallas", "pallas_tpu" or "pallas_gpu".
    interpret: run Pallas kernels in interpret mode (ignored by "reference" and "xla").
    sub_chunk: secondary chunk length c (must divide chunk_size). Default for "xla": the largest
      divisor of chunk_size <= sqrt(chunk_size) (8 for 64); for the Pallas kernels 16 when it divides
      chunk_size (fla's BC), else the same divisor.

  Returns:
    o: [B, T, H, V] in q.dtype.
    final_state: [B, H, K, V] float32 S_T (initial_state, upcast, when T == 0).

  Raises:
    ValueError: on inconsistent shapes/dtypes, bad chunk sizes or an unknown impl; also for
      impl="pallas" on CPU without interpret=True.
  """
  name = dispatch.resolve_impl("gla", impl, IMPLEMENTATIONS, dispatch.PALLAS_ON_ACCELERATORS)
  q, k, v, log_gate = (jnp.asarray(x) for x in (q, k, v, log_gate))
  validation.check_rank4((("q", q), ("k", k), ("v", v), ("log_gate", log_gate)), float_word="float")
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  if k.shape != q.shape:
    raise ValueError(f"k must have the shape of q [B, T, H, K] = {q.shape}, got {k.shape}.")
  if log_gate.shape != q.shape:
    raise ValueError(f"log_gate must have the shape of q [B, T, H, K] = {q.shape}, "
                     f"got {log_gate.shape}.")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must have the batch, length and heads of q ({b}, {t}, {h}, V), "
                     f"got {v.shape}.")
  if initial_state is not None:
    initial_state = jnp.asarray(initial_state)
    if (initial_state.shape != (b, h, dk, dv)
        or not jnp.issubdtype(initial_state.dtype, jnp.floating)):
      raise ValueError(f"initial_state must be a float array of shape {(b, h, dk, dv)} "
                       f"([B, H, K, V]), got {initial_state.dtype} {initial_state.shape}.")
  block_sizes = BlockSizes.get_default(t, chunk_size, sub_chunk, kernel=name.startswith("pallas"))
  if t == 0:  # nothing to scan: the state passes through unchanged
    state = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
    return jnp.zeros((b, 0, h, dv), q.dtype), state
  return _call(q, k, v, log_gate, initial_state, impl=name,
               scale=dk ** -0.5 if scale is None else float(scale), block_sizes=block_sizes,
               interpret=bool(interpret))
