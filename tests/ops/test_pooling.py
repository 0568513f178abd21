"""Tests for ops.pooling's groups, pooling, upsampling, boundary sources and fixed patches.

Oracles: naive Python loops over one row written from specs/token_free.md §5.1 (group ids, slot layout,
pooling, the upsampling read), the SpaceByte rule of §11.1 byte by byte, the HAT crate's examples (§4.1) and
outputs of the `hat-splitter` crate pinned below; causality as a Jacobian (d out[t] / d x[t'] == 0 for
t' > t).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import bytes as byte_vocab
from ops import pooling
from ops.pooling import boundaries as boundary_sources
from ops.pooling import uax29

EOS, PAD = byte_vocab.EOS_ID, byte_vocab.PAD_ID
MODES = ("mean", "sum", "last")
IMPLS = ("segment_sum", "onehot")


def _ids(*parts: str | int) -> np.ndarray:
  """ByT5 ids of text parts and special ids, concatenated."""
  return np.concatenate([byte_vocab.encode(p) if isinstance(p, str) else np.array([p], np.int32)
                         for p in parts]).astype(np.int32)


def _marks(b) -> str:
  return "".join("|" if v else "." for v in np.asarray(b).reshape(-1))


def _random_boundaries(seed: int, shape: tuple[int, int], p: float) -> np.ndarray:
  return np.random.default_rng(seed).random(shape) < p


# ---------------------------------------------------------------------------------------------------------
# Naive oracles, one row at a time, straight from §5.1.


def _naive_ids(b_row):
  """(g, c): g_t = sum_{i<t} b_i (exclusive), c_t = sum_{i<=t} b_i (inclusive)."""
  g, c, total = [], [], 0
  for v in b_row:
    g.append(total)
    total += int(v)
    c.append(total)
  return g, c


def _naive_pool(x_row, b_row, capacity, mode, null):
  """s = [s_null; Pool(group 0); Pool(group 1); ...][:capacity], pooling the bytes with g_t = j into slot j+1."""
  g, _ = _naive_ids(b_row)
  out = np.zeros((capacity, x_row.shape[-1]))
  valid = np.zeros(capacity, bool)
  out[0], valid[0] = null, True
  for j in range(capacity - 1):
    members = [t for t in range(len(b_row)) if g[t] == j]
    if not members:
      continue
    valid[j + 1] = True
    if mode == "mean":
      out[j + 1] = np.mean(x_row[members], axis=0)
    elif mode == "sum":
      out[j + 1] = np.sum(x_row[members], axis=0)
    else:
      out[j + 1] = x_row[members[-1]]
  return out, valid


def _naive_reads(b_row, capacity, rule, overflow):
  """The slot byte t reads: c_t (inclusive) or g_t (exclusive); beyond capacity S - 1 (clamp) or 0 (null)."""
  g, c = _naive_ids(b_row)
  reads, flags = [], []
  for t in range(len(b_row)):
    r = c[t] if rule == "inclusive" else g[t]
    flags.append(r >= capacity)
    reads.append(r if r < capacity else (capacity - 1 if overflow == "clamp" else 0))
  return reads, flags


# ---------------------------------------------------------------------------------------------------------
# group_ids


def test_id_constants_match_data_bytes():
  assert (boundary_sources.PAD_ID, boundary_sources.EOS_ID, boundary_sources.BYTE_OFFSET,
          boundary_sources.VOCAB_SIZE) == (byte_vocab.PAD_ID, byte_vocab.EOS_ID, byte_vocab.BYTE_OFFSET,
                                           byte_vocab.VOCAB_SIZE)


@pytest.mark.parametrize("rule", ["inclusive", "exclusive"])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_group_ids_match_naive_loop(rule, p):
  b = _random_boundaries(0, (3, 17), p)
  capacity = 4
  groups = jax.jit(functools.partial(pooling.group_ids, capacity=capacity, rule=rule))(jnp.asarray(b))
  for row in range(b.shape[0]):
    g, c = _naive_ids(b[row])
    _, flags = _naive_reads(b[row], capacity, rule, "clamp")
    np.testing.assert_array_equal(groups.exclusive[row], g)
    np.testing.assert_array_equal(groups.inclusive[row], c)
    np.testing.assert_array_equal(groups.overflow[row], flags)
    assert int(groups.counts[row]) == int(b[row].sum())
  assert groups.capacity == capacity and groups.rule == rule


def test_group_ids_reads_count_known_boundaries():
  b = jnp.array([[1, 0, 1, 0, 0, 1, 0]])
  known = jnp.array([[0, 1, 0, 0, 1, 0, 1]])  # each boundary moved to the same or a later byte
  exclusive = pooling.group_ids(b, 3, rule="exclusive", known=known)
  np.testing.assert_array_equal(exclusive.exclusive, [[0, 1, 1, 2, 2, 2, 3]])  # groups still follow b
  np.testing.assert_array_equal(exclusive.reads, [[0, 0, 1, 1, 1, 2, 2]])
  assert not exclusive.overflow.any()
  inclusive = pooling.group_ids(b, 3, rule="inclusive", known=known)
  np.testing.assert_array_equal(inclusive.reads, [[0, 1, 1, 1, 2, 2, 3]])
  np.testing.assert_array_equal(inclusive.overflow, [[False] * 6 + [True]])
  with pytest.raises(ValueError, match="known"):
    pooling.group_ids(b, 3, known=known[:, 1:])


def test_group_ids_accept_int_boundaries_and_reject_bad_arguments():
  b = jnp.array([[0, 1, 0, 1]])
  np.testing.assert_array_equal(pooling.group_ids(b, 3).inclusive, [[0, 1, 1, 2]])
  with pytest.raises(ValueError, match="capacity"):
    pooling.group_ids(b, 0)
  with pytest.raises(ValueError, match="rule"):
    pooling.group_ids(b, 3, rule="both")
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    pooling.group_ids(b[0], 3)


# ---------------------------------------------------------------------------------------------------------
# pool / upsample against the loops


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_pool_matches_naive_loop(mode, impl):
  # p = 0.4 over T = 19 with capacity 5: some rows overflow (more than 4 groups), one row has no boundary.
  b = _random_boundaries(1, (4, 19), 0.4)
  b[3] = False
  x = np.random.default_rng(2).normal(size=(4, 19, 3)).astype(np.float32)
  null = np.array([0.5, -1.0, 2.0], np.float32)
  capacity = 5
  groups = pooling.group_ids(jnp.asarray(b), capacity)
  pooled, valid = jax.jit(functools.partial(pooling.pool, mode=mode, impl=impl))(
      jnp.asarray(x), groups, null=jnp.asarray(null))
  assert pooled.shape == (4, capacity, 3) and valid.shape == (4, capacity)
  assert b.sum(axis=1).max() > capacity - 1  # the overflow case is exercised
  for row in range(4):
    want, want_valid = _naive_pool(x[row], b[row], capacity, mode, null)
    np.testing.assert_allclose(pooled[row], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(valid[row], want_valid)


@pytest.mark.parametrize("overflow", ["clamp", "null"])
@pytest.mark.parametrize("rule", ["inclusive", "exclusive"])
def test_upsample_matches_naive_loop(rule, overflow):
  b = _random_boundaries(3, (3, 16), 0.35)
  capacity = 4
  groups = pooling.group_ids(jnp.asarray(b), capacity, rule=rule)
  slots = np.random.default_rng(4).normal(size=(3, capacity, 2)).astype(np.float32)
  out = jax.jit(functools.partial(pooling.upsample, overflow=overflow))(jnp.asarray(slots), groups)
  for row in range(3):
    reads, flags = _naive_reads(b[row], capacity, rule, overflow)
    np.testing.assert_array_equal(out[row], slots[row, reads])
    np.testing.assert_array_equal(groups.overflow[row], flags)


@pytest.mark.parametrize("mode", MODES)
def test_pool_impls_agree_values_and_gradients(mode):
  b = _random_boundaries(5, (2, 24), 0.25)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 24, 4)), jnp.float32)
  groups = pooling.group_ids(jnp.asarray(b), 6)
  weights = jnp.asarray(np.random.default_rng(7).normal(size=(2, 6, 4)), jnp.float32)

  def loss(x, impl):
    return jnp.sum(pooling.pool(x, groups, mode=mode, impl=impl)[0] * weights)

  outs = {impl: jax.jit(jax.value_and_grad(functools.partial(loss, impl=impl)))(x) for impl in IMPLS}
  np.testing.assert_allclose(outs["onehot"][0], outs["segment_sum"][0], rtol=1e-5)
  np.testing.assert_allclose(outs["onehot"][1], outs["segment_sum"][1], rtol=1e-5, atol=1e-6)
  bf16 = {impl: pooling.pool(x.astype(jnp.bfloat16), groups, mode=mode, impl=impl)[0] for impl in IMPLS}
  assert bf16["onehot"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16["onehot"], np.float32), np.asarray(bf16["segment_sum"], np.float32),
                             rtol=1e-2, atol=1e-2)


def test_no_boundaries_reads_the_null_group_everywhere():
  x = jnp.arange(12, dtype=jnp.float32).reshape(1, 6, 2)
  groups = pooling.group_ids(jnp.zeros((1, 6), bool), 3)
  pooled, valid = pooling.pool(x, groups, null=jnp.array([-7.0, -7.0]))
  np.testing.assert_array_equal(groups.counts, [0])
  assert not groups.overflow.any()
  np.testing.assert_array_equal(valid, [[True, True, False]])  # null, the incomplete group 0, empty
  np.testing.assert_allclose(pooled[0, 1], x[0].mean(axis=0))
  for rule in ("inclusive", "exclusive"):
    out = pooling.upsample(pooled, pooling.group_ids(jnp.zeros((1, 6), bool), 3, rule=rule))
    np.testing.assert_array_equal(out, np.full((1, 6, 2), -7.0))


def test_capacity_overflow_drops_groups_and_flags_bytes():
  # 6 groups ending at 0, 2, 3, 5, 6, 8 with T = 10 and capacity 3 (null + 2 groups).
  b = np.zeros((1, 10), bool)
  b[0, [0, 2, 3, 5, 6, 8]] = True
  x = jnp.arange(10, dtype=jnp.float32).reshape(1, 10, 1)
  groups = pooling.group_ids(jnp.asarray(b), 3)
  pooled, valid = pooling.pool(x, groups, mode="sum")
  np.testing.assert_array_equal(pooled[0, :, 0], [0.0, 0.0, 1.0 + 2.0])  # groups {0}, {1, 2}; rest dropped
  assert valid.all()
  # byte t reads c_t: 1 1 2 3 3 4 5 5 6 6 -> overflow from byte 3 (the last byte of the first dropped group)
  np.testing.assert_array_equal(groups.overflow[0], [False] * 3 + [True] * 7)
  np.testing.assert_array_equal(pooling.upsample(pooled, groups)[0, :, 0], [0, 0, 3, 3, 3, 3, 3, 3, 3, 3])
  np.testing.assert_array_equal(pooling.upsample(pooled, groups, overflow="null")[0, :, 0],
                                [0, 0, 3] + [0] * 7)
  only_null = pooling.group_ids(jnp.asarray(b), 1)  # capacity 1: every byte after the first boundary overflows
  pooled, valid = pooling.pool(x, only_null)
  assert pooled.shape == (1, 1, 1) and valid.all()
  np.testing.assert_array_equal(only_null.overflow[0], np.cumsum(b[0]) >= 1)


def test_pool_and_upsample_reject_bad_arguments():
  groups = pooling.group_ids(jnp.zeros((1, 4), bool), 2)
  x = jnp.zeros((1, 4, 2))
  with pytest.raises(ValueError, match="mode"):
    pooling.pool(x, groups, mode="max")
  with pytest.raises(ValueError, match="impl"):
    pooling.pool(x, groups, impl="pallas")
  with pytest.raises(ValueError, match=r"\[B, T, D\]"):
    pooling.pool(jnp.zeros((1, 5, 2)), groups)
  with pytest.raises(ValueError, match="capacity"):
    pooling.upsample(jnp.zeros((1, 3, 2)), groups)
  with pytest.raises(ValueError, match="overflow"):
    pooling.upsample(jnp.zeros((1, 2, 2)), groups, overflow="drop")


# ---------------------------------------------------------------------------------------------------------
# Causality of upsample o (causal slot mixer) o pool


def _dependence(fn, x) -> np.ndarray:
  """dep[t, t'] = max |d fn(x)[0, t] / d x[0, t']| for x [1, T, D]."""
  jac = jax.jacrev(fn)(x)[0, :, :, 0, :, :]  # [T, D, T, D]
  return np.asarray(jnp.max(jnp.abs(jac), axis=(1, 3)))


def _causal_mixer(capacity: int, d: int):
  """A nonlinear map over slots in which slot j depends on slots <= j only (the shortened layers)."""
  w = jnp.asarray(np.tril(np.random.default_rng(8).normal(size=(capacity, capacity))) + 2 * np.eye(capacity),
                  jnp.float32)
  v = jnp.asarray(np.random.default_rng(9).normal(size=(d, d)), jnp.float32)
  return lambda s: jnp.tanh(jnp.einsum("ij,bjd,de->bie", w, s, v))


@pytest.mark.parametrize("overflow", ["clamp", "null"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", ["inclusive", "exclusive"])
def test_upsample_of_pool_is_causal(rule, mode, overflow):
  t, d, capacity = 14, 2, 5
  b = np.zeros((1, t), bool)
  b[0, [1, 2, 5, 9, 10, 12]] = True  # 6 groups: the last ones overflow
  groups = pooling.group_ids(jnp.asarray(b), capacity, rule=rule)
  mix = _causal_mixer(capacity, d)
  x = jnp.asarray(np.random.default_rng(10).normal(size=(1, t, d)), jnp.float32)

  def out(x):
    return pooling.upsample(mix(pooling.pool(x, groups, mode=mode)[0]), groups, overflow=overflow)

  dep = _dependence(out, x)
  assert np.all(np.triu(dep, k=1) == 0), f"output depends on later bytes:\n{np.triu(dep, k=1)}"
  # And exactly on what §5.1 says: every stored byte of a slot <= the slot it reads (all bytes for mean /
  # sum, the group's last byte for "last").
  reads, _ = _naive_reads(b[0], capacity, rule, overflow)
  g, _ = _naive_ids(b[0])
  for i in range(t):
    for j in range(t):
      member = g[j] + 1 <= reads[i] and (mode != "last" or b[0, j] or j == t - 1)
      assert (dep[i, j] > 0) == member, (i, j)


def test_causality_check_catches_a_gather_one_slot_ahead():
  b = np.zeros((1, 10), bool)
  b[0, [2, 5, 7]] = True
  groups = pooling.group_ids(jnp.asarray(b), 5)
  x = jnp.asarray(np.random.default_rng(11).normal(size=(1, 10, 2)), jnp.float32)

  def leaky(x):  # reads slot c_t + 1: the group that is still open at t
    pooled = pooling.pool(x, groups)[0]
    return jnp.take_along_axis(pooled, jnp.minimum(groups.inclusive + 1, 4)[..., None], axis=1)

  assert np.any(np.triu(_dependence(leaky, x), k=1) > 0)


@pytest.mark.parametrize("rule", ["inclusive", "exclusive"])
def test_the_boundary_at_t_is_read_only_by_the_inclusive_rule(rule):
  """Flipping b_t changes no output before t (inclusive) / up to t (exclusive): the exclusive rule suits
  boundaries that byte t + 1 decides (HAT words)."""
  t_len, capacity = 12, 6
  b = _random_boundaries(12, (1, t_len), 0.4)
  x = jnp.asarray(np.random.default_rng(13).normal(size=(1, t_len, 2)), jnp.float32)
  mix = _causal_mixer(capacity, 2)

  @jax.jit
  def out(b):
    groups = pooling.group_ids(b, capacity, rule=rule)
    return pooling.upsample(mix(pooling.pool(x, groups)[0]), groups)

  base = out(jnp.asarray(b))
  fixed = 0 if rule == "inclusive" else 1
  changed_at_t = 0
  for t in range(t_len):
    flipped = b.copy()
    flipped[0, t] = ~flipped[0, t]
    other = out(jnp.asarray(flipped))
    np.testing.assert_array_equal(other[0, :t + fixed], base[0, :t + fixed])
    changed_at_t += int(not np.array_equal(other[0, t], base[0, t]))
  assert (changed_at_t > 0) == (rule == "inclusive")


# ---------------------------------------------------------------------------------------------------------
# Boundary sources (jnp)


def test_fixed_boundaries_every_kth_byte_eos_and_pad():
  ids = jnp.asarray(_ids("abcdefg")[None])
  assert _marks(pooling.fixed_boundaries(ids, 3)) == "|..|..|"  # b_t = 1[t mod k == 0]
  ids = jnp.asarray(_ids("ab", EOS, "cdefg", PAD, PAD)[None])
  assert _marks(pooling.fixed_boundaries(ids, 4)) == "|.|.|....."  # EOS ends a group; PAD never does
  assert _marks(pooling.fixed_boundaries(ids, 4, eos_boundary=False)) == "|...|....."
  with pytest.raises(ValueError):
    pooling.fixed_boundaries(ids, 0)


def test_whitespace_boundaries_at_the_space():
  ids = jnp.asarray(_ids("the cat\tsat  on", EOS, "x ", PAD)[None])
  assert _marks(pooling.whitespace_boundaries(ids)) == "...|.......||..|.|."
  assert _marks(pooling.whitespace_boundaries(ids, chars=b" \t")) == "...|...|...||..|.|."
  chinese = jnp.asarray(_ids("你好世界，没有空格。")[None])
  assert not pooling.whitespace_boundaries(chinese).any()


def _naive_spacelike(byte: int) -> bool:
  """§11.1 as written: b < '0' or '9' < b < 'A' or 'Z' < b < 'a' or 'z' < b < 0x80 or b >= 0xC0."""
  return (byte < ord("0") or ord("9") < byte < ord("A") or ord("Z") < byte < ord("a")
          or ord("z") < byte < 0x80 or byte >= 0xC0)


def test_is_spacelike_every_byte_and_specials():
  ids = jnp.arange(byte_vocab.VOCAB_SIZE + 3)
  got = np.asarray(pooling.is_spacelike(ids))
  want = [True] * 3 + [_naive_spacelike(v) for v in range(256)] + [True] * 3
  np.testing.assert_array_equal(got, want)
  spacelike = {chr(v) for v in range(128) if got[v + 3]}
  assert not spacelike & set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
  assert set(" \n\t_.,!-'\"\x7f") <= spacelike
  assert not got[0x80 + 3:0xC0 + 3].any() and got[0xC0 + 3:256 + 3].all()  # continuation vs leading bytes


@pytest.mark.parametrize("text, marks", [
    ("the cat sat.", "...|...|...|"),
    ("a, b", ".|.."),  # only the first byte of a spacelike run
    ("  x", "|.."),  # b_0 = spacelike(x_0)
    ("café au", "...|.|.."),  # é = C3 A9: the leading byte is spacelike
    ("你好", "|..|.."),  # one global step per CJK character
    ("x==y", ".|.."),
])
def test_spacelike_boundaries_spacebyte_examples(text, marks):
  assert _marks(pooling.spacelike_boundaries(jnp.asarray(_ids(text)[None]))) == marks


def test_spacelike_boundaries_match_naive_rule_on_random_bytes():
  rng = np.random.default_rng(14)
  raw = rng.choice(np.array([*b"ab Z9_.\n", 0x80, 0xBF, 0xC3, 0xE4, 0xFF]), size=(3, 40))
  ids = raw + byte_vocab.BYTE_OFFSET
  ids[1, [5, 20]] = EOS
  got = np.asarray(pooling.spacelike_boundaries(jnp.asarray(ids)))
  for row in range(3):
    sl = [not byte_vocab.is_byte_id(i) or _naive_spacelike(int(i) - 3) for i in ids[row]]
    want = [sl[t] and (t == 0 or not sl[t - 1]) or ids[row, t] == EOS for t in range(40)]
    np.testing.assert_array_equal(got[row], want)


def test_spacelike_eos_and_pad():
  ids = jnp.asarray(_ids("ab.", EOS, " cd", PAD, PAD)[None])
  # EOS is spacelike: by the rule alone it is no boundary after "."; the space after it is none either.
  assert _marks(pooling.spacelike_boundaries(ids)) == "..||....."
  assert _marks(pooling.spacelike_boundaries(ids, eos_boundary=False)) == "..|......"


def test_spacelike_groups_are_spacebyte_gather_and_loss_mask():
  """With S = T_global + 1: pool(mode="last") is x[idx] (idx the first T_global global positions) and the
  overflow flags are SpaceByte's ignored targets, targets[global_ts[T_global]:] = -1 (§11.1)."""
  ids = _ids("one two, three four five")
  t_global = 3
  b = pooling.spacelike_boundaries(jnp.asarray(ids[None]))
  positions = np.flatnonzero(np.asarray(b[0]))
  assert len(positions) > t_global
  x = jnp.asarray(np.random.default_rng(18).normal(size=(1, len(ids), 2)), jnp.float32)
  groups = pooling.group_ids(b, t_global + 1)
  pooled, _ = pooling.pool(x, groups, mode="last")
  np.testing.assert_array_equal(pooled[0, 1:], x[0, positions[:t_global]])
  np.testing.assert_array_equal(groups.overflow[0], np.arange(len(ids)) >= positions[t_global])


