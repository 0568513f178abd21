"""The shared token-mixer suite: every registered mixer (`models.mixer_names()`) runs every test here.

Adding a mixer means adding files (op, model file registered in `models/__init__.py`, config); the mixer
is picked up here automatically through the `mixer` parameter (tests/models/conftest.py). Mixer-specific
test options (a chunk or block size that fits T = 23) are a row of `model_testing.MIXER_TEST_OVERRIDES`.

Each mixer is checked inside a tiny 2-layer Transformer (d_model 32, 4 heads, T = 23, batch 2), in f32:
output shapes and finiteness, causality (exactly, in the model and through the mixer's own Jacobian),
segment isolation, decode == parallel forward (prefill, chunk, single tokens; and greedy `generate`),
that a few train steps lower the loss, and a bitwise checkpoint round trip.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from configs import base
from data import pipeline
from tests.models import model_testing as mt
from training import checkpoint as ckpt_lib

B, T = mt.BATCH, mt.SEQ_LEN
DECODE_ATOL = 1e-5  # f32 logits (of order 1): incremental decoding vs the parallel forward
SEGMENT_ATOL = 1e-5
TRAIN_STEPS = 10


@pytest.fixture(scope="module")
def setup(mixer):
  """Tiny model, decode model, params and inputs of one mixer (shared by the tests of the module)."""
  config = mt.tiny_model_config(mixer)
  model = models.get_model(config)
  return types.SimpleNamespace(
      mixer=mixer, config=config, model=model, decode_model=models.get_model(config, decode=True),
      params=mt.init_params(model), inputs=mt.random_ids(1, (B, T)))


@pytest.fixture(scope="module")
def trained(setup):
  """(TrainState, losses) after TRAIN_STEPS optimizer steps on one repeated batch."""
  tx, step = mt.train_functions(setup.model, TRAIN_STEPS)
  state = mt.init_state(setup.params, tx)
  batch = mt.lm_batch(setup.inputs)
  losses = []
  for _ in range(TRAIN_STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def test_forward_shapes_and_finite(setup):
  logits = mt.forward(setup.model, setup.params, setup.inputs)
  assert logits.shape == (B, T, setup.config.vocab_size)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert float(jnp.std(logits)) > 0


def test_causal_in_model(setup):
  """Changing inputs after position t leaves logits[:t + 1] bitwise unchanged (and changes later ones)."""
  base_logits = np.asarray(mt.forward(setup.model, setup.params, setup.inputs))
  for t in (0, 9, T - 2):
    changed = setup.inputs.copy()
    changed[:, t + 1:] = mt.random_ids(100 + t, (B, T - t - 1))
    logits = np.asarray(mt.forward(setup.model, setup.params, changed))
    np.testing.assert_array_equal(logits[:, :t + 1], base_logits[:, :t + 1],
                                  err_msg=f"logits up to position {t} depend on later inputs")
    assert np.abs(logits[:, t + 1:] - base_logits[:, t + 1:]).max() > 1e-3, "later logits ignore inputs"


def test_mixer_jacobian_is_causal_and_segment_isolated(mixer):
  """The mixer alone: d y[t] / d x[s] == 0 exactly for s > t (and across segments), nonzero otherwise."""
  config = mt.tiny_model_config(mixer)
  module = models.get_mixer(mixer)(config=config, layer_index=0, decode=False)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, T, config.d_model)), jnp.float32)
  variables = jax.jit(module.init)(mt.key(4), x)

  @jax.jit
  def influence(x, segment_ids, positions):
    """max over feature pairs of |d y[t] / d x[s]|: [T_out, T_in]."""
    jacobian = jax.jacrev(lambda x: module.apply(variables, x, segment_ids, positions)[0])(x)
    return jnp.max(jnp.abs(jacobian[:, :, 0]), axis=(1, 3))

  split = 10
  t_out, s_in = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
  for segment_ids, positions in ((None, None), mt.two_segments([split])):
    block = np.asarray(influence(x, segment_ids, positions))
    visible = s_in <= t_out
    if segment_ids is not None:
      visible &= (t_out < split) == (s_in < split)
    leaked = np.argwhere(~visible & (block != 0))
    assert leaked.size == 0, f"output t depends on input s > t or in another segment (t, s): {leaked[:8]}"
    assert np.all(block[visible] > 0), "an earlier position of the same segment has no influence"


def test_segment_isolation(setup):
  """Segment 1 ignores segment 2; segment 2's logits equal those of running it alone."""
  splits = (9, 14)
  segment_ids, positions = mt.two_segments(splits)
  base_logits = np.asarray(mt.forward(setup.model, setup.params, setup.inputs, segment_ids, positions))

  # Changing segment 2 cannot change segment 1 (and changing segment 1 cannot change segment 2).
  for changed_segment in (1, 2):
    changed = np.where(segment_ids == changed_segment,
                       mt.random_ids(7, (B, T)), setup.inputs)
    logits = np.asarray(mt.forward(setup.model, setup.params, changed, segment_ids, positions))
    kept = segment_ids != changed_segment
    np.testing.assert_allclose(logits[kept], base_logits[kept], rtol=0, atol=SEGMENT_ATOL,
                               err_msg=f"changing segment {changed_segment} changed the other one")

  # One segment with positions arange(T) is the same as passing neither.
  ones, arange = mt.two_segments((T, T))
  np.testing.assert_allclose(mt.forward(setup.model, setup.params, setup.inputs, ones, arange),
                             mt.forward(setup.model, setup.params, setup.inputs), rtol=0, atol=SEGMENT_ATOL)

  # Segment 2 alone, left-aligned in a length-T row (the filler after it cannot matter: causality).
  alone = np.zeros_like(setup.inputs)
  for b, s in enumerate(splits):
    alone[b, :T - s] = setup.inputs[b, s:]
  alone_logits = np.asarray(mt.forward(setup.model, setup.params, alone))
  for b, s in enumerate(splits):
    np.testing.assert_allclose(base_logits[b, s:], alone_logits[b, :T - s], rtol=0, atol=SEGMENT_ATOL,
                               err_msg=f"row {b}: segment 2 differs from running it alone")


