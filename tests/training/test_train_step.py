"""Tests for training/train_step.py: accumulation, schedule, weight-decay mask, losses, bf16 compute."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import models
from configs import tiny
from ops import losses
from training import runtime
from training import train_step as ts
from training.errors import ConfigError

BATCH, SEQ = 4, 16


def _config(**model_overrides) -> ml_collections.ConfigDict:
  config = tiny.get_config()
  config.train.batch_size, config.train.seq_len = BATCH, SEQ
  config.model.num_layers = 1
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.mlp_dim = 64
  config.optimizer.warmup_steps = 0
  for key, value in model_overrides.items():
    setattr(config.model, key, value)
  return config


def _opt_config(**overrides) -> ml_collections.ConfigDict:
  opt = tiny.get_config().optimizer
  for key, value in overrides.items():
    setattr(opt, key, value)
  return opt


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  """A packed batch [BATCH, SEQ] with two documents per row and uneven zero weights across rows."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(3, 259, (BATCH, SEQ), dtype=np.int32)
  targets = rng.integers(3, 259, (BATCH, SEQ), dtype=np.int32)
  boundary = SEQ // 2 + 3
  segment_ids = np.where(np.arange(SEQ) < boundary, 1, 2).astype(np.int32)[None].repeat(BATCH, 0)
  positions = np.where(np.arange(SEQ) < boundary, np.arange(SEQ), np.arange(SEQ) - boundary)
  weights = np.ones((BATCH, SEQ), np.float32)
  weights[0, 5:] = 0.0  # the first micro-batch (rows 0-1) has far fewer weighted targets than rows 2-3
  weights[1, 2:] = 0.0
  return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets),
          "weights": jnp.asarray(weights), "segment_ids": jnp.asarray(segment_ids),
          "positions": jnp.asarray(positions[None].repeat(BATCH, 0).astype(np.int32))}


def _model(config: ml_collections.ConfigDict) -> models.ModelFamily:
  return models.get_family(runtime.resolve_config(config).model)


def _state(model: models.ModelFamily, tx: optax.GradientTransformation, seed: int = 0) -> ts.TrainState:
  return nn.unbox(ts.init_train_state(model, tx, jax.random.key(seed), SEQ))


