"""Shared suite of the hierarchical byte LMs (models/hierarchical.py): every config in CONFIGS is tested
for exact causality, document isolation, overflow, text without spaces and generation, with no per-config
test code."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from configs import dynamic_pooling, hat, hourglass, spacebyte
from data import bytes as byte_ids

CONFIGS = {
    "hourglass": (hourglass, {}),
    "dynamic_pooling_whitespace": (dynamic_pooling, {}),
    "dynamic_pooling_spacelike": (dynamic_pooling, {"boundaries": "spacelike"}),
    "dynamic_pooling_last_gla_global": (dynamic_pooling, {"pooling": "last", "global_mixer": "gla"}),
    "spacebyte": (spacebyte, {"global_d_model": 64, "global_num_heads": 2}),
    "hat_words": (hat, {}),
}
TEXT = "def f(x):  return x + 1\nclass A: pass  # 中文 ok"


def tiny(name, **extra):
  module, overrides = CONFIGS[name]
  config = module.get_config().model
  config.d_model, config.num_heads = 32, 2
  config.attention_impl = "reference"
  config.dtype = "float32"
  h = config.hierarchical
  h.encoder_layers, h.global_layers, h.decoder_layers = 1, 1, 1
  if h.boundaries != "fixed":
    h.expected_patch = 2
  for k, v in {**overrides, **extra}.items():
    h[k] = v
  return config


def setup(name, seq_len=32, **extra):
  family = models.get_family(tiny(name, **extra))
  params = nn.unbox(family.init(jax.random.key(0), family.example_batch(2, seq_len)))
  apply = jax.jit(lambda ids, seg=None: family.module().apply({"params": params}, ids, seg))
  return family, params, apply


def text_ids(text, length):
  ids = np.zeros(length, np.int32)
  enc = byte_ids.encode(text)[:length]
  ids[:len(enc)] = enc
  return ids


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_never_see_later_bytes(name):
  """Changing any byte after t (boundaries included) leaves logits[<= t] exactly as they were."""
  _, _, apply = setup(name)
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
  ids = jnp.asarray(np.stack([crowded, plain]))
  batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1), "weights": jnp.ones(ids.shape, jnp.float32),
           "segment_ids": jnp.ones(ids.shape, jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(32), ids.shape)}
  objective, sums = family.loss(params, batch, train=False)
  assert np.isfinite(float(objective))
  assert float(sums["overflow_bytes"]) > 0
  assert float(sums["weight"]) + float(sums["overflow_bytes"]) == 64.0  # every byte is scored or counted
  summary = family.summarize(sums)
  assert float(summary["bytes_per_patch"]) > 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_generate_continues_the_greedy_forward(name):
  family, params, apply = setup(name)
  prompt = jnp.asarray(text_ids("x = 1 ", 6))[None]
  out = np.asarray(family.generate(params, prompt, jax.random.key(0), max_new=4))
  assert out.shape == (1, 4)
  seq = np.concatenate([np.asarray(prompt), out], axis=1)
  logits = np.asarray(apply(jnp.asarray(np.pad(seq, ((0, 0), (0, 32 - seq.shape[1]))))))
  for i in range(4):
    assert out[0, i] == logits[0, 5 + i].argmax()


def test_bad_options_are_one_clear_error():
  with pytest.raises(ValueError, match="unknown model.hierarchical.boundaries"):
    models.get_family(tiny("hourglass", boundaries="entropyy"))
  with pytest.raises(ValueError, match="unknown model.hierarchical.pooling"):
    models.get_family(tiny("hourglass", pooling="max"))
  with pytest.raises(ValueError, match="global_mixer: unknown model.mixer"):
    models.get_family(tiny("hourglass", global_mixer="nope"))
