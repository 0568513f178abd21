"""Tests for ops.selective: the blockwise XLA form against the f32 reference, both against an independent
float64 numpy closed form of specs/attention_variants.md §4B, and the op's decoding / pruning contracts.

Forward outputs (o, final column sums, memory counts) and the gradients of q, k, v and the initial
column sums are compared with the DESIGN.md §8 metric (ops.testing, F32_RATIO). Forward+backward are
jitted together so each case compiles once per impl.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import testing
from ops.selective import BlockSizes
from ops.selective import selective_attention

LABELS = ("o", "column_sums", "masked", "dq", "dk", "dv", "dinitial_column_sums")


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = 2
  length: int = 23  # awkward: not a multiple of the query block
  heads: int = 4
  kv_heads: int = 4
  head_dim: int = 12
  block_q: int = 8
  segments: int = 0  # 0 = no segment ids
  initial_sums: bool = False  # nonzero carried-in column sums
  prune_threshold: float | None = None
  selection_head: int = 0


CASES = {
    "T23_gqa_head3_D7": Case(kv_heads=2, selection_head=3, head_dim=7),
    "T23_segments_initial_sums_pruned": Case(segments=3, initial_sums=True, prune_threshold=1.5),
}

SLOW_CASES = {
    "T40_block16_D7": Case(batch=1, length=40, heads=2, kv_heads=1, head_dim=7, block_q=16),
    "T23_block8": Case(),
    "T5_one_block": Case(length=5, block_q=128),
    "T300_block64_segments": Case(batch=1, length=300, heads=2, kv_heads=2, head_dim=32, block_q=64,
                                  segments=4),
}


def _inputs(case: Case, gen: np.random.Generator):
  b, t = case.batch, case.length
  # Scale 1.5 puts ReLU(logits) and F at O(1): selection matters but does not mask everything.
  q, k, v = testing.random_qkv(gen, b, t, t, case.heads, case.kv_heads, case.head_dim, scale=1.5)
  segment_ids = (jnp.asarray(testing.random_segment_ids(gen, b, t, case.segments)) if case.segments
                 else None)
  initial = (jnp.asarray(gen.uniform(0.0, 2.0, (b, t)).astype(np.float32)) if case.initial_sums
             else jnp.zeros((b, t), jnp.float32))
  return q, k, v, segment_ids, initial, testing.randn(gen, (b, t, case.heads, case.head_dim))


@functools.partial(jax.jit, static_argnames=("impl", "block_q", "prune_threshold", "selection_head"))
def _fwd_bwd(impl, q, k, v, segment_ids, initial, do, *, block_q, prune_threshold, selection_head):
  """(o, column sums, masked, dq, dk, dv, dinitial) for the loss sum(o * do) + sum(cols) + sum(masked)."""
  def fn(q, k, v, initial):
    return selective_attention(q, k, v, segment_ids=segment_ids, initial_column_sums=initial,
                               prune_threshold=prune_threshold, selection_head=selection_head,
                               memory_tau=1.0, impl=impl, block_sizes=BlockSizes(block_q))
  outputs, pullback = jax.vjp(fn, q, k, v, initial)
  cotangents = (do, jnp.ones_like(outputs[1]), jnp.ones_like(outputs[2]))
  return tuple(outputs) + tuple(pullback(cotangents))


def numpy_selective(q, k, v, *, segment_ids=None, initial=None, prune_threshold=None, selection_head=0,
                    tau=1.0):
  """Independent float64 closed form of spec §4B (one loop over queries, positions = indices, BOS = 0).

  Returns (o [B, T, H, D], column sums [B, S], masked [B, T]).
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = h // hkv
  seg = np.zeros((b, t), int) if segment_ids is None else np.asarray(segment_ids)
  columns = np.zeros((b, s)) if initial is None else np.asarray(initial, np.float64).copy()
  o = np.zeros((b, t, h, d))
  masked = np.zeros((b, t))
  for bi in range(b):
    for i in range(t):
      visible = (np.arange(s) <= i) & (seg[bi] == seg[bi, i])
      f = columns[bi].copy()  # F_ij: the column sums of all earlier rows
      keep = visible & (f <= prune_threshold) if prune_threshold is not None else visible
      for hi in range(h if keep.any() else 0):  # every key pruned: o_i = 0
        logits = k[bi, :, hi // group] @ q[bi, i, hi] / np.sqrt(d) - f
        w = np.where(keep, np.exp(logits - logits[keep].max()), 0.0)
        o[bi, i, hi] = (w / w.sum()) @ v[bi, :, hi // group]
      masked[bi, i] = np.sum(np.minimum(f, tau)[visible]) / tau
      selection = np.maximum(k[bi, :, selection_head // group] @ q[bi, i, selection_head] / np.sqrt(d), 0)
      selection[~visible] = 0.0
      selection[0] = 0.0  # BOS
      selection[i] = 0.0  # diagonal
      columns[bi] += selection
  return o, columns, masked


def _check_against_reference(name, case):
  q, k, v, segment_ids, initial, do = _inputs(case, testing.rng(name))
  run = functools.partial(_fwd_bwd, q=q, k=k, v=v, segment_ids=segment_ids, initial=initial, do=do,
                          block_q=case.block_q, prune_threshold=case.prune_threshold,
                          selection_head=case.selection_head)
  ref, out = run("reference"), run("xla")
  for label, r, x in zip(LABELS, ref, out):
    assert x.shape == r.shape and x.dtype == r.dtype, label
    testing.assert_close(f"{name}/{label}", r, x, testing.F32_RATIO)
  # The selection really changes the attention: F is O(1) and some keys are masked.
  assert float(jnp.max(ref[1])) > 0.5 and float(jnp.max(ref[2])) > 0.5


@pytest.mark.parametrize("name", list(CASES))
def test_xla_matches_reference_f32(name):
  _check_against_reference(name, CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_xla_matches_reference_f32_more_shapes(name):
  _check_against_reference(name, SLOW_CASES[name])


@pytest.mark.parametrize("name", ["T23_gqa_head3_D7", "T23_segments_initial_sums_pruned"])
def test_matches_float64_closed_form(name):
  case = CASES[name]
  q, k, v, segment_ids, initial, _ = _inputs(case, testing.rng(name))
  want = numpy_selective(q, k, v, segment_ids=segment_ids, initial=initial,
                         prune_threshold=case.prune_threshold, selection_head=case.selection_head)
  for impl in ("reference", "xla"):
    got = selective_attention(q, k, v, segment_ids=segment_ids, initial_column_sums=initial,
                              prune_threshold=case.prune_threshold, selection_head=case.selection_head,
                              memory_tau=1.0, impl=impl, block_sizes=BlockSizes(case.block_q))
    for label, w, g in zip(LABELS, want, got):
      testing.assert_close(f"{name}/{impl}/{label}", w, g, testing.F32_RATIO)


@pytest.mark.parametrize("impl", ["xla", pytest.param("reference", marks=pytest.mark.slow)])
def test_chunks_with_carried_column_sums_equal_one_pass(impl):
  """Decoding contract: F_{t+1, j} = F_{t, j} + S_{t, j}; chunks through a padded key cache == one pass."""
  b, t, cache_len = 2, 19, 24
  q, k, v, _, _, _ = _inputs(Case(batch=b, length=t), testing.rng(f"chunks{impl}"))
  run = functools.partial(selective_attention, impl=impl, block_sizes=BlockSizes(8))
  o_full, columns_full = run(q, k, v)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, cache_len - t), (0, 0), (0, 0)))
  k_cache, v_cache = pad(k), pad(v)
  slots = jnp.arange(cache_len, dtype=jnp.int32)
  columns, pieces, start = jnp.zeros((b, cache_len), jnp.float32), [], 0
  for length in (7, 1, 5, 1, 5):
    end = start + length
    kv_positions = jnp.where(slots < end, slots, jnp.iinfo(jnp.int32).max)  # unfilled slots hidden
    o, columns = run(q[:, start:end], k_cache, v_cache, q_positions=jnp.arange(start, end),
                     kv_positions=kv_positions, initial_column_sums=columns)
    pieces.append(o)
    start = end
  testing.assert_close("o", o_full, jnp.concatenate(pieces, axis=1), testing.F32_RATIO)
  testing.assert_close("columns", columns_full, columns[:, :t], testing.F32_RATIO)
  np.testing.assert_array_equal(np.asarray(columns[:, t:]), 0.0)  # unfilled slots never selected


def test_selection_row_has_zero_bos_and_diagonal():
  """One query: S_row = ReLU(logits) except 0 at BOS (position 0), at its own key and at later keys."""
  gen = testing.rng("bos_diag")
  b, s, d, pos = 1, 9, 8, 6
  q, k, v = testing.random_qkv(gen, b, 1, s, 2, 2, d)
  k = k.at[:, 0, 0].set(q[:, 0, 0]).at[:, pos, 0].set(q[:, 0, 0])  # positive logits at BOS and diagonal
  logits = np.einsum("bd,bsd->bs", np.asarray(q[:, 0, 0], np.float64), np.asarray(k[:, :, 0])) / d ** 0.5
  assert logits[0, 0] > 0 and logits[0, pos] > 0
  want = np.maximum(logits, 0)
  want[:, 0] = want[:, pos:] = 0.0
  assert want.max() > 0
  for impl in ("reference", "xla"):
    _, columns = selective_attention(q, k, v, q_positions=jnp.array([pos]), impl=impl)
    np.testing.assert_allclose(np.asarray(columns), want, rtol=1e-5, atol=1e-6)
    assert float(columns[0, 0]) == 0.0 and float(columns[0, pos]) == 0.0
  # A custom bos_mask moves the never-selected column.
  bos = jnp.zeros((b, s), bool).at[:, 2].set(True)
  _, columns = selective_attention(q, k, v, q_positions=jnp.array([pos]), bos_mask=bos)
  assert float(columns[0, 2]) == 0.0 and float(columns[0, 0]) == pytest.approx(logits[0, 0], rel=1e-5)


@pytest.mark.parametrize("impl", ["xla", pytest.param("reference", marks=pytest.mark.slow)])
def test_pruning(impl):
  """A huge threshold is a no-op; pruned keys (F_ij > threshold) get exactly zero weight."""
  case = Case(batch=1, initial_sums=True)
  q, k, v, _, initial, _ = _inputs(case, testing.rng(f"prune{impl}"))
  run = functools.partial(selective_attention, initial_column_sums=initial, impl=impl,
                          block_sizes=BlockSizes(8))
  o_off, columns_off = run(q, k, v)
  o_huge, columns_huge = run(q, k, v, prune_threshold=1e30)
  np.testing.assert_array_equal(np.asarray(o_huge), np.asarray(o_off))
  np.testing.assert_array_equal(np.asarray(columns_huge), np.asarray(columns_off))

  threshold = 1.0
  # F of the last query row: the column sums after all rows but the last.
  _, f_last = run(q[:, :-1], k, v, q_positions=jnp.arange(case.length - 1))
  pruned = np.asarray(f_last[0] > threshold)
  assert 0 < pruned.sum() < case.length - 1, pruned
  o, _ = run(q, k, v, prune_threshold=threshold)
  v_changed = v.at[:, pruned].add(100.0)
  o_changed, _ = run(q, k, v_changed, prune_threshold=threshold)
  np.testing.assert_array_equal(np.asarray(o_changed[:, -1]), np.asarray(o[:, -1]))
  assert float(jnp.max(jnp.abs(o[:, -1] - o_off[:, -1]))) > 1e-3  # pruning did change the output
  # Without pruning the same change is visible.
  o_changed_off, _ = run(q, k, v_changed)
  assert float(jnp.max(jnp.abs(o_changed_off[:, -1] - o_off[:, -1]))) > 1e-3


def test_bf16_inputs_match_f32_reference():
  case = Case()
  q, k, v, _, _, _ = _inputs(case, testing.rng("bf16"))
  bf16 = lambda x: x.astype(jnp.bfloat16)
  f32 = lambda x: bf16(x).astype(jnp.float32)
  o_ref, columns_ref = selective_attention(f32(q), f32(k), f32(v), impl="reference")
  o, columns = selective_attention(bf16(q), bf16(k), bf16(v), impl="xla", block_sizes=BlockSizes(8))
  assert o.dtype == jnp.bfloat16 and columns.dtype == jnp.float32
  testing.assert_close("o", o_ref, o, testing.BF16_FWD_RATIO)
  testing.assert_close("columns", columns_ref, columns, testing.BF16_FWD_RATIO)


def test_empty_inputs_and_errors():
  q, k, v = testing.random_qkv(testing.rng("errors"), 1, 4, 4, 2, 2, 8)
  o, columns = selective_attention(q[:, :0], k, v, initial_column_sums=jnp.ones((1, 4)))
  assert o.shape == (1, 0, 2, 8) and np.all(np.asarray(columns) == 1.0)
  with pytest.raises(ValueError, match="causal attention only"):
    selective_attention(q, k, v, causal=False)
  with pytest.raises(ValueError, match="multiple of the number of kv heads"):
    selective_attention(q, k[:, :, :0], v[:, :, :0])
  with pytest.raises(ValueError, match="selection_head"):
    selective_attention(q, k, v, selection_head=2)
  with pytest.raises(ValueError, match="bos_mask"):
    selective_attention(q, k, v, bos_mask=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="prune_threshold"):
    selective_attention(q, k, v, prune_threshold=-1.0)
  with pytest.raises(ValueError, match="Unknown selective_attention impl"):
    selective_attention(q, k, v, impl="cuda")
  with pytest.raises(NotImplementedError, match="pallas"):
    selective_attention(q, k, v, impl="pallas")