@pytest.mark.parametrize("source", [
    pooling.spacelike_boundaries, pooling.whitespace_boundaries, functools.partial(pooling.fixed_boundaries, k=3)])
def test_jnp_sources_are_prefix_stable(source):
  """b_t depends on ids <= t only, as the inclusive rule needs."""
  ids = _ids("Hi there, 世界! a_b\n", EOS, "x.y")
  full = np.asarray(source(jnp.asarray(ids[None])))[0]
  for t in range(1, len(ids) + 1):
    np.testing.assert_array_equal(np.asarray(source(jnp.asarray(ids[None, :t])))[0], full[:t])


# ---------------------------------------------------------------------------------------------------------
# HAT splitter (§4.1)


@pytest.mark.parametrize("text, pieces", [
    ("can't stop", ["can't", " ", "stop"]),  # WB6/WB7: letters around an apostrophe
    ("3.14,15", ["3.14,15"]),  # WB11/WB12
    ("a\r\nb", ["a", "\r\n", "b"]),  # WB3, WB3a/b
    ("  x", ["  ", "x"]),  # WB3d
    ("🇩🇪🇫", ["🇩🇪", "🇫"]),  # WB15/16: regional indicators in pairs
    ("e\u0301x", ["e\u0301x"]),  # WB4: a combining mark is absorbed
    ("カタカナ", ["カタカナ"]),  # WB13
    ("你好", ["你", "好"]),  # WB999: Han is not ALetter
    ("foo_bar1", ["foo_bar1"]),  # WB13a/b
    ("a.b.", ["a.b", "."]),
    ('שלום צה"ל', ["שלום", " ", 'צה"ל']),  # WB7b/c
    ("👨\u200d👩", ["👨\u200d👩"]),  # WB3c
    ("x\u200b y", ["x", "\u200b", " ", "y"]),  # ZERO WIDTH SPACE is Other
])
def test_uax29_word_bounds(text, pieces):
  assert uax29.word_bounds(text) == pieces


