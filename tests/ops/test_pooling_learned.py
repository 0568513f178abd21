"""Tests for the trained boundary sources (ops/pooling/learned.py) and pool's straight-through path.

Oracles: naive numpy (float64) written from specs/token_free.md §5.2 (the relaxed Bernoulli sample, the
Binomial prior through math.lgamma, the entropy, the spike rule as a loop, BCE) and §5.1 (dynamic pooling's
one-hot (B, T, S) matrix normalised over T, written literally); gradients against central finite
differences of the relaxed form (the one-hot support frozen at the hard groups, the weights moving with b).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import bytes as byte_vocab
from ops import pooling

EOS, PAD = byte_vocab.EOS_ID, byte_vocab.PAD_ID


def _err(ref, x):
  """DESIGN §8: rms(ref - x) / (rms(ref) + 1e-8)."""
  ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
  return np.sqrt(np.mean((ref - x) ** 2)) / (np.sqrt(np.mean(ref ** 2)) + 1e-8)


# ---------------------------------------------------------------------------------------------------------
# Gumbel boundaries


def test_relaxed_bernoulli_matches_the_formula():
  rng = np.random.default_rng(0)
  p = rng.uniform(0.01, 0.99, (3, 17))
  u = rng.uniform(0.0, 1.0, (3, 17))
  for tau in (0.5, 1.0, 2.0):
    want = 1 / (1 + np.exp(-(np.log(p) - np.log(1 - p) + np.log(u) - np.log(1 - u)) / tau))
    got = pooling.relaxed_bernoulli(jnp.asarray(np.log(p) - np.log1p(-p), jnp.float32), jnp.asarray(u), tau)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  # u at 0 or 1 is clamped, never inf / nan
  assert np.all(np.isfinite(pooling.relaxed_bernoulli(jnp.zeros(2), jnp.array([0.0, 1.0]), 0.5)))
  with pytest.raises(ValueError, match="temperature"):
    pooling.relaxed_bernoulli(jnp.zeros(2), jnp.zeros(2), 0.0)


def test_hard_gumbel_sample_is_one_with_probability_p():
  """P(b~ > 0.5) = P(z + logistic noise > 0) = p, for any temperature."""
  p = np.array([0.05, 0.2, 0.5, 0.8])
  z = jnp.asarray(np.log(p / (1 - p)), jnp.float32)[:, None]
  u = jax.random.uniform(jax.random.key(0), (4, 200_000))
  hard, _ = pooling.learned_boundaries(jnp.broadcast_to(z, u.shape), jnp.full(u.shape, 50), uniform=u,
                                       temperature=0.5)
  np.testing.assert_allclose(np.mean(np.asarray(hard), axis=1), p, atol=4e-3)


def test_straight_through_forward_is_exactly_hard_and_gradient_is_identity():
  soft = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 9)), jnp.float32)
  hard = soft > 0.5
  st = pooling.straight_through(hard, soft)
  np.testing.assert_array_equal(st, np.asarray(hard, np.float32))  # bit-exact 0 / 1
  w = jnp.arange(18, dtype=jnp.float32).reshape(2, 9)
  np.testing.assert_array_equal(jax.grad(lambda s: jnp.sum(pooling.straight_through(s > 0.5, s) * w))(soft), w)


def test_learned_boundaries_sample_eval_and_forced_specials():
  rng = np.random.default_rng(2)
  z = rng.normal(size=(2, 12)).astype(np.float32) * 3
  u = rng.uniform(size=(2, 12)).astype(np.float32)
  ids = rng.integers(3, 259, (2, 12)).astype(np.int32)
  ids[0, 4], ids[1, 9:] = EOS, PAD
  z[0, 4], z[1, 9] = -20.0, 20.0  # the predictor says no at the EOS, yes at a PAD: both are overridden
  soft = 1 / (1 + np.exp(-(z + np.log(u) - np.log1p(-u)) / 0.5))
  want = (soft > 0.5) | (ids == EOS)
  want &= ids != PAD
  hard, st = pooling.learned_boundaries(jnp.asarray(z), jnp.asarray(ids), uniform=jnp.asarray(u))
  np.testing.assert_array_equal(hard, want)
  np.testing.assert_array_equal(st, want.astype(np.float32))
  # evaluation: 1[sigmoid(z) > 0.5], same forcing; b_st has no gradient there
  hard_eval, st_eval = pooling.learned_boundaries(jnp.asarray(z), jnp.asarray(ids))
  want_eval = ((1 / (1 + np.exp(-z)) > 0.5) | (ids == EOS)) & (ids != PAD)
  np.testing.assert_array_equal(hard_eval, want_eval)
  np.testing.assert_array_equal(st_eval, want_eval.astype(np.float32))
  # the straight-through gradient: d b_st / d z = d b~ / d z = b~ (1 - b~) / tau, zero at forced bytes
  grad = jax.grad(lambda z: jnp.sum(pooling.learned_boundaries(z, jnp.asarray(ids), uniform=jnp.asarray(u))[1])
                  )(jnp.asarray(z))
  want_grad = np.where((ids == EOS) | (ids == PAD), 0.0, soft * (1 - soft) / 0.5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
  assert not np.any(jax.grad(lambda z: jnp.sum(pooling.learned_boundaries(z, jnp.asarray(ids))[1]))(
      jnp.asarray(z)))
  with pytest.raises(ValueError, match="shape"):
    pooling.learned_boundaries(jnp.zeros((2, 3)), jnp.zeros((2, 4), jnp.int32))


# ---------------------------------------------------------------------------------------------------------
# Binomial prior


def _naive_binomial_loss(b_row, alpha):
  n, k = len(b_row), float(np.sum(b_row))
  log_pmf = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
             + k * math.log(alpha) + (n - k) * math.log(1 - alpha))
  return -log_pmf / n


def test_binomial_prior_loss_matches_naive_and_its_gradient():
  rng = np.random.default_rng(3)
  b = (rng.uniform(size=(4, 40)) < np.array([[0.05], [0.2], [0.5], [0.9]])).astype(np.float32)
  for alpha in (0.2, 0.37):
    got = pooling.binomial_prior_loss(jnp.asarray(b), alpha)
    np.testing.assert_allclose(got, [_naive_binomial_loss(row, alpha) for row in b], rtol=1e-5)
  # integer counts: exactly -log(C(n, k) alpha^k (1 - alpha)^(n - k)) / n
  row = np.zeros(10, np.float32)
  row[:3] = 1
  want = -math.log(math.comb(10, 3) * 0.2 ** 3 * 0.8 ** 7) / 10
  np.testing.assert_allclose(pooling.binomial_prior_loss(jnp.asarray(row[None]), 0.2), [want], rtol=1e-5)
  # the minimum over k sits at the prior's mode: k = floor((n + 1) alpha) = 8 for n = 40, alpha = 0.2
  losses = [float(pooling.binomial_prior_loss(jnp.asarray((np.arange(40) < k)[None], jnp.float32), 0.2)[0])
            for k in range(41)]
  assert int(np.argmin(losses)) == 8
  # d L / d b_t (the same for every t) = central differences of the naive form in k
  grad = jax.grad(lambda b: jnp.sum(pooling.binomial_prior_loss(b, 0.2)))(jnp.asarray(b))
  for r in range(4):
    eps, k, n = 1e-4, float(b[r].sum()), 40

    def f(k):
      return -(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(0.2)
               + (n - k) * math.log(0.8)) / n
    np.testing.assert_allclose(grad[r], np.full(n, (f(k + eps) - f(k - eps)) / (2 * eps)), rtol=1e-3)


def test_binomial_prior_loss_counts_valid_bytes_only():
  rng = np.random.default_rng(4)
  b = (rng.uniform(size=(2, 30)) < 0.3).astype(np.float32)
  valid = np.ones((2, 30), bool)
  valid[1, 18:] = False
  got = pooling.binomial_prior_loss(jnp.asarray(b), 0.2, jnp.asarray(valid))
  np.testing.assert_allclose(got, [_naive_binomial_loss(b[0], 0.2), _naive_binomial_loss(b[1, :18], 0.2)],
                             rtol=1e-5)
  assert float(pooling.binomial_prior_loss(jnp.ones((1, 4)), 0.2, jnp.zeros((1, 4), bool))[0]) == 0.0
  with pytest.raises(ValueError, match="prior"):
    pooling.binomial_prior_loss(jnp.ones((1, 4)), 1.0)


# ---------------------------------------------------------------------------------------------------------
# Entropy spikes


def test_next_byte_entropy_matches_numpy():
  logits = np.random.default_rng(5).normal(size=(2, 7, 259)) * 3
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = -np.sum(p * np.log(p), axis=-1)
  np.testing.assert_allclose(pooling.next_byte_entropy(jnp.asarray(logits, jnp.float32)), want, rtol=1e-5)
  np.testing.assert_allclose(pooling.next_byte_entropy(jnp.zeros((1, 1, 8))), [[math.log(8)]], rtol=1e-6)


def _naive_spikes(h, k, seg=None):
  out = []
  for t in range(len(h)):
    ok = True
    for i in range(1, k + 1):
      if t - i >= 0 and (seg is None or seg[t - i] == seg[t]):
        ok &= h[t] > h[t - i]
    out.append(ok)
  return np.array(out)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_entropy_spikes_match_the_naive_rule(k):
  rng = np.random.default_rng(6 + k)
  h = rng.normal(size=(3, 25)).astype(np.float32)
  h[0, 5:8] = 1.0  # ties are not spikes (strictly greater)
  seg = np.sort(rng.integers(1, 4, (3, 25)), axis=1).astype(np.int32)
  got = pooling.entropy_spikes(jnp.asarray(h), k)
  got_seg = pooling.entropy_spikes(jnp.asarray(h), k, jnp.asarray(seg))
  for r in range(3):
    np.testing.assert_array_equal(got[r], _naive_spikes(h[r], k))
    np.testing.assert_array_equal(got_seg[r], _naive_spikes(h[r], k, seg[r]))
  # dynamic pooling's get_spikes with k = 2 on a short example
  np.testing.assert_array_equal(pooling.entropy_spikes(jnp.array([[1.0, 0.5, 2.0, 1.5, 1.8, 3.0]]), 2),
                                [[True, False, True, False, False, True]])
  with pytest.raises(ValueError, match="k"):
    pooling.entropy_spikes(jnp.zeros((1, 3)), 0)


def test_sigmoid_bce_matches_numpy():
  z = np.linspace(-30, 30, 61)
  for y in (0.0, 1.0):  # -(y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))), in the stable f64 form
    want = y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)
    np.testing.assert_allclose(pooling.sigmoid_bce(jnp.asarray(z, jnp.float32), jnp.full(61, y)), want,
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# pool(..., boundaries=b): the straight-through path


def _setup(seed, shape=(3, 20), p=0.3, d=4):
  rng = np.random.default_rng(seed)
  soft = rng.uniform(size=shape).astype(np.float32)
  soft[:, :] = np.where(rng.uniform(size=shape) < p, 0.5 + soft / 2, soft / 2)  # hard = soft > 0.5
  x = rng.normal(size=shape + (d,)).astype(np.float32)
  return soft, soft > 0.5, x


def _st_pool(soft, hard, x, capacity, mode="mean", impl="segment_sum"):
  groups = pooling.group_ids(hard, capacity)
  return pooling.pool(x, groups, mode=mode, impl=impl, boundaries=pooling.straight_through(hard, soft))[0]


def _relaxed_pool(soft, soft0, hard, x, capacity, mode):
  """numpy f64: the relaxed form of §5.1's matrix as a function of soft (hard groups fixed): entry
  (t, g_t + 1) = 1 + g~_t - g_t with g~ the exclusive cumsum of b = hard + soft - soft0, normalised over T
  ("mean")."""
  b = hard.astype(np.float64) + soft - soft0
  g_soft = np.cumsum(b, axis=1) - b
  g = np.cumsum(hard, axis=1) - hard
  w = 1 + g_soft - g
  out = np.zeros((x.shape[0], capacity, x.shape[2]))
  for r in range(x.shape[0]):
    for j in range(capacity - 1):
      m = g[r] == j
      if m.any():
        s = np.sum(w[r, m, None] * x[r, m], axis=0)
        out[r, j + 1] = s / np.sum(w[r, m]) if mode == "mean" else s
  return out


@pytest.mark.parametrize("impl", ["segment_sum", "onehot"])
@pytest.mark.parametrize("mode", ["mean", "sum", "last"])
def test_straight_through_pool_forward_is_the_hard_pool(mode, impl):
  soft, hard, x = _setup(10)
  groups = pooling.group_ids(jnp.asarray(hard), 6)
  want = pooling.pool(jnp.asarray(x), groups, mode=mode, impl=impl)[0]
  got = _st_pool(jnp.asarray(soft), jnp.asarray(hard), jnp.asarray(x), 6, mode, impl)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("impl", ["segment_sum", "onehot"])
@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_straight_through_pool_gradient_is_finite_differences_of_the_relaxed_form(mode, impl):
  soft, hard, x = _setup(11)
  capacity = 6  # some rows overflow: dropped groups carry no gradient
  cot = np.random.default_rng(12).normal(size=(3, capacity, 4))

  def loss(s):
    return jnp.sum(_st_pool(s, jnp.asarray(hard), jnp.asarray(x), capacity, mode, impl) * cot)

  grad = np.asarray(jax.grad(loss)(jnp.asarray(soft)), np.float64)
  assert np.abs(grad).max() > 1e-2 and np.count_nonzero(grad) > soft.size // 3
  soft64, x64, eps = soft.astype(np.float64), x.astype(np.float64), 1e-5
  fd = np.zeros_like(soft64)
  for idx in np.ndindex(soft.shape):
    up, down = soft64.copy(), soft64.copy()
    up[idx] += eps
    down[idx] -= eps
    fd[idx] = (np.sum(_relaxed_pool(up, soft64, hard, x64, capacity, mode) * cot)
               - np.sum(_relaxed_pool(down, soft64, hard, x64, capacity, mode) * cot)) / (2 * eps)
  assert _err(fd, grad) < 5e-3, _err(fd, grad)
  # in a row that overflows, b at the byte that ends its last stored group and after it moves nothing
  g = np.cumsum(hard, axis=1) - hard
  overflowing = [r for r in range(3) if g[r, -1] >= capacity - 1]
  assert overflowing
  for r in overflowing:
    end = np.nonzero(g[r] >= capacity - 1)[0][0] - 1
    np.testing.assert_array_equal(grad[r, end:], 0.0)


def test_straight_through_pool_is_dynamic_poolings_onehot_matrix():
  """Values and gradients equal the §5.1 matrix written literally (shortening.py's downsample): foo =
  j - g~_t, M = (1 - foo) where foo == 0 else 0, normalised over T with + 1e-9, then the null slot."""
  soft, hard, x = _setup(13, (2, 16), 0.35, 3)
  capacity = 1 + int(hard.sum(axis=1).max())  # every group stored, as dynamic pooling's S = max n
  null = jnp.asarray([0.3, -0.2, 1.0])

  def literal(s):
    b = pooling.straight_through(jnp.asarray(hard), s)
    g = jnp.cumsum(b, axis=1) - b
    foo = jnp.arange(capacity - 1, dtype=jnp.float32) - g[..., None]  # [B, T, S - 1]
    m = jnp.where(foo == 0, 1 - foo, 0.0)
    m = m / (jnp.sum(m, axis=1, keepdims=True) + 1e-9)
    pooled = jnp.einsum("btd,bts->bsd", jnp.asarray(x), m)
    return jnp.concatenate([jnp.broadcast_to(null, (2, 1, 3)), pooled], axis=1)

  def ours(s):
    groups = pooling.group_ids(jnp.asarray(hard), capacity)
    return pooling.pool(jnp.asarray(x), groups, null=null, boundaries=pooling.straight_through(hard, s))[0]

  cot = jnp.asarray(np.random.default_rng(14).normal(size=(2, capacity, 3)), jnp.float32)
  np.testing.assert_allclose(ours(jnp.asarray(soft)), literal(jnp.asarray(soft)), rtol=1e-5, atol=1e-6)
  g_ours = jax.grad(lambda s: jnp.sum(ours(s) * cot))(jnp.asarray(soft))
  g_literal = jax.grad(lambda s: jnp.sum(literal(s) * cot))(jnp.asarray(soft))
  assert _err(g_literal, g_ours) < 5e-3 and np.abs(np.asarray(g_ours)).max() > 1e-2


def test_straight_through_upsample_of_pool_does_not_leak_the_future():
  """d out_t / d b~_i = 0 for i >= t: the gradient of byte t's read never reaches a later boundary (nor
  its own: b_t moves only later bytes' groups), and it does reach earlier ones."""
  t, capacity = 14, 5
  hard = np.zeros((1, t), bool)
  hard[0, [1, 2, 5, 9, 10, 12]] = True  # 6 groups: the last ones overflow
  soft = np.where(hard, 0.8, 0.2).astype(np.float32)
  x = jnp.asarray(np.random.default_rng(15).normal(size=(1, t, 3)), jnp.float32)
  groups = pooling.group_ids(jnp.asarray(hard), capacity)

  def out(s):
    pooled = pooling.pool(x, groups, boundaries=pooling.straight_through(jnp.asarray(hard), s))[0]
    return jnp.sum(pooling.upsample(jnp.cumsum(pooled, axis=1), groups), axis=-1)[0]  # a causal slot mix

  jac = np.abs(np.asarray(jax.jacobian(out)(jnp.asarray(soft))[:, 0]))  # [t, t]: d out_t / d soft_i
  assert np.all(np.triu(jac) == 0), np.triu(jac)
  assert np.count_nonzero(np.tril(jac, k=-1)) > t


def test_pool_rejects_boundaries_of_another_shape():
  groups = pooling.group_ids(jnp.zeros((1, 6), bool), 3)
  with pytest.raises(ValueError, match="boundaries"):
    pooling.pool(jnp.zeros((1, 6, 2)), groups, boundaries=jnp.zeros((1, 5)))


def test_learned_functions_jit():
  f = jax.jit(functools.partial(pooling.entropy_spikes, k=2))
  assert f(jnp.zeros((1, 4))).shape == (1, 4)
