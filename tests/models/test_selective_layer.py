"""Leviathan selective-attention layer tests (models/selective.py, specs/attention_variants.md §4B); the
shared mixer suite (tests/models/test_mixers.py) covers shapes, causality, segments, decoding and training.

- The layer equals its spec written out on the reference op (projections, RoPE, GQA, packed documents
  with padding, BOS = each document's first token).
- Decoding carries the selection column sums in the cache: after any split into pieces they equal the
  parallel forward's final F, and unfilled slots stay 0.
- Context pruning: a huge threshold is a no-op; with a small one decoding still equals the (pruned)
  forward, which differs from the unpruned one.
- Memory loss: the sown value follows the documented formula, and the train step adds it ("aux_loss").
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from configs import selective as selective_config
from models import layers
from models import registry
from models import selective as selective_model
from ops.selective import selective_attention
from tests.models import model_testing as mt
from training import train_step as ts

B, T, D = 2, 13, 32
NUM_HEADS, NUM_KV_HEADS = 4, 2


def _config(**options):
  overrides = {f"selective.{name}": value for name, value in options.items()}
  return mt.tiny_model_config("selective", num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, **overrides)


def _module(decode=False, **options):
  return selective_model.SelectiveAttention(config=_config(**options), decode=decode)


def _x(seed=0):
  # Scale 3 makes the selection logits O(1), so F visibly changes the attention.
  return jnp.asarray(3 * np.random.default_rng(seed).normal(size=(B, T, D)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _params():
  return nn.unbox(jax.jit(_module().init)(mt.key(1), _x())["params"])


@functools.partial(jax.jit, static_argnames="module")
def _apply(module, params, x, segment_ids=None, positions=None):
  return module.apply({"params": params}, x, segment_ids, positions, mutable=["losses"])


def _packed_segments():
  """Row 0: one document; row 1: documents [0, 5) and [5, 11), then 2 padding tokens (segment 0)."""
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[1, 5:], segment_ids[1, 11:] = 2, 0
  positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  positions[1, 5:11] -= 5
  positions[1, 11:] -= 11
  return segment_ids, positions


def _reference_layer(params, x, segment_ids, positions, **op_options):
  """Spec §4B written out: projections, RoPE, the reference op with BOS = within-document position 0."""
  proj = lambda name: jnp.einsum("btd,dhk->bthk", x, params[name]["kernel"])
  q = layers.rope(proj("query"), positions)
  k = layers.rope(proj("key"), positions)
  o, columns, *masked = selective_attention(q, k, proj("value"), segment_ids=segment_ids,
                                            bos_mask=positions == 0, impl="reference", **op_options)
  return jnp.einsum("bthk,hkd->btd", o, params["out"]["kernel"]), columns, masked


def test_document_starts():
  segment_ids, positions = _packed_segments()
  starts = np.asarray(selective_model.document_starts(jnp.asarray(positions), jnp.asarray(segment_ids)))
  np.testing.assert_array_equal(np.argwhere(starts), [[0, 0], [1, 0], [1, 5], [1, 11]])
  # Without positions the model uses arange; segment changes still start documents.
  arange = jnp.broadcast_to(jnp.arange(T), (B, T))
  np.testing.assert_array_equal(selective_model.document_starts(arange, jnp.asarray(segment_ids)), starts)


def test_layer_matches_reference_with_packed_documents():
  segment_ids, positions = _packed_segments()
  x = _x(2)
  y, _ = _apply(_module(), _params(), x, segment_ids, positions)
  want, _, _ = _reference_layer(_params(), x, jnp.asarray(segment_ids), jnp.asarray(positions))
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Selection matters here: the accumulated F reaches O(1) and more.
  _, columns, _ = _reference_layer(_params(), x, jnp.asarray(segment_ids), jnp.asarray(positions))
  assert float(jnp.max(columns)) > 1.0


def test_decode_column_sums_equal_forward():
  x = _x(3)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  want_y, want_columns, _ = _reference_layer(_params(), x, None, positions)
  cache_len = T + 3
  y, cache = mt.decode_mixer_in_pieces(_module(decode=True), _params(), x, (5, 4, 1, 1, 1, 1),
                                       cache_len)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=0, atol=1e-5)
  columns = np.asarray(cache["column_sums"])
  assert columns.shape == (B, cache_len) and int(cache["index"]) == T
  np.testing.assert_allclose(columns[:, :T], np.asarray(want_columns), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(columns[:, T:], 0.0)  # unfilled slots
  np.testing.assert_array_equal(columns[:, 0], 0.0)  # BOS is never selected
  assert columns.max() > 1.0


def test_pruning_in_decoding():
  x = _x(4)
  pieces, cache_len = (6,) + (1,) * (T - 6), T
  y_off, _ = mt.decode_mixer_in_pieces(_module(decode=True), _params(), x, pieces, cache_len)
  y_huge, _ = mt.decode_mixer_in_pieces(_module(decode=True, prune_threshold=1e30), _params(), x, pieces,
                                        cache_len)
  np.testing.assert_array_equal(np.asarray(y_huge), np.asarray(y_off))
  y_pruned, _ = mt.decode_mixer_in_pieces(_module(decode=True, prune_threshold=0.5), _params(), x, pieces,
                                          cache_len)
  forward_pruned, _ = _apply(_module(prune_threshold=0.5), _params(), x)
  np.testing.assert_allclose(np.asarray(y_pruned), np.asarray(forward_pruned), rtol=0, atol=1e-5)
  assert float(jnp.max(jnp.abs(y_pruned - y_off))) > 1e-3


def test_memory_loss_is_sown_as_documented():
  segment_ids, positions = _packed_segments()
  x, weight = _x(5), 0.1
  _, sown = _apply(_module(memory_loss_weight=weight, memory_tau=0.7), _params(), x, segment_ids, positions)
  (value,) = sown["losses"]["aux_loss"]
  _, _, (masked,) = _reference_layer(_params(), x, jnp.asarray(segment_ids), jnp.asarray(positions),
                                     memory_tau=0.7)
  live = positions + 1 - np.asarray(masked, np.float64)  # M_i
  nonpad = segment_ids != 0
  per_row = np.where(nonpad, live, 0).max(axis=1) / nonpad.sum(axis=1)
  num_layers = _config().num_layers
  np.testing.assert_allclose(float(value), weight * per_row.mean() / num_layers, rtol=1e-5)
  assert np.asarray(masked).max() > 0.5  # some keys are (softly) masked
  # Off by default.
  _, sown = _apply(_module(), _params(), x, segment_ids, positions)
  assert not sown


def test_train_step_adds_the_sown_memory_loss():
  model = models.get_model(mt.tiny_model_config("selective", **{"selective.memory_loss_weight": 0.1}))
  params = mt.init_params(model)
  batch = mt.lm_batch(mt.random_ids(8, (B, mt.SEQ_LEN)))
  _, metrics = mt.train_functions(model, 10)[1](mt.init_state(params, mt.train_functions(model, 10)[0]),
                                                batch)
  _, sown = model.apply({"params": params}, batch["inputs"], mutable=["losses"])
  aux = sum(float(v[0]) for layer in sown["losses"].values() for v in layer["mixer"].values())
  ce = ts.eval_step(params, batch, family=models.get_family(model.config))
  assert aux > 0 and float(metrics["aux_loss"]) == pytest.approx(aux, rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(float(ce["nll"] / ce["weight"]) + aux, rel=1e-5)
  # A model that sows nothing reports no aux_loss.
  plain = models.get_model(mt.tiny_model_config("selective"))
  _, plain_metrics = mt.train_functions(plain, 10)[1](mt.init_state(params, mt.train_functions(plain, 10)[0]),
                                                      batch)
  assert "aux_loss" not in plain_metrics


def test_memory_loss_survives_scan_layers():
  """With scan_layers the per-layer sown losses come back stacked, summing to the unrolled total."""
  options = {"selective.memory_loss_weight": 0.1}
  unrolled = models.get_model(mt.tiny_model_config("selective", **options))
  scanned = models.get_model(mt.tiny_model_config("selective", scan_layers=True, **options))
  params = mt.init_params(unrolled)
  stacked = {k: v for k, v in params.items() if not k.startswith("layer_")}
  stacked["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), params["layer_0"], params["layer_1"])
  inputs = mt.random_ids(8, (B, mt.SEQ_LEN))
  totals = []
  for model, p in ((unrolled, params), (scanned, stacked)):
    _, sown = model.apply({"params": p}, inputs, mutable=["losses"])
    totals.append(sum(float(jnp.sum(x)) for x in jax.tree.leaves(sown)))
  assert totals[0] > 0 and totals[1] == pytest.approx(totals[0], rel=1e-5)


@pytest.mark.slow
def test_memory_loss_with_gradient_accumulation():
  model = models.get_model(mt.tiny_model_config("selective", **{"selective.memory_loss_weight": 0.1}))
  params = mt.init_params(model)
  tx, _ = mt.train_functions(model, 10)
  schedule = ts.learning_rate_schedule(mt.optimizer_config(), 10)
  batch = mt.lm_batch(mt.random_ids(9, (4, mt.SEQ_LEN)))
  results = [jax.jit(functools.partial(ts.train_step, family=models.get_family(model.config), tx=tx,
                                       schedule=schedule,
                                       grad_accum=n))(mt.init_state(params, tx), batch)[1]
             for n in (1, 2)]
  for key in ("loss", "aux_loss", "grad_norm"):
    assert float(results[1][key]) == pytest.approx(float(results[0][key]), rel=1e-4), key


def test_configs_and_bad_options():
  config = selective_config.get_config()
  assert config.model.mixer == "selective"
  assert selective_model.selective_options(models.freeze(config.model)) == registry.plain_defaults(
      selective_model.DEFAULTS)
  with pytest.raises(ValueError, match="unknown model.selective option"):
    _module(threshold=1.0).init(mt.key(0), _x())
  with pytest.raises(ValueError, match="memory_tau > 0"):
    _module(memory_tau=0.0).init(mt.key(0), _x())