@pytest.mark.parametrize("text, words", [
    # The spec's examples (crate tests).
    ("Hello, world!", ["Hello,", " world!"]),
    ("howAreYou", ["how", "Are", "You"]),
    ("how_are_you", ["how_", "are_", "you"]),
    ("", []),
    # Outputs of the hat-splitter crate (0.1.10), pinned.
    ("hello   world", ["hello", "   ", "world"]),
    ("hello\tworld", ["hello", "\t", "world"]),
    ("hello \n\nworld", ["hello", " ", "\n", "\n", "world"]),
    ("thisIsCamelCase and this is not", ["this", "Is", "Camel", "Case", " and", " this", " is", " not"]),
    ("here! is some, more punctuation. I h0p3 thi$ isn't too 'much'.",
     ["here!", " is", " some,", " more", " punctuation.", " I", " h0p3", " thi", "$", " isn'", "t", " too", " '",
      "much'."]),
    ("def f(x):\n    return x**2  # sq\r\n",
     ["def", " f(", "x):", "\n", "    ", "return", " x**", "2", "  ", "#", " sq", "\r\n"]),
    ("e.g. U.S.A. costs $3.14, or 1,000.50",
     ["e.", "g.", " U.", "S.", "A.", " costs", " $", "3.", "14,", " or", " 1,", "000.", "50"]),
    ("Fügen Sie 225 g dünn geschnittenen Schweinebauch hinzu.",
     ["Fügen", " Sie", " 225", " g", " dünn", " geschnittenen", " Schweinebauch", " hinzu."]),
    ("你好吗 世界", ["你", "好", "吗", " 世", "界"]),  # UAX #29: one word per Han character
    ("こんにちは、カタカナ！", ["こ", "ん", "に", "ち", "は、", "カタカナ！"]),
    ("안녕하세요 세계", ["안녕하세요", " 세계"]),
    ('שלום צה"ל', ["שלום", ' צה"', "ל"]),
    ("👨\u200d👩\u200d👧 🇩🇪🇫🇷", ["👨\u200d👩\u200d👧", " 🇩🇪", "🇫🇷"]),
    ("XMLHttpRequest iPhone", ["XMLHttp", "Request", " i", "Phone"]),
    ("𓀀✨𝒜𝓁𝑔𝑜 شْء 𝔽(λx.𝑥²) 🤖🍕⟨𝛴, 𝜋⟩ 🛠️ҀЋހ±(Δ𝓧) 乁( •_• )ㄏ   ⿰木",
     ["𓀀", "✨", "𝒜𝓁𝑔𝑜", " شْء", " 𝔽(", "λx.", "𝑥", "²)", " 🤖", "🍕⟨", "𝛴,", " 𝜋⟩", " 🛠️", "ҀЋހ", "±(", "Δ𝓧)",
      " 乁(", " •_•", " )", "ㄏ", "   ", "⿰", "木"]),
])
def test_hat_split_crate_examples(text, words):
  assert pooling.hat_split(text) == [w.encode("utf-8") for w in words]


