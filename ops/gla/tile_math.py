"""Per-chunk maths shared by the Pallas GLA kernels (TPU and GPU), and their shared wrapper steps.

The kernel bodies of `ops.gla.pallas_tpu` and `ops.gla.pallas_gpu` differ only in how they walk the
chunks (a sequential grid axis with the state in VMEM scratch on TPU, a `fori_loop` inside one program
on GPU); the maths of one chunk lives here, so the two backends cannot drift apart. Same equations as
`ops.gla.xla` (spec §1.1 "Chunkwise form" and "Secondary-level chunking"); per chunk, with G the
within-chunk f32 cumsum of log_gate (computed by the wrapper), Q~ = scale * q and S the [K, V] state
entering the chunk:

  o      = (Q~ * exp(G)) S + (P * M) V
  S'     = Diag(exp(G_last)) S + (K * exp(G_last - G))^T V

P is built per pair of sub-chunks of c rows: query sub-chunk i against an earlier key sub-chunk by a
matmul of factors re-anchored at G of the first row of i (every exponent <= 0), and the diagonal
sub-blocks elementwise in f32 (`diag_block`, one key row at a time, as fla's `intra_sub_intra`).
Masked exponents get -inf *before* exp (spec §1.6), so nothing overflows and no inf * 0 appears.

The state is carried transposed, St = S^T [V, K] (fla's `state_v_first` layout): the per-key-channel
decay is then a [1, K] row broadcast and every product is a plain 2-D dot_general, no transposes.

Backward of one chunk (reverse chunk order; dSt' = gradient of the state leaving the chunk):
  dQ~    = exp(G) * (dO St) + intra                dSt = exp(G_last) * dSt' + dO^T (Q~ * exp(G))
  dK     = exp(G_last - G) * (V dSt') + intra      dV  = (K * exp(G_last - G)) dSt'^T + (P * M)^T dO
  intra: dA = dO V^T; the rows of query sub-chunk i are anchored at its first row (as the forward),
  the columns of key sub-chunk j at G of its *last* row (fla's backward), so all exponents are <= 0.
Gate gradient, closed form (spec §1.1): dlogb_t = Q~_t * dQ~_t - K_t * dK_t per position, and
dlog_gate_t = sum_{i >= t} dlogb_i + rowsum(dS_T * S_T) (the final-state term of fla PR #459). Summed
naively, the O(1) terms of the last positions cancel against the final-state term, which leaves an
absolute error ~1e-7 * |k v dS| that swamps the true gradient of strongly decaying gates. The kernels use
an equivalent cancellation-free form per chunk instead: with dK split into its state part
dK^s = exp(G_last - G) * (V dSt') and the rest, and r = exp(G_last) * rowsum(S * dS') (the state
entering the chunk against the gradient of the state leaving it),
  dlog_gate_t = sum_{i >= t in chunk} (Q~ dQ~ - K dK^intra)_i + sum_{s < t in chunk} (K dK^s)_s + r,
because sum_{i after the chunk} dlogb_i (+ the final-state term) = rowsum(S_end * dS_end) and
S_end = exp(G_last) S + sum_s (K_s exp(G_last - G_s))^T V_s. The kernels write the two per-position
terms and r; `gate_gradient` does the within-chunk cumsums in XLA. The diagonal s == t terms of dQ~
and dK cancel exactly in dlogb, so they are left out of it too (and only added to dq and dk).

Matmul operands take the inputs' dtype (f32 accumulation), as `ops.gla.xla`; f32 operands use
Precision.HIGHEST (Triton would otherwise use tf32). Cumsums, P, dA on the diagonal and states are f32.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32


def _dot(x, y, contract):
  precision = jax.lax.Precision.HIGHEST if x.dtype == F32 and y.dtype == F32 else None
  return jax.lax.dot_general(x, y, (contract, ((), ())), precision=precision,
                             preferred_element_type=F32)


def dot_nn(x, y):
  """x y in f32: [a, n] x [n, b] -> [a, b]."""
  return _dot(x, y, ((1,), (0,)))


def dot_nt(x, y):
  """x y^T in f32: [a, n] x [b, n] -> [a, b]."""
  return _dot(x, y, ((1,), (1,)))


def dot_tn(x, y):
  """x^T y in f32: [n, a] x [n, b] -> [a, b]."""
  return _dot(x, y, ((0,), (0,)))


def masked_exp(exponent, mask):
  """exp(exponent) where mask, exactly 0 elsewhere; masked before exp (spec §1.6)."""
  return jnp.exp(jnp.where(mask, exponent, -jnp.inf))


def _iota(shape, axis):
  return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _rows(ref, base, start: int, size: int):
  """Rows [base + start, base + start + size) of a 2-D ref (base may be traced)."""
  return ref[pl.ds(base + start, size), :]


def diag_block(q, k, g, d_scores=None):
  """A diagonal sub-block, elementwise in f32: P_ts = sum_k q_tk k_sk exp(g_tk - g_sk), s <= t.

  One key row s per loop step (selected with an iota mask, so no dynamic slicing of values), as
  fla's `chunk_gla_fwd_A_kernel_intra_sub_intra`; only exponents g_t - g_s with t >= s are evaluated.

  Args:
    q: [c, K] f32 scaled queries of one sub-chunk.
    k: [c, K] f32 keys of the same sub-chunk.
    g: [c, K] f32 cumulative log gates.
    d_scores: [c, c] f32 dL/dP (any values above the diagonal are ignored), or None.

  Returns:
    P [c, c] f32 (zero above the diagonal) and, with d_scores, (dq, dk) [c, K] f32 *without* the
    s == t terms (those are d_scores_tt * k_t and d_scores_tt * q_t; see the module docstring).
  """
  c, dk = q.shape
  rows = _iota((c, 1), 0)
  cols = _iota((1, c), 1)

  def body(s, carry):
    p, dq, dkk = carry
    is_s = rows == s
    k_s = jnp.sum(jnp.where(is_s, k, 0.0), axis=0, keepdims=True)  # [1, K]
    g_s = jnp.sum(jnp.where(is_s, g, 0.0), axis=0, keepdims=True)
    decay = masked_exp(g - g_s, rows >= s)  # [c, K], exponent <= 0
    p = p + jnp.where(cols == s, jnp.sum(q * k_s * decay, axis=1, keepdims=True), 0.0)
    if d_scores is not None:
      strict = jnp.where(rows > s, decay, 0.0)  # decay is finite: a select after exp is safe
      ds_col = jnp.sum(jnp.where(cols == s, d_scores, 0.0), axis=1, keepdims=True)  # [c, 1]
      dq = dq + ds_col * k_s * strict
      dkk = dkk + jnp.where(is_s, jnp.sum(ds_col * q * strict, axis=0, keepdims=True), 0.0)
    return p, dq, dkk

  zeros = jnp.zeros((c, dk), F32)
  p, dq, dkk = jax.lax.fori_loop(0, c, body, (jnp.zeros((c, c), F32), zeros, zeros))
  return p if d_scores is None else (p, dq, dkk)


def chunk_forward(q_ref, k_ref, v_ref, g_ref, o_ref, base, state, *, scale: float, chunk: int,
                  sub_chunk: int, mm_dtype):
  """Writes o for the chunk at rows [base, base + chunk) and returns the state after it.

  Args:
    q_ref, k_ref: [>= base + chunk, K] refs; v_ref, o_ref: [.., V]; g_ref: [.., K] f32 within-chunk
      cumulative log gate.
    base: first row of the chunk (int or traced int).
    state: [V, K] f32 St = S^T entering the chunk.
    scale, chunk, sub_chunk: static; sub_chunk divides chunk.
    mm_dtype: matmul operand dtype.

  Returns:
    [V, K] f32 St after the chunk.
  """
  c = sub_chunk
  k_all = _rows(k_ref, base, 0, chunk).astype(F32)
  g_all = _rows(g_ref, base, 0, chunk)
  v_all = _rows(v_ref, base, 0, chunk).astype(mm_dtype)
  g_last = _rows(g_ref, base, chunk - 1, 1)  # [1, K]
  key_row = _iota((chunk, 1), 0)
  state_mm = state.astype(mm_dtype)
  for i in range(chunk // c):
    start = i * c
    q_i = _rows(q_ref, base, start, c).astype(F32) * scale
    g_i = _rows(g_ref, base, start, c)
    o = dot_nt((q_i * jnp.exp(g_i)).astype(mm_dtype), state_mm)  # inter-chunk, [c, V]
    if i:  # earlier sub-chunks of this chunk, re-anchored at G of row `start`
      anchor = _rows(g_ref, base, start, 1)
      k_off = k_all * masked_exp(anchor - g_all, key_row < start)
      scores = dot_nt((q_i * jnp.exp(g_i - anchor)).astype(mm_dtype), k_off.astype(mm_dtype))
      o = o + dot_nn(scores.astype(mm_dtype), v_all)
    p = diag_block(q_i, _rows(k_ref, base, start, c).astype(F32), g_i)
    o = o + dot_nn(p.astype(mm_dtype), _rows(v_ref, base, start, c).astype(mm_dtype))
    o_ref[pl.ds(base + start, c), :] = o.astype(o_ref.dtype)
  k_dec = (k_all * jnp.exp(g_last - g_all)).astype(mm_dtype)
  return jnp.exp(g_last) * state + dot_tn(v_all, k_dec)


def chunk_backward(q_ref, k_ref, v_ref, g_ref, do_ref, dq_ref, dk_ref, dv_ref, dg_ref, dg_state_ref, base,
                   state, d_state, *, scale: float, chunk: int, sub_chunk: int, mm_dtype):
  """Writes dq, dk, dv and the two gate-gradient terms (all f32) for rows [base, base + chunk).

  Args:
    q_ref .. g_ref: as `chunk_forward`; do_ref: [.., V] output cotangent.
    dq_ref, dk_ref: [.., K] f32 outputs; dv_ref: [.., V] f32.
    dg_ref: [.., K] f32 output Q~ dQ~ - K dK^intra (reverse-cumsummed within the chunk later).
    dg_state_ref: [.., K] f32 output K dK^s (exclusively cumsummed within the chunk later).
    base: first row of the chunk.
    state: [V, K] f32 St entering the chunk (saved by the forward).
    d_state: [V, K] f32 gradient of St leaving the chunk.

  Returns:
    ([V, K] f32 gradient of St entering the chunk, [1, K] f32 boundary term r of the gate gradient).
  """
  c = sub_chunk
  q_all = _rows(q_ref, base, 0, chunk).astype(F32) * scale
  k_all = _rows(k_ref, base, 0, chunk).astype(F32)
  g_all = _rows(g_ref, base, 0, chunk)
  v_all = _rows(v_ref, base, 0, chunk).astype(mm_dtype)
  do_all = _rows(do_ref, base, 0, chunk).astype(mm_dtype)
  g_last = _rows(g_ref, base, chunk - 1, 1)
  row = _iota((chunk, 1), 0)
  state_mm, d_state_mm = state.astype(mm_dtype), d_state.astype(mm_dtype)
  num_sub = chunk // c
  for i in range(num_sub):
    start, end = i * c, (i + 1) * c
    q_i = _rows(q_ref, base, start, c).astype(F32) * scale
    k_i = _rows(k_ref, base, start, c).astype(F32)
    g_i = _rows(g_ref, base, start, c)
    v_i = _rows(v_ref, base, start, c).astype(mm_dtype)
    do_i = _rows(do_ref, base, start, c).astype(mm_dtype)

    # Query rows of sub-chunk i: inter-chunk term, then keys of earlier sub-chunks.
    dq = jnp.exp(g_i) * dot_nn(do_i, state_mm)
    if i:
      anchor = _rows(g_ref, base, start, 1)
      k_off = (k_all * masked_exp(anchor - g_all, row < start)).astype(mm_dtype)
      d_scores = dot_nt(do_i, v_all)  # [c, C]; k_off is zero outside earlier sub-chunks
      dq = dq + jnp.exp(g_i - anchor) * dot_nn(d_scores.astype(mm_dtype), k_off)

    # Key rows of sub-chunk i: state term, then queries of later sub-chunks (anchored at the last row).
    to_end = jnp.exp(g_last - g_i)
    dk_state = to_end * dot_nn(v_i, d_state_mm)
    dv = dot_nt((k_i * to_end).astype(mm_dtype), d_state_mm)
    dk = jnp.zeros_like(dk_state)
    if i < num_sub - 1:
      anchor = _rows(g_ref, base, end - 1, 1)
      q_later = (q_all * masked_exp(g_all - anchor, row >= end)).astype(mm_dtype)
      from_anchor = jnp.exp(anchor - g_i)
      d_scores = dot_nt(do_all, v_i)  # [C, c]; q_later is zero outside later sub-chunks
      dk = dk + from_anchor * dot_tn(d_scores.astype(mm_dtype), q_later)
      scores = dot_nt(q_later, (k_i * from_anchor).astype(mm_dtype))  # [C, c]
      dv = dv + dot_tn(scores.astype(mm_dtype), do_all)

    # Diagonal sub-block.
    p, dq_diag, dk_diag = diag_block(q_i, k_i, g_i, dot_nt(do_i, v_i))
    dq, dk = dq + dq_diag, dk + dk_diag
    dv = dv + dot_tn(p.astype(mm_dtype), do_i)
    rows = pl.ds(base + start, c)
    dg_ref[rows, :] = q_i * dq - k_i * dk  # s == t terms left out: they cancel (docstring)
    dg_state_ref[rows, :] = k_i * dk_state
    d_score_tt = jnp.sum(do_i.astype(F32) * v_i.astype(F32), axis=1, keepdims=True)  # [c, 1]
    dq_ref[rows, :] = scale * (dq + d_score_tt * k_i)
    dk_ref[rows, :] = dk + dk_state + d_score_tt * q_i
    dv_ref[rows, :] = dv
  q_dec = (q_all * jnp.exp(g_all)).astype(mm_dtype)
  boundary = jnp.exp(g_last) * jnp.sum(state * d_state, axis=0, keepdims=True)
  return jnp.exp(g_last) * d_state + dot_tn(do_all, q_dec), boundary


# ----------------------------------------------------------------------------------------------------
# Wrapper steps shared by both kernels (plain XLA, outside the kernels).


def to_kernel_layout(x: jax.Array, length: int, dim: int | None = None) -> jax.Array:
  """[B, T, H, D] -> [B, H, length, dim], zero-padded in time (and features)."""
  dim = x.shape[-1] if dim is None else dim
  x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dim - x.shape[-1])))
  return jnp.swapaxes(x, 1, 2)


def chunk_cumsum(log_gate: jax.Array, chunk: int, seq_len: int) -> jax.Array:
  """Within-chunk f32 cumsum G of a [B, H, Tp, K] log gate (zero-padded beyond seq_len).

  Padded rows of the last chunk are set to G of the last real row, so G_last (the decay of the whole
  chunk) is exactly that of the real rows; padded rows have q = k = v = 0 and contribute nothing.
  """
  b, h, tp, dk = log_gate.shape
  g = jnp.cumsum(log_gate.astype(F32).reshape(b, h, tp // chunk, chunk, dk), axis=3)
  g = g.reshape(b, h, tp, dk)
  if seq_len < tp:
    padded = (jnp.arange(tp) >= seq_len)[:, None]
    g = jnp.where(padded, g[:, :, seq_len - 1:seq_len, :], g)
  return g


def gate_gradient(d_reverse: jax.Array, d_forward: jax.Array, boundary: jax.Array, chunk: int,
                  seq_len: int) -> jax.Array:
  """dlog_gate [B, H, seq_len, K] f32 from the kernels' gate terms (module docstring).

  Args:
    d_reverse: [B, H, Tp, K] f32 Q~ dQ~ - K dK^intra per position (summed over i >= t in the chunk).
    d_forward: [B, H, Tp, K] f32 K dK^s per position (summed over s < t in the chunk, exclusively:
      a shift then a cumsum, never a cumsum minus the term, which would reintroduce the cancellation).
    boundary: [B, H, n, K] f32 r per chunk.
    chunk: C; Tp = n * C.
    seq_len: T.
  """
  b, h, tp, dk = d_reverse.shape
  n = tp // chunk
  rev = jax.lax.cumsum(d_reverse.reshape(b, h, n, chunk, dk), axis=3, reverse=True)
  fwd = d_forward.reshape(b, h, n, chunk, dk)
  fwd = jnp.cumsum(jnp.pad(fwd, ((0, 0), (0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :, :-1], axis=3)
  return (rev + fwd + boundary[:, :, :, None, :]).reshape(b, h, tp, dk)[:, :, :seq_len]


def custom_vjp_op(forward, backward):
  """The differentiable kernel op `gla(q, k, v, log_gate, h0, scale, chunk, sub_chunk, interpret)` ->
  (o, final_state) of one backend, from its wrapper functions:

    forward(q, k, v, log_gate, h0, scale, chunk, sub_chunk, interpret, with_states)
        -> (o, final_state, the f32 states entering each chunk when with_states, else None);
    backward(scale, chunk, sub_chunk, interpret, (q, k, v, log_gate, states), (do, d_final))
        -> the cotangents of q, k, v, log_gate, h0.

  The primal call skips the per-chunk states; the differentiated one keeps them as residuals.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
  def gla(q, k, v, log_gate, h0, scale, chunk, sub_chunk, interpret):
    o, final_state, _ = forward(q, k, v, log_gate, h0, scale, chunk, sub_chunk, interpret, False)
    return o, final_state

  def gla_fwd(q, k, v, log_gate, h0, scale, chunk, sub_chunk, interpret):
    o, final_state, states = forward(q, k, v, log_gate, h0, scale, chunk, sub_chunk, interpret, True)
    return (o, final_state), (q, k, v, log_gate, states)

  gla.defvjp(gla_fwd, backward)
  return gla
