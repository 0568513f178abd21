"""Chunkwise-parallel GLA in pure JAX, computed in log space (specs/attention_variants.md §1.1).

Same maths as `ops.gla.reference` (S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = (scale q_t) S_t), in
the chunkwise form of spec §1.1 "Chunkwise form" with the secondary chunking of §1.1 "Secondary-level
chunking". The sequence is cut into chunks of C positions; inside a chunk, with
G_t = sum_{chunk start <= s <= t} log alpha_s (f32, non-increasing, <= 0), i.e. G = log Lambda:

  inter:  O_inter = (scale Q * exp(G)) S_[i]                         S_[i]: state before the chunk
  state:  S_[i+1] = Diag(exp(G_last)) S_[i] + (K * exp(G_last - G))^T V     (lax.scan over chunks)
  intra:  O_intra = (P * M) V,   P_ts = sum_k scale q_tk k_sk exp(G_tk - G_sk),   M_ts = [s <= t]

P is built per pair of sub-chunks of c positions (query sub-chunk i, key sub-chunk j):
  j < i  (off-diagonal): P_[i][j] = (scale Q_[i] * exp(G_[i] - a_i)) (K_[j] * exp(a_i - G_[j]))^T, a
         matmul; the anchor a_i is G at the first row of sub-chunk i, so both exponents are <= 0.
  j == i (diagonal): the elementwise f32 sum above, s <= t only.
  j > i: zero.

Every exponent that is evaluated is <= 0, so nothing overflows however strong the decay: masked
exponents get a -inf bias *before* exp (exp(-inf) = 0, with a zero gradient) rather than masking
exp's output, which would give inf * 0 = NaN (spec §1.6). Cumulative gates only span one chunk; the state
is carried in f32 between chunks. Sequences that are not a multiple of C are padded with log_gate = 0 and
q = k = v = 0, which leaves the state unchanged, and the output is sliced back.

Precision: matmuls take the inputs' dtype (scores/states are cast to it, as fla does) with float32
accumulation; their precision follows `jax.default_matmul_precision`. Gate cumsums, the diagonal
sub-blocks, the score matrix before the P @ V product and the carried state are f32. Exponents are
differences of within-chunk f32 cumsums, so a term's relative error is about |G| * 6e-8: negligible for
ordinary gates, ~1e-3 if log_gate sums to ~-1e4 inside a chunk (e.g. a pseudo hard reset by a huge
negative gate; use moderate values or, once they exist, segment resets).

Gradients (w.r.t. q, k, v, log_gate and initial_state) come from autodiff, except for the diagonal
sub-blocks, which have a custom VJP (`_diag_scores`); reverse mode only (`jax.jvp` / `jacfwd` are not
supported through this implementation). They stay finite for any finite log_gate <= 0 for the same
reason the forward does.
"""

import jax
import jax.numpy as jnp

from ops.gla.block_sizes import BlockSizes
from ops.tiling import cdiv


def _pad_time(x: jax.Array, length: int) -> jax.Array:
  """Zero-pads axis 1 of [B, T, H, D] to `length`."""
  pad = length - x.shape[1]
  return x if pad == 0 else jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))


def _to_chunks(x: jax.Array, n: int, chunk: int) -> jax.Array:
  """[B, n * C, H, D] -> [B, H, n, C, D]."""
  b, _, h, d = x.shape
  return x.reshape(b, n, chunk, h, d).transpose(0, 3, 1, 2, 4)


def _masked_exp(exponent: jax.Array, mask: jax.Array) -> jax.Array:
  """exp(exponent) where mask, exactly 0 elsewhere; masked before exp, so never inf * 0 (spec §1.6).

  Adding a constant 0 / -inf bias (exp(-inf) = 0, with a zero gradient) rather than a select on the
  large operand: XLA:CPU vectorises the add but not the broadcast select (3-4x faster here).
  """
  return jnp.exp(exponent + jnp.where(mask, 0.0, -jnp.inf).astype(exponent.dtype))


def _diag_decay(g_cum: jax.Array, strict: bool = False) -> jax.Array:
  """[..., c, K] cumulative log gates -> [..., c (t), c (s), K] exp(G_t - G_s) for s <= t, else 0.

  strict=True also zeroes s == t.
  """
  c = g_cum.shape[-2]
  lower = jnp.tri(c, k=-1 if strict else 0, dtype=bool)[:, :, None]
  return _masked_exp(g_cum[..., :, None, :] - g_cum[..., None, :, :], lower)