@pytest.mark.parametrize("text, max_bytes, words", [
    ("Hello, world!", 4, [b"Hell", b"o,", b" wor", b"ld!"]),  # the spec's example
    ("verylongword", 10, [b"verylongwo", b"rd"]),  # crate tests
    ("für", 2, [b"f", "ü".encode(), b"r"]),  # the cut moves back to a character boundary
    ("🌝", 2, [b"\xf0\x9f", b"\x8c\x9d"]),  # a character longer than the limit is cut inside
    ("你好吗", 2, [b"\xe4\xbd", b"\xa0", b"\xe5\xa5", b"\xbd", b"\xe5\x90", b"\x97"]),
])
def test_hat_split_with_limit_crate_examples(text, max_bytes, words):
  assert pooling.hat_split(text, max_bytes) == words
  with pytest.raises(ValueError):
    pooling.hat_split(text, 0)


def test_hat_split_matches_the_crate_when_installed():
  hat_splitter = pytest.importorskip("hat_splitter")
  splitter = hat_splitter.HATSplitter()
  rng = np.random.default_rng(15)
  alphabet = list("abcXYZ019 ,.'\"_-:\n\t") + list("éü你好こカ안שء🌝👨\u200d\u0301\u200b🇩")
  for _ in range(300):
    text = "".join(rng.choice(alphabet, size=rng.integers(1, 20)))
    assert pooling.hat_split(text, 7) == splitter.split_with_limit(text, 7), repr(text)


