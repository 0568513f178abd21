"""Shared suite of the hierarchical byte LMs (models/hierarchical.py): every config in CONFIGS is tested
for exact causality, document isolation, overflow, text without spaces and generation, with no per-config
test code. The trained boundary sources ("learned", "entropy", TRAINED) are also checked for causality in
train mode (fixed Gumbel noise), for a straight-through gradient that never sees later bytes, for their
boundary loss against the spec's formulas and for what trains their predictor."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import decoding
from models import hierarchical
from configs import byte2word, dynamic_pooling, hat, hourglass, lyt, megabyte, spacebyte, toucan
from data import bytes as byte_ids
from ops import pooling

CONFIGS = {
    "hourglass": (hourglass, {}),
    "hourglass_linear": (hourglass, {"pooling": "concat", "upsampling": "linear"}),
    "megabyte": (megabyte, {"global_d_model": 128, "global_num_heads": 2}),
    "lyt": (lyt, {}),
    "byte2word": (byte2word, {}),
    "toucan_entropy": (toucan, {"boundaries": "entropy"}),
    "toucan_learned": (toucan, {"boundaries": "learned"}),
    "toucan_whitespace": (toucan, {"boundaries": "whitespace"}),
    "dynamic_pooling_whitespace": (dynamic_pooling, {}),
    "dynamic_pooling_spacelike": (dynamic_pooling, {"boundaries": "spacelike"}),
    "dynamic_pooling_last_gla_global": (dynamic_pooling, {"pooling": "last", "global_mixer": "gla"}),
    "spacebyte": (spacebyte, {"global_d_model": 64, "global_num_heads": 2}),
    "hat_words": (hat, {}),
    "dynamic_pooling_learned": (dynamic_pooling, {"boundaries": "learned"}),
    "dynamic_pooling_entropy": (dynamic_pooling, {"boundaries": "entropy"}),
}
TRAINED = sorted(n for n, (_, o) in CONFIGS.items() if o.get("boundaries") in hierarchical.TRAINED_SOURCES)
NOISE = jax.random.key(7)  # the Gumbel noise of train-mode applies: the same key for every call
TEXT = "def f(x):  return x + 1\nclass A: pass  # 中文 ok"


def tiny(name, **extra):
  module, overrides = CONFIGS[name]
  config = module.get_config().model
  config.d_model, config.num_heads = 32, 2
  config.attention_impl = "reference"
  config.dtype = "float32"
  h = config.hierarchical
  h.encoder_layers, h.global_layers, h.decoder_layers = min(h.encoder_layers, 1), 1, 1
  if h.boundaries != "fixed":
    h.expected_patch = 2
  for k, v in {**overrides, **extra}.items():
    h[k] = v
  return config


def setup(name, seq_len=32, train=False, **extra):
  """(family, params, apply); train: apply runs the train-mode module with the fixed noise key NOISE."""
  family = models.get_family(tiny(name, **extra))
  params = nn.unbox(family.init(jax.random.key(0), family.example_batch(2, seq_len)))
  rngs = {hierarchical.BOUNDARY_RNG: NOISE} if train else {}
  apply = jax.jit(lambda ids, seg=None: family.module(train=train).apply({"params": params}, ids, seg,
                                                                         rngs=rngs))
  return family, params, apply


def text_ids(text, length):
  ids = np.zeros(length, np.int32)
  enc = byte_ids.encode(text)[:length]
  ids[:len(enc)] = enc
  return ids


def causal_batch(ids):
  """A causal_lm batch of one document per row, every target weighted."""
  ids = jnp.asarray(ids)
  return {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1), "weights": jnp.ones(ids.shape, jnp.float32),
          "segment_ids": jnp.ones(ids.shape, jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)}


@pytest.mark.parametrize("name, train", [(n, False) for n in sorted(CONFIGS)] + [(n, True) for n in TRAINED])
def test_logits_never_see_later_bytes(name, train):
  """Changing any byte after t (boundaries included) leaves logits[<= t] exactly as they were; trained
  sources also in train mode (Gumbel-sampled boundaries, the same noise for every call)."""
  _, _, apply = setup(name, train=train)
  rng = np.random.default_rng(1)
  ids = np.stack([text_ids(TEXT, 32), rng.integers(3, 259, 32)]).astype(np.int32)
  base = np.asarray(apply(jnp.asarray(ids)))
  for t in range(31):
    changed = ids.copy()
    changed[:, t + 1:] = np.where(rng.random((2, 31 - t)) < 0.5, byte_ids.encode(" ")[0],
                                  rng.integers(3, 259, (2, 31 - t)))
    out = np.asarray(apply(jnp.asarray(changed)))
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=1e-6, err_msg=f"t={t}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_documents_do_not_see_each_other(name):
  _, _, apply = setup(name)
  first, second = text_ids("ab cd ef gh", 12), text_ids("ij kl mn op qr st", 20)
  first[11] = byte_ids.EOS_ID
  ids = np.concatenate([first, second])[None]
  seg = np.concatenate([np.ones(12, np.int32), np.full(20, 2, np.int32)])[None]
  base = np.asarray(apply(jnp.asarray(ids), jnp.asarray(seg)))
  other = ids.copy()
  other[0, :11] = byte_ids.encode("zz yy xx ww")
  out = np.asarray(apply(jnp.asarray(other), jnp.asarray(seg)))
  np.testing.assert_allclose(out[0, 12:], base[0, 12:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_overflow_is_masked_and_counted_and_no_boundaries_works(name):
  family, params, _ = setup(name, capacity=3)
  crowded = text_ids("a b c d e f g h i j k l m n o p", 32)  # more boundaries than 2 groups
  plain = text_ids("abcdefghijklmnopqrstuvwxyzabcdef", 32)  # no spaces at all
  objective, sums = family.loss(params, causal_batch(np.stack([crowded, plain])), train=False)
  assert np.isfinite(float(objective))
  assert float(sums["overflow_bytes"]) > 0
  assert float(sums["weight"]) + float(sums["overflow_bytes"]) == 64.0  # every byte is scored or counted
  summary = family.summarize(sums)
  assert float(summary["bytes_per_patch"]) > 0


TOUCAN = sorted(n for n in CONFIGS if n.startswith("toucan"))


# One config per boundary source and layout in the default run (the decode tests cover every config's
# step); the rest with --runslow. Toucan: test_toucan_generation_steps_the_global_stack_once_per_eot.
GENERATE_DEFAULT = ("hourglass", "dynamic_pooling_whitespace", "megabyte", "hat_words", "dynamic_pooling_learned")


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in GENERATE_DEFAULT else pytest.mark.slow)
                                  for n in sorted(set(CONFIGS) - set(TOUCAN))])
def test_generate_continues_the_greedy_forward(name):
  family, params, apply = setup(name)
  prompt = jnp.asarray(text_ids("x = 1 ", 6))[None]
  out = np.asarray(family.generate(params, prompt, jax.random.key(0), max_new=4))
  assert out.shape == (1, 4)
  seq = np.concatenate([np.asarray(prompt), out], axis=1)
  logits = np.asarray(apply(jnp.asarray(np.pad(seq, ((0, 0), (0, 32 - seq.shape[1]))))))
  for i in range(4):
    assert out[0, i] == logits[0, 5 + i].argmax()


def _perturbed_after(ids, t, rng):
  changed = ids.copy()
  changed[:, t + 1:] = rng.integers(3, 259, changed[:, t + 1:].shape)
  return changed


def test_straight_through_gradient_never_sees_later_bytes():
  """The "learned" source in train mode: the parameter gradient of logits[:, <= t] (the straight-through path into the
  predictor included) is the same whatever bytes follow t."""
  family, params, _ = setup("dynamic_pooling_learned")
  module = family.module(train=True)
  rng = np.random.default_rng(2)
  ids = np.stack([text_ids(TEXT, 32), rng.integers(3, 259, 32)]).astype(np.int32)
  cot = jnp.asarray(rng.normal(size=(2, 32, 259)), jnp.float32)

  @jax.jit
  def grads(ids, t):
    def f(p):
      logits = module.apply({"params": p}, ids, rngs={hierarchical.BOUNDARY_RNG: NOISE})
      return jnp.sum(jnp.where(jnp.arange(32)[None, :, None] <= t, logits * cot, 0.0))
    return jax.grad(f)(params)

  for t in (5, 13, 24):
    base = grads(jnp.asarray(ids), t)
    assert float(jnp.abs(base["boundary_predictor"]["wo"]["kernel"]).sum()) > 0
    out = grads(jnp.asarray(_perturbed_after(ids, t, rng)), t)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"t={t}"),
                 base, out)


@pytest.mark.parametrize("name", TRAINED)
def test_boundary_loss_is_the_spec_formula_and_joins_the_objective(name):
  """The family's "boundary_loss" is, recomputed from the captured predictor logits z and the model's
  logits: "learned" -> mean over rows of -log Binomial(sum_t b_t; T, 0.2) / T with b = 1[sigmoid(z) > 0.5]
  (evaluation); "entropy" -> mean BCE(z, spikes of H(logits)) over the bytes the predictor decides. It is
  added to aux_loss and the objective (times the target count) and summarized as a per-target mean."""
  family, params, _ = setup(name)
  ids = np.stack([text_ids(TEXT, 32), np.random.default_rng(3).integers(3, 259, 32)]).astype(np.int32)
  ids[0, 20] = byte_ids.EOS_ID
  batch = causal_batch(ids)
  objective, sums = family.loss(params, batch, train=False)
  (logits, aux), state = hierarchical.HierarchicalLM(family.config, with_aux=True).apply(
      {"params": params}, batch["inputs"], capture_intermediates=lambda m, _: isinstance(
          m, hierarchical.BoundaryPredictor), mutable=["intermediates"])
  z = np.asarray(state["intermediates"]["boundary_predictor"]["__call__"][0], np.float64)
  hard = (1 / (1 + np.exp(-z)) > 0.5) | (ids == byte_ids.EOS_ID)
  if name.endswith("learned"):
    n = 32
    want = np.mean([-(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(0.2)
                      + (n - k) * math.log(0.8)) / n for k in hard.sum(axis=1)])
  else:
    lg = np.asarray(logits, np.float64)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    h = -np.sum(p * np.log(p), axis=-1)
    spikes = np.ones(h.shape, bool)
    for i in (1, 2):
      spikes[:, i:] &= h[:, i:] > h[:, :-i]
    bce = np.logaddexp(0, z) - spikes * z
    want = bce[ids != byte_ids.EOS_ID].mean()
  np.testing.assert_allclose(float(aux["boundary_loss"]), want, rtol=1e-4)
  weight = float(sums["weight"])
  np.testing.assert_allclose(float(sums["boundary_loss"]), want * weight, rtol=1e-4)
  np.testing.assert_allclose(float(sums["aux_loss"]), float(sums["boundary_loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(objective), float(sums["nll"]) + float(sums["boundary_loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(family.summarize(sums)["boundary_loss"]), want, rtol=1e-4)


@pytest.mark.parametrize("name", TRAINED)
def test_what_trains_the_predictor(name):
  """The "learned" source: the LM loss alone reaches the predictor (straight-through pooling) and training samples
  other boundaries than evaluation; "entropy": only the BCE does (its boundaries are hard), and train and
  evaluation forwards are the same."""
  family, params, _ = setup(name)
  batch = causal_batch(np.stack([text_ids(TEXT, 32), text_ids("abc def ghi jkl mno pqr stu vwx", 32)]))

  def nll(p, train):
    return family.loss(p, batch, rng=NOISE, train=train)[1]["nll"]

  lm_grad = jax.grad(nll)(params, True)["boundary_predictor"]
  total = jax.grad(lambda p: family.loss(p, batch, rng=NOISE, train=True)[0])(params)["boundary_predictor"]
  lm_norm = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(lm_grad))
  assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(total)) > 0
  sums_train = family.loss(params, batch, rng=NOISE, train=True)[1]
  sums_eval = family.loss(params, batch, train=False)[1]
  if name.endswith("learned"):
    assert lm_norm > 0
    assert float(sums_train["nll"]) != float(sums_eval["nll"])
    other = family.loss(params, batch, rng=jax.random.key(8), train=True)[1]
    assert float(other["nll"]) != float(sums_train["nll"])  # the noise comes from rng
  else:
    assert lm_norm == 0
    np.testing.assert_allclose(float(sums_train["nll"]), float(sums_eval["nll"]), rtol=1e-6)


def test_bad_options_are_one_clear_error():
  with pytest.raises(ValueError, match="unknown model.hierarchical.boundaries"):
    models.get_family(tiny("hourglass", boundaries="entropyy"))
  with pytest.raises(ValueError, match="unknown model.hierarchical.pooling"):
    models.get_family(tiny("hourglass", pooling="max"))
  with pytest.raises(ValueError, match="global_mixer: unknown model.mixer"):
    models.get_family(tiny("hourglass", global_mixer="nope"))
  for option, value in (("capacity", 1), ("capacity", -3), ("expected_patch", 0)):
    with pytest.raises(ValueError, match=f"model.hierarchical.{option}"):
      models.get_family(tiny("hourglass", **{option: value}))
  with pytest.raises(ValueError, match="need model.hierarchical.width > 0"):
    models.get_family(tiny("dynamic_pooling_whitespace", pooling="concat"))
  with pytest.raises(ValueError, match="end_of_token needs model.vocab_size > 259"):
    models.get_family(tiny("dynamic_pooling_whitespace", end_of_token=True))
  for option, value in (("temperature", 0.0), ("prior", 1.0), ("spikes_left", 0)):
    with pytest.raises(ValueError, match=f"model.hierarchical.{option}"):
      models.get_family(tiny("dynamic_pooling_learned", **{option: value}))


# Incremental decoding (HierarchicalLM decode step) against the parallel forward: one config per boundary
# source and the patch-scoped / width-based layouts in the default run, the rest with --runslow.
DECODE_DEFAULT = ("hourglass", "dynamic_pooling_whitespace", "spacebyte", "hat_words", "megabyte",
                  "dynamic_pooling_learned", "dynamic_pooling_entropy", "toucan_entropy")


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in DECODE_DEFAULT else pytest.mark.slow)
                                  for n in sorted(set(CONFIGS) - set(TOUCAN))])
def test_incremental_decoding_reproduces_the_parallel_forward(name):
  """Feeding the bytes one at a time through the decode step (KV caches in the byte layers, the global
  stack stepped once per completed slot) gives the parallel forward's logits within 1e-5, and the trained
  sources decide the same boundaries; every slot was processed exactly once."""
  family, params, apply = setup(name)
  ids = text_ids(TEXT, 32)[None]
  model = family.module(decode=True)
  cache = decoding.init_cache(model, 1, 32)

  @jax.jit
  def run(cache, ids):
    def step(cache, token):
      logits, mutated = model.apply({"params": params, "cache": cache}, token[None, None], mutable=["cache"])
      return mutated["cache"], logits[0, 0]
    return jax.lax.scan(step, cache, ids)

  cache, logits = run(cache, jnp.asarray(ids[0]))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(apply(jnp.asarray(ids)))[0], atol=1e-5, rtol=1e-5)
  opts = hierarchical.options(family.config)
  if name in TRAINED:
    _, state = hierarchical.HierarchicalLM(family.config).apply(
        {"params": params}, jnp.asarray(ids), capture_intermediates=lambda m, _: isinstance(
            m, hierarchical.BoundaryPredictor), mutable=["intermediates"])
    z = np.asarray(state["intermediates"]["boundary_predictor"]["__call__"][0])
    ends, known = jnp.asarray((z > 0) | (ids == byte_ids.EOS_ID)), None
    np.testing.assert_array_equal(np.asarray(cache["ends"]), np.asarray(ends))
  else:
    ends, known = hierarchical.boundaries(jnp.asarray(ids), opts)
  groups = pooling.group_ids(ends, hierarchical.capacity(opts, 32), known=known,
                             rule="inclusive" if known is None else "exclusive")
  read_slots = int(jnp.minimum(groups.reads, groups.capacity - 1).max())
  assert int(cache["slots_done"]) == 1 + read_slots  # the null slot and every slot some byte reads, once


def test_generation_is_incremental_and_rows_are_independent():
  """Two prompts generate through the vmapped decode step; each row equals its own single-row run."""
  family, params, _ = setup("hourglass")
  assert family.incremental()
  prompts = jnp.asarray(np.stack([text_ids("x = 1 ", 6), text_ids("def f", 6)]))
  both = np.asarray(family.generate(params, prompts, jax.random.key(0), max_new=5))
  for r in range(2):
    alone = np.asarray(family.generate(params, prompts[r:r + 1], jax.random.key(0), max_new=5))
    np.testing.assert_array_equal(both[r], alone[0])
  gla_bytes = tiny("lyt")
  gla_bytes.mixer = "gla"  # patch-scoped byte layers of a mixer with absolute state: recompute instead
  assert not models.get_family(gla_bytes).incremental()


def test_word_boundaries_on_synthetic_data_are_one_clear_error():
  """hat_words (and the other text rules) on data.source=mqar: one ConfigError sentence before any work;
  fixed boundaries train on it."""
  from training import runtime  # noqa: PLC0415
  config = hat.get_config()
  config.data.source = "mqar"
  with pytest.raises(runtime.ConfigError, match="hat_words.*synthetic id stream without word boundaries"):
    runtime.family(config)
  config.model.hierarchical.boundaries = "fixed"
  runtime.family(config)


def _step_fn(family, params):
  model = family.module(decode=True)

  @jax.jit
  def step(cache, token):
    logits, mutated = model.apply({"params": params, "cache": cache}, token[None, None], mutable=["cache"])
    return mutated["cache"], logits[0, 0]
  return model, step


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in DECODE_DEFAULT else pytest.mark.slow)
                                  for n in TOUCAN])
def test_toucan_decoding_reproduces_the_expanded_forward(name):
  """Feeding the expanded stream (bytes, and EOT after each stored boundary) one token at a time gives the
  parallel forward's expanded logits within 1e-5; each byte's proposed boundary is the parallel one; the
  global stack stepped once per EOT (and once for the null slot)."""
  family, params, _ = setup(name)
  ids = text_ids(TEXT, 32)[None]
  logits, aux = hierarchical.HierarchicalLM(family.config, with_aux=True).apply({"params": params},
                                                                                jnp.asarray(ids))
  layout = aux["layout"]
  tokens = np.asarray(pooling.expand_layout(layout, jnp.asarray(ids), jnp.full((1, 32), hierarchical.EOT_ID),
                                            -1))[0]
  tokens = tokens[tokens >= 0]
  model, step = _step_fn(family, params)
  cache = decoding.init_cache(model, 1, 32)
  outs, proposed = [], []
  for token in tokens:
    cache, out = step(cache, jnp.asarray(token))
    outs.append(np.asarray(out))
    if token != hierarchical.EOT_ID:
      proposed.append(bool(cache["proposed_end"][0]))
  np.testing.assert_allclose(np.stack(outs), np.asarray(aux["expanded_logits"])[0, :len(tokens)], atol=1e-5,
                             rtol=1e-5)
  has_eot = np.asarray(layout.has_eot)[0]
  np.testing.assert_array_equal(np.asarray(proposed)[has_eot], True)  # every EOT was proposed there
  assert int(cache["slots_done"]) == 1 + int(has_eot.sum())


def test_toucan_generation_steps_the_global_stack_once_per_eot():
  """family.generate (greedy) equals a hand-written loop over the decode step: prompt bytes each followed by
  EOT where proposed, then the argmax token fed back until 8 bytes; the global stack ran once per EOT."""
  family, params, _ = setup("toucan_whitespace")
  prompt = text_ids("x = 1 y", 7)
  out = np.asarray(family.generate(params, jnp.asarray(prompt)[None], jax.random.key(0), max_new=8))[0]
  model, step = _step_fn(family, params)
  cache = decoding.init_cache(model, 1, 7 + 8)
  eots = 0
  for byte in prompt:
    cache, logits = step(cache, jnp.asarray(byte))
    if bool(cache["proposed_end"][0]):
      cache, logits = step(cache, jnp.asarray(hierarchical.EOT_ID))
      eots += 1
  emitted = []
  while len(emitted) < 8:
    token = int(np.argmax(np.asarray(logits)))
    if token == hierarchical.EOT_ID:
      eots += 1
    else:
      emitted.append(token)
    cache, logits = step(cache, jnp.asarray(token))
  np.testing.assert_array_equal(out, emitted)
  assert eots >= 2 and int(cache["slots_done"]) == 1 + eots  # the prompt's spaces: global steps per EOT only