@jax.custom_vjp
def _diag_scores(q: jax.Array, k: jax.Array, g_cum: jax.Array) -> jax.Array:
  """Diagonal sub-blocks P_ts = sum_k q_tk k_sk exp(G_tk - G_sk), s <= t, elementwise in f32.

  Args:
    q: [..., c, K] f32 (scaled) queries of one sub-chunk.
    k: [..., c, K] f32 keys of the same sub-chunk.
    g_cum: [..., c, K] f32 cumulative log gates G (any common offset cancels).

  Returns:
    [..., c, c] f32, zero above the diagonal.

  The custom VJP recomputes the [c, c, K] decays instead of storing them and uses the closed-form gate
  gradient of spec §1.1 restricted to the block, dG = q * dq' - k * dk', where dq', dk' leave out the
  s == t terms: those cancel exactly in dG, and subtracting them in floating point would swamp the tiny
  true dG of strongly decaying gates. Autodiff of the forward is ~20x slower on XLA:CPU (strided
  reductions of the broadcast products).
  """
  return jnp.sum(q[..., :, None, :] * k[..., None, :, :] * _diag_decay(g_cum), axis=-1)


def _diag_scores_fwd(q, k, g_cum):
  return _diag_scores(q, k, g_cum), (q, k, g_cum)


def _diag_scores_bwd(residuals, d_scores):
  q, k, g_cum = residuals
  decay = _diag_decay(g_cum, strict=True)
  dq = jnp.sum(d_scores[..., None] * k[..., None, :, :] * decay, axis=-2)  # sum over s < t
  dk = jnp.sum(d_scores[..., None] * q[..., :, None, :] * decay, axis=-3)  # sum over t > s
  # d/dG_t exp(G_t - G_s) = +exp(.), d/dG_s = -exp(.); the s == t terms (exponent 0) cancel.
  d_gate = q * dq - k * dk
  on_diagonal = jnp.diagonal(d_scores, axis1=-2, axis2=-1)[..., None]  # decay exp(0) = 1
  return dq + on_diagonal * k, dk + on_diagonal * q, d_gate


_diag_scores.defvjp(_diag_scores_fwd, _diag_scores_bwd)