def test_hat_word_boundaries_on_ids():
  ids = _ids("Hello, world!", EOS, "how_are_you", 2, "x", PAD, PAD)
  b = pooling.hat_word_boundaries(ids)
  # "Hello," " world!" | EOS | "how_" "are_" "you" | UNK | "x" | PAD PAD (never a boundary)
  assert _marks(b) == ".....|......||...|...|..|||.."
  batch = pooling.hat_word_boundaries(np.stack([ids, ids[::-1]]))
  assert batch.shape == (2, len(ids)) and np.array_equal(batch[0], b)
  limited = pooling.hat_word_boundaries(_ids("Hello, world!"), max_bytes=4)
  assert _marks(limited) == "...|.|...|..|"


def test_hat_word_boundaries_agree_with_hat_split():
  text = "The quick brown fox — isn't it? camelCaseWord 3.14\n\nend"
  ends = np.cumsum([len(w) for w in pooling.hat_split(text)]) - 1
  want = np.zeros(len(text.encode()), bool)
  want[ends] = True
  np.testing.assert_array_equal(pooling.hat_word_boundaries(_ids(text)), want)


def test_text_without_spaces_and_invalid_utf8():
  chinese = _ids("这是一个没有空格的句子")  # 11 characters, 33 bytes
  assert pooling.hat_word_boundaries(chinese).sum() == 11  # UAX #29: one word per Han character
  assert int(pooling.spacelike_boundaries(jnp.asarray(chinese[None])).sum()) == 11
  assert not pooling.whitespace_boundaries(jnp.asarray(chinese[None])).any()
  cut = chinese[:-1]  # the last character is cut by the window edge: its two bytes are one word each
  assert _marks(pooling.hat_word_boundaries(cut)[-3:]) == "|||"
  garbage = (np.arange(256, dtype=np.int32) + byte_vocab.BYTE_OFFSET)[::-1]
  assert pooling.hat_word_boundaries(garbage).any()
  assert _marks(pooling.hat_word_boundaries(np.array([PAD, PAD]))) == ".."