def _step_fn(model, tx, schedule, grad_accum):
  return jax.jit(functools.partial(ts.train_step, family=model, tx=tx, schedule=schedule,
                                   grad_accum=grad_accum))


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def _grad_capture() -> optax.GradientTransformation:
  """An 'optimizer' whose state is the last gradient it saw (params unchanged): exposes train_step's grads."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


@pytest.fixture(scope="module")
def tiny_model():
  return _model(_config())


# ----------------------------------------------------------------------------
# Gradient accumulation.
# ----------------------------------------------------------------------------


def test_grad_accum_gives_the_same_loss_and_gradients(tiny_model):
  tx = _grad_capture()
  schedule = optax.constant_schedule(1.0)
  state = _state(tiny_model, tx)
  batch = _batch()
  one, m1 = _step_fn(tiny_model, tx, schedule, 1)(state, batch)
  two, m2 = _step_fn(tiny_model, tx, schedule, 2)(state, batch)
  assert float(m1["tokens"]) == float(m2["tokens"]) == float(batch["weights"].sum())
  assert _rel(m1["loss"], m2["loss"]) < 1e-5
  assert _rel(m1["grad_norm"], m2["grad_norm"]) < 1e-5
  flat_one = jax.tree_util.tree_flatten_with_path(one.opt_state)[0]
  for (path, g1), g2 in zip(flat_one, jax.tree.leaves(two.opt_state)):
    assert float(jnp.abs(g1).max()) > 0, jax.tree_util.keystr(path)
    assert _rel(g1, g2) < 1e-5, jax.tree_util.keystr(path)


def test_grad_accum_gives_the_same_adamw_update(tiny_model):
  tx, schedule = ts.make_optimizer(_opt_config(warmup_steps=0, lr=1e-3), total_steps=10)
  state = _state(tiny_model, tx)
  batch = _batch()
  one, m1 = _step_fn(tiny_model, tx, schedule, 1)(state, batch)
  two, m2 = _step_fn(tiny_model, tx, schedule, 2)(state, batch)
  assert _rel(m1["loss"], m2["loss"]) < 1e-5
  assert int(one.step) == int(two.step) == 1
  moved = 0
  for p0, p1, p2 in zip(jax.tree.leaves(state.params), jax.tree.leaves(one.params),
                        jax.tree.leaves(two.params)):
    moved += int(jnp.sum(p0 != p1))
    np.testing.assert_allclose(np.asarray(p2 - p0), np.asarray(p1 - p0), rtol=1e-5, atol=2e-7)
  assert moved > 0


def test_grad_accum_must_divide_the_batch():
  config = _config()
  config.train.grad_accum = 3
  with pytest.raises(ConfigError, match="grad_accum"):
    runtime.resolve_config(config)


# ----------------------------------------------------------------------------
# Learning-rate schedule.
# ----------------------------------------------------------------------------


def test_schedule_warms_up_then_cosine_decays_to_min_lr():
  opt = _opt_config(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
  schedule = ts.learning_rate_schedule(opt, total_steps=100)
  lr = lambda step: float(schedule(step))
  assert lr(0) == 0.0
  assert lr(5) == pytest.approx(5e-4, rel=1e-6)
  assert lr(10) == pytest.approx(1e-3, rel=1e-6)
  values = [lr(s) for s in range(10, 101)]
  assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warmup
  for step in (25, 55, 80):
    progress = (step - 10) / 90
    expected = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * progress))
    assert lr(step) == pytest.approx(expected, rel=1e-5)
  assert lr(55) == pytest.approx(5.5e-4, rel=1e-5)  # halfway: the mean of peak and floor
  assert lr(100) == pytest.approx(1e-4, rel=1e-5)  # min_lr_ratio * lr at the end
  assert lr(130) == pytest.approx(1e-4, rel=1e-5)  # and it stays there


@pytest.mark.parametrize("warmup", [0, 10])
def test_linear_schedule_warms_up_then_decays_linearly_to_min_lr(warmup):
  opt = _opt_config(lr=1e-3, warmup_steps=warmup, min_lr_ratio=0.0, schedule="linear")
  schedule = ts.learning_rate_schedule(opt, total_steps=110)
  lr = lambda step: float(schedule(step))
  assert lr(0) == (0.0 if warmup else pytest.approx(1e-3, rel=1e-6))
  assert lr(warmup) == pytest.approx(1e-3, rel=1e-6)
  for step in (warmup + 25, warmup + 50, 110):
    assert lr(step) == pytest.approx(1e-3 * (110 - step) / (110 - warmup), abs=1e-9)
  assert lr(130) == pytest.approx(0.0, abs=1e-9)


def test_unknown_schedule_is_one_config_error():
  config = tiny.get_config()
  config.optimizer.schedule = "step"
  with pytest.raises(ConfigError, match="optimizer.schedule must be 'cosine' or 'linear'"):
    runtime.resolve_config(config)


def test_schedule_clamps_warmup_longer_than_the_run():
  opt = _opt_config(lr=1e-3, warmup_steps=50, min_lr_ratio=0.1)
  schedule = ts.learning_rate_schedule(opt, total_steps=10)
  values = [float(schedule(s)) for s in range(11)]
  assert max(values) == pytest.approx(1e-3, rel=1e-6)  # the peak is reached inside the run
  assert values[-1] == pytest.approx(1e-4, rel=1e-5)
  assert all(np.isfinite(values))


def test_reported_lr_is_the_lr_adamw_applies(tiny_model):
  """With b1 = b2 = 0 (and no decay or clip) Adam's step is lr * g / (|g| + eps), so max|dp| == lr."""
  opt = _opt_config(lr=1e-2, warmup_steps=3, min_lr_ratio=0.1, b1=0.0, b2=0.0, weight_decay=0.0,
                    grad_clip=0.0)
  tx, schedule = ts.make_optimizer(opt, total_steps=6)
  step = _step_fn(tiny_model, tx, schedule, 1)
  state = _state(tiny_model, tx)
  batch = _batch()
  for i in range(4):
    new, metrics = step(state, batch)
    lr = float(metrics["lr"])
    assert lr == pytest.approx(float(schedule(i)), rel=1e-6)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new.params),
                                                            jax.tree.leaves(state.params)))
    assert moved == pytest.approx(lr, rel=1e-3, abs=1e-9), f"step {i}"
    state = new


# ----------------------------------------------------------------------------
# Weight decay mask.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decay_mask_excludes_norms_and_embedding(scan_layers):
  model = _model(_config(num_layers=2, scan_layers=scan_layers, qk_norm=True))
  params = nn.unbox(model.init(jax.random.key(0), model.example_batch(1, SEQ)))
  mask = ts._decay_mask(params)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  names = {jax.tree_util.keystr(path): bool(m) for path, m in flat}
  excluded = {n for n, m in names.items() if not m}
  included = {n for n, m in names.items() if m}
  assert excluded and included
  for name in excluded:
    assert "scale" in name or "embedding" in name, name
  for name in included:
    assert "kernel" in name, name
  assert all(not m for n, m in names.items() if "norm" in n)  # stacked [L, D] scales too
  assert not names["['embed']['embedding']"]