def _intra_chunk_scores(q: jax.Array, k: jax.Array, g_cum: jax.Array, sub_chunk: int,
                        mm_dtype) -> jax.Array:
  """Causal intra-chunk scores P * M by secondary chunking (module docstring).

  Args:
    q: [B, H, n, C, K] f32, already scaled.
    k: [B, H, n, C, K] f32.
    g_cum: [B, H, n, C, K] f32 within-chunk cumulative log gate G.
    sub_chunk: c, divides C.
    mm_dtype: operand dtype of the off-diagonal matmul.

  Returns:
    [B, H, n, C, C] f32, row t = query, column s = key, zero above the diagonal.
  """
  *lead, chunk, dk = q.shape
  ns, c = chunk // sub_chunk, sub_chunk
  q_sub, k_sub, g_sub = (x.reshape(*lead, ns, c, dk) for x in (q, k, g_cum))

  diag = _diag_scores(q_sub, k_sub, g_sub)  # [.., ns, c, c]

  # Off-diagonal sub-blocks: one re-anchored copy of the chunk's keys per query sub-chunk i, keeping
  # only keys of earlier sub-chunks (whose G >= anchor_i, so anchor_i - G <= 0).
  anchor = g_sub[..., :, :1, :]  # [.., ns, 1, K]: G at the first row of each query sub-chunk
  q_off = (q_sub * jnp.exp(g_sub - anchor)).astype(mm_dtype)  # G_t <= anchor inside sub-chunk i
  earlier = (jnp.arange(chunk) // c)[None, :] < jnp.arange(ns)[:, None]  # [ns, C]: sub(s) < i
  k_off = k[..., None, :, :] * _masked_exp(anchor - g_cum[..., None, :, :], earlier[:, :, None])
  off = jnp.einsum("...itk,...isk->...its", q_off, k_off.astype(mm_dtype),
                   preferred_element_type=jnp.float32)  # [.., ns, c, C]

  # Place the diagonal blocks: off[.., i, t, j, s] += diag[.., i, t, s] if i == j (off is 0 there).
  off = off.reshape(*lead, ns, c, ns, c)
  eye = jnp.eye(ns, dtype=jnp.float32)[:, None, :, None]
  return (off + diag[..., :, :, None, :] * eye).reshape(*lead, chunk, chunk)


def gla(q: jax.Array, k: jax.Array, v: jax.Array, log_gate: jax.Array, initial_state: jax.Array, *,
        scale: float, block_sizes: BlockSizes) -> tuple[jax.Array, jax.Array]:
  """Chunkwise GLA (equations in the module docstring).

  Args:
    q: [B, T, H, K].
    k: [B, T, H, K].
    v: [B, T, H, V].
    log_gate: [B, T, H, K] float, finite and <= 0 (not checked).
    initial_state: [B, H, K, V] float32 S_0.
    scale: Python float applied to q.
    block_sizes: chunk C and sub-chunk c (c divides C).

  Returns:
    o [B, T, H, V] in q.dtype and the final state S_T [B, H, K, V] float32.
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  chunk = block_sizes.chunk_size
  n = cdiv(t, chunk)
  mm_dtype = jnp.result_type(q, k, v)
  f32 = jnp.float32

  # Padding: log_gate = 0 (alpha = 1) and k = v = 0 leave the state unchanged; q = 0 rows are dropped.
  q, k, v, log_gate = (_to_chunks(_pad_time(x, n * chunk), n, chunk) for x in (q, k, v, log_gate))
  # G = log Lambda, [B, H, n, C, K]. associative_scan: XLA:CPU's cumsum (reduce-window) is 2x slower.
  g_cum = jax.lax.associative_scan(jnp.add, log_gate.astype(f32), axis=3)
  # log gamma: decay over the whole chunk, [B, H, n, K]. The last chunk stops at its last real row, so
  # padding is exactly neutral whatever the rounding of the cumsum over the padded zeros.
  g_last = g_cum[..., -1, :]
  if t % chunk:
    g_last = g_last.at[:, :, -1].set(g_cum[:, :, -1, t % chunk - 1])
  qf = q.astype(f32) * scale
  kf = k.astype(f32)
  v = v.astype(mm_dtype)

  # Intra-chunk part (all chunks at once).
  scores = _intra_chunk_scores(qf, kf, g_cum, block_sizes.sub_chunk, mm_dtype)
  o = jnp.einsum("bhnts,bhnsv->bhntv", scores.astype(mm_dtype), v,
                 preferred_element_type=f32)

  # Each chunk's own contribution to the state at its end, (K * Gamma)^T V (all chunks at once).
  k_dec = (kf * jnp.exp(g_last[..., None, :] - g_cum)).astype(mm_dtype)  # exponent <= 0
  contrib = jnp.einsum("bhnsk,bhnsv->bhnkv", k_dec, v, preferred_element_type=f32)

  # Inter-chunk state passing: the only sequential part, n steps of an elementwise update.
  def step(state, xs):
    decay, contrib = xs
    return decay[..., None] * state + contrib, state  # emits the state *entering* the chunk

  # The barrier hides a compile-time-constant S_0 (zeros inside a jit, the default) from XLA: with a
  # single chunk the scan is unrolled and XLA:CPU's YNN dot fusion (jax 0.12) then returns garbage for
  # the dot against the broadcast constant. It costs nothing (S_0 is tiny) and is differentiable.
  final_state, states = jax.lax.scan(
      step, jax.lax.optimization_barrier(initial_state.astype(f32)),
      (jnp.moveaxis(jnp.exp(g_last), 2, 0), jnp.moveaxis(contrib, 2, 0)))
  states = jnp.moveaxis(states, 0, 2)  # [B, H, n, K, V]
  q_dec = (qf * jnp.exp(g_cum)).astype(mm_dtype)  # Q * Lambda, exponent <= 0
  o = o + jnp.einsum("bhntk,bhnkv->bhntv", q_dec, states.astype(mm_dtype),
                     preferred_element_type=f32)

  o = o.transpose(0, 2, 3, 1, 4).reshape(b, n * chunk, h, dv)[:, :t]
  return o.astype(q.dtype), final_state