def _hat_reads(ids, use_known=True):
  """(reads, ends) of one row: the slot each byte reads with the exclusive rule, and the word ends."""
  ends, known = pooling.hat_word_boundaries(ids, known=True)
  groups = pooling.group_ids(jnp.asarray(ends[None]), len(ids) + 1, rule="exclusive",
                             known=jnp.asarray(known[None]) if use_known else None)
  return np.asarray(groups.reads[0]), ends


def test_hat_reads_depend_on_the_prefix_only():
  """With `known`, the slot byte t reads and the words in it are those of the prefix ids[:t + 1]."""
  ids = _ids("Hello, world! howAreYou how_are_you isn't 3.14 a你好吗 café×2 🌝x\n\n  end.", EOS, "x")
  full_reads, full_ends = _hat_reads(ids)
  word_ends = np.flatnonzero(full_ends)
  for t in range(len(ids)):
    prefix_reads, prefix_ends = _hat_reads(ids[:t + 1])
    assert prefix_reads[t] == full_reads[t], t
    if full_reads[t]:  # the words read are made of the same bytes
      last = word_ends[full_reads[t] - 1] + 1
      np.testing.assert_array_equal(prefix_ends[:last], full_ends[:last])
  # Without it, reads inside multi-byte characters depend on the character's later bytes.
  ahead = [t for t in range(len(ids)) if _hat_reads(ids[:t + 1], False)[0][t] != _hat_reads(ids, False)[0][t]]
  assert ahead and all(ids[t] - byte_vocab.BYTE_OFFSET >= 0x80 for t in ahead)