def test_weight_decay_shrinks_matrices_only(tiny_model):
  """Zero gradients: Adam's step is 0, so only the decoupled decay moves params (by a factor 1 - lr*wd)."""
  lr, wd = 0.1, 0.5
  tx, _ = ts.make_optimizer(_opt_config(lr=lr, warmup_steps=0, weight_decay=wd), total_steps=10)
  params = _state(tiny_model, tx).params
  opt_state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, opt_state, params)
  new = optax.apply_updates(params, updates)
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path)
    q = new
    for key in path:
      q = q[key.key]
    if "scale" in name or "embedding" in name:
      np.testing.assert_array_equal(np.asarray(q), np.asarray(p), err_msg=name)
    else:
      np.testing.assert_allclose(np.asarray(q), np.asarray(p) * (1 - lr * wd), rtol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------
# Losses and bits per byte.
# ----------------------------------------------------------------------------


def test_bits_per_byte_hand_computed():
  # Position 0: p(target) = 1/2; position 1: p(target) = 1/4; position 2 has weight 0 and a terrible logit.
  probs = np.array([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]])
  logits = np.log(probs)[None].astype(np.float32)
  logits[0, 2] = [1e4, 0.0, 0.0, 0.0]
  targets = jnp.array([[0, 1, 3]])
  weights = jnp.array([[1.0, 1.0, 0.0]])
  nll_sum, count = losses.weighted_nll(jnp.asarray(logits), targets, weights)
  assert float(count) == 2.0
  assert float(nll_sum) == pytest.approx(3 * math.log(2), rel=1e-6)  # -ln(1/2) - ln(1/4)
  bpb = losses.bits_per_byte(float(nll_sum), float(count))
  assert bpb == pytest.approx((math.log(2) + math.log(4)) / (2 * math.log(2)), rel=1e-6)
  assert bpb == pytest.approx(1.5, rel=1e-6)


def test_bits_per_byte_of_a_uniform_byte_model_is_8():
  n = 37
  assert losses.bits_per_byte(n * math.log(256), n) == pytest.approx(8.0, rel=1e-12)
  assert losses.bits_per_byte(0.0, 0.0) == 0.0  # no bytes: no division by zero


def test_weighted_nll_ignores_zero_weight_positions():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (2, 6))
  weights = np.array([[1, 1, 0, 1, 0, 0], [0.5, 1, 1, 0, 2, 0]], np.float32)
  nll_sum, count = losses.weighted_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -(np.take_along_axis(log_p, targets[..., None], -1)[..., 0] * weights).sum()
  assert float(nll_sum) == pytest.approx(float(expected), rel=1e-5)
  assert float(count) == pytest.approx(float(weights.sum()))
  # Anything at a zero-weight position (logits, targets) leaves the result unchanged.
  logits2, targets2 = logits.copy(), targets.copy()
  zero = weights == 0
  logits2[zero] = rng.normal(scale=50.0, size=(int(zero.sum()), 11))
  targets2[zero] = (targets2[zero] + 5) % 11
  nll2, count2 = losses.weighted_nll(jnp.asarray(logits2), jnp.asarray(targets2), jnp.asarray(weights))
  assert float(nll2) == pytest.approx(float(nll_sum), rel=1e-6)
  assert float(count2) == float(count)


# ----------------------------------------------------------------------------
# Training behaviour.
# ----------------------------------------------------------------------------


def test_train_steps_on_a_repeated_batch_reduce_the_loss(tiny_model):
  tx, schedule = ts.make_optimizer(_opt_config(lr=1e-2, warmup_steps=0), total_steps=100)
  step = _step_fn(tiny_model, tx, schedule, 1)
  state, batch = _state(tiny_model, tx), _batch()
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(state.step) == 8


def test_auto_compute_dtype_is_bf16_on_accelerators_and_amx_cpus_and_f32_elsewhere():
  assert runtime.auto_compute_dtype("tpu") == runtime.auto_compute_dtype("gpu") == "bfloat16"
  assert runtime.auto_compute_dtype("cpu", frozenset({"avx512f", "amx_tile", "amx_bf16"})) == "bfloat16"
  assert runtime.auto_compute_dtype("cpu", frozenset({"avx2", "fma"})) == "float32"
  assert runtime.auto_compute_dtype("cpu", frozenset()) == "float32"  # no /proc/cpuinfo (macOS)
  config = _config()
  config.train.compute_dtype = "auto"
  resolved = runtime.resolve_config(config)  # the choice is written back, so config.json records it
  assert resolved.train.compute_dtype == resolved.model.dtype == runtime.auto_compute_dtype()
  config.train.compute_dtype = "bf16"
  with pytest.raises(ConfigError, match="must be 'auto' or one of"):
    runtime.resolve_config(config)


def test_bf16_compute_trains_with_fp32_params():
  config = _config()
  config.train.compute_dtype = "bfloat16"
  resolved = runtime.resolve_config(config)
  assert resolved.model.dtype == "bfloat16"
  model = models.get_family(resolved.model)
  tx, schedule = ts.make_optimizer(_opt_config(lr=1e-2, warmup_steps=0), total_steps=100)
  state, batch = _state(model, tx), _batch()

  # The matmuls really run in bfloat16.
  jaxpr = str(jax.make_jaxpr(lambda p: model.loss(p, batch))(state.params))
  assert "bf16" in jaxpr

  # bf16 logits are close to the fp32 model's on the same params (the loss is computed in fp32).
  fp32_model = _model(_config())
  sums16 = ts.eval_step(state.params, batch, family=model)
  sums32 = ts.eval_step(state.params, batch, family=fp32_model)
  nll16, nll32, count = sums16["nll"], sums32["nll"], sums16["weight"]
  assert float(nll16 / count) == pytest.approx(float(nll32 / count), rel=2e-2)

  step = _step_fn(model, tx, schedule, 1)
  losses = []
  for _ in range(4):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    assert metrics["loss"].dtype == jnp.float32
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0]
  for leaf in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32, leaf.dtype