def test_decode_matches_forward(setup):
  """Prefill, a chunk and single tokens through the cache reproduce the parallel forward's logits."""
  expected = mt.forward(setup.model, setup.params, setup.inputs)
  # A cache longer than the sequence also checks that unfilled cache slots are invisible.
  pieces = (7, 5) + (1,) * (T - 12)
  decoded = mt.decode_in_pieces(setup.decode_model, setup.params, setup.inputs, pieces, cache_len=T + 6)
  assert decoded.shape == expected.shape
  assert mt.max_abs_diff(decoded, expected) <= DECODE_ATOL, mt.max_abs_diff(decoded, expected)


def test_greedy_generate_matches_full_forwards(setup, trained):
  """`generate` (prefill + cached steps) == argmax continuation by repeated full forwards.

  Uses the params trained on `setup.inputs` so that the continuation depends on the context (an untrained
  tied-embedding model mostly repeats its last input token).
  """
  params = trained[0].params
  prompt_len, max_new = 6, 12
  prompt = setup.inputs[:, :prompt_len]
  generated = np.asarray(models.get_family(setup.config).generate(params, jnp.asarray(prompt),
                                                                  jax.random.key(0), max_new=max_new))
  assert generated.shape == (B, max_new)

  # Full forwards over a fixed-length buffer (positions after the current one cannot matter).
  buffer = np.zeros((B, T), np.int32)
  buffer[:, :prompt_len] = prompt
  for i in range(max_new):
    logits = np.asarray(mt.forward(setup.model, params, buffer))
    buffer[:, prompt_len + i] = np.argmax(logits[:, prompt_len + i - 1], axis=-1)
  np.testing.assert_array_equal(generated, buffer[:, prompt_len:prompt_len + max_new])
  assert any(len(set(row)) > 1 for row in generated.tolist()), f"a trivial continuation: {generated}"


def test_train_steps_lower_loss(trained):
  state, losses = trained
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(state.step) == TRAIN_STEPS


def test_checkpoint_round_trip(setup, trained, tmp_path):
  """A trained TrainState and the data iterator survive a Checkpointer save/restore bitwise."""
  text = tmp_path / "corpus.txt"
  text.write_bytes(np.random.default_rng(0).integers(32, 127, 4000, dtype=np.uint8).tobytes())
  data_config = base.get_config().data
  data_config.source, data_config.paths = "single_file", (str(text),)

  def make_iterator():
    return pipeline.make_train_iterator(data_config, seq_len=T, global_batch_size=B, seed=0)

  state = trained[0]
  data_iter = make_iterator()
  next(data_iter)  # the saved iterator state is mid-stream

  workdir = str(tmp_path / "run")
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=2, async_save=False)
  assert checkpointer.save(TRAIN_STEPS, state, data_iter, {"model": setup.config.to_dict()})
  checkpointer.close()
  expected_batch = next(data_iter)

  restorer = ckpt_lib.Checkpointer(workdir, read_only=True)
  assert restorer.latest_step() == TRAIN_STEPS
  restored_iter = make_iterator()
  abstract = ckpt_lib.abstract_like(state, jax.tree.map(lambda x: x.sharding, state))
  restored = restorer.restore(TRAIN_STEPS, abstract, restored_iter)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(restored)):
    name = jax.tree_util.keystr(path)
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
  params = restorer.restore_params(TRAIN_STEPS, abstract.params)
  jax.tree.map(np.testing.assert_array_equal, params, state.params)
  got_batch = next(restored_iter)
  for key, value in expected_batch.items():
    np.testing.assert_array_equal(got_batch[key], value, err_msg=key)
  restorer.close()


def test_mixed_with_softmax_layers(mixer):
  """A per-layer list [mixer, softmax, mixer] runs and decodes like its parallel forward."""
  if mixer == "softmax":
    pytest.skip("an all-softmax list is the plain model (lists are tested in test_transformer.py)")
  config = mt.tiny_model_config([mixer, "softmax", mixer], num_layers=3)
  model = models.get_model(config)
  params = mt.init_params(model)
  inputs = mt.random_ids(2, (B, T))
  expected = mt.forward(model, params, inputs)
  decoded = mt.decode_in_pieces(models.get_model(config, decode=True), params, inputs, (T - 1, 1),
                                cache_len=T)
  assert mt.max_abs_diff(decoded, expected) <= DECODE_ATOL
  assert set(params) >= {"layer_0", "layer_1", "layer_2"}