def test_hat_known_boundaries_move_to_the_next_characters_end():
  ends, known = pooling.hat_word_boundaries(_ids("a你好 é×b"), known=True)
  assert _marks(ends) == "|..|..|..|.||"
  assert _marks(known) == "..|..||...|||"  # a -> byte 2 of 你, 你 -> byte 2 of 好, ..., " é" -> byte 1 of ×
  ascii_ends, ascii_known = pooling.hat_word_boundaries(_ids("Hi, you", EOS, "x"), known=True)
  np.testing.assert_array_equal(ascii_known, ascii_ends)


# ---------------------------------------------------------------------------------------------------------
# Fixed-k patches (§6, §10.1)


def test_shift_right():
  x = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1)
  np.testing.assert_array_equal(pooling.shift_right(x, 2)[0, :, 0], [0, 0, 0, 1, 2, 3])
  np.testing.assert_array_equal(pooling.shift_right(x, 1, pad=jnp.array([9.0]))[0, :, 0], [9, 0, 1, 2, 3, 4])
  np.testing.assert_array_equal(pooling.shift_right(x, 0), x)


def test_fixed_pool_is_hourglass_shift_and_matches_fixed_groups():
  k, t = 3, 12
  x = jnp.asarray(np.random.default_rng(16).normal(size=(2, t, 4)), jnp.float32)
  short = pooling.fixed_pool(x, k)
  assert short.shape == (2, t // k, 4)
  for m in range(t // k):  # patch m pools bytes mk - k + 1 .. mk (patch 0: k - 1 zero pads and byte 0)
    members = [i for i in range(m * k - k + 1, m * k + 1) if i >= 0]
    np.testing.assert_allclose(short[:, m], x[:, members].sum(axis=1) / k, rtol=1e-6)
  # The general machinery with fixed boundaries forms the same groups m >= 1 and reads the same patch.
  groups = pooling.group_ids(pooling.fixed_boundaries(jnp.ones((2, t), jnp.int32) + 3, k), t // k + 1)
  pooled, _ = pooling.pool(x, groups)
  np.testing.assert_allclose(pooled[:, 2:], short[:, 1:], rtol=1e-6)
  np.testing.assert_array_equal(groups.inclusive - 1, np.broadcast_to(np.arange(t) // k, (2, t)))
  concat = pooling.fixed_pool(x, k, mode="concat")  # MEGABYTE's global patch input in the shifted form
  assert concat.shape == (2, t // k, k * 4)
  np.testing.assert_array_equal(concat[:, 1].reshape(2, k, 4), x[:, 1:4])
  with pytest.raises(ValueError):
    pooling.fixed_pool(x, 5)


@pytest.mark.parametrize("mode", ["mean", "concat"])
def test_fixed_upsample_of_fixed_pool_is_causal(mode):
  k, t = 4, 12
  x = jnp.asarray(np.random.default_rng(17).normal(size=(1, t, 2)), jnp.float32)
  d = 2 if mode == "mean" else 2 * k
  mix = _causal_mixer(t // k, d)
  dep = _dependence(lambda x: pooling.fixed_upsample(mix(pooling.fixed_pool(x, k, mode=mode)), k), x)
  assert np.all(np.triu(dep, k=1) == 0)
  assert np.all(np.diag(dep)[::k] > 0)  # position mk sees its own byte (the k - 1 shift is minimal)
