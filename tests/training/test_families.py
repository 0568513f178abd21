"""The model-family interface (models/family.py): a family the loop has never seen trains and evaluates.

`_Seq2SeqDouble` is a test double of an encoder-decoder: the first half of each causal_lm window is its
encoder input (pooled bidirectionally), the second half its decoder sequence, with its own loss, an
auxiliary loss term and its own generation. `training.loop.run` and `training.evaluation.evaluate` drive it
unchanged, which is the point: a new family is new files, not edits to training/.
"""

import glob
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import models
from configs import tiny
from models import decoding
from models.family import ModelFamily, register_family
from ops import losses
from training import evaluation, loop
from training.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, ROWS, EOS = 259, 384, 1


def _init(*names):
  return nn.with_logical_partitioning(nn.initializers.normal(0.02), names)


class _Seq2SeqModule(nn.Module):
  """(encoder ids [B, S], decoder ids [B, T]) -> (logits [B, T, 259], encoder state [B, 1, D])."""
  d_model: int

  @nn.compact
  def __call__(self, encoder_ids, decoder_ids):
    embed = nn.Embed(ROWS, self.d_model, embedding_init=_init("vocab", "embed"), name="embed")
    context = nn.Dense(self.d_model, kernel_init=_init("embed", "mlp"), name="encoder")(
        embed(encoder_ids).mean(axis=1, keepdims=True))  # bidirectional: every encoder position
    h = embed(decoder_ids) + context
    h = jnp.cumsum(h, axis=1) / jnp.arange(1, h.shape[1] + 1)[None, :, None]  # causal mixing
    h = nn.Dense(self.d_model, kernel_init=_init("mlp", "embed"), name="decoder")(jax.nn.gelu(h))
    return embed.attend(h)[..., :VOCAB], context


@register_family("test_seq2seq")
class _Seq2SeqDouble(ModelFamily):
  batch_format = "causal_lm"
  eval_tasks = ("bpb", "generate")

  def module(self, *, decode=False):
    del decode
    return _Seq2SeqModule(self.config.d_model)

  def example_batch(self, batch_size, seq_len):
    ids = jnp.zeros((batch_size, seq_len), jnp.int32)
    return {"inputs": ids, "targets": ids, "weights": jnp.zeros(ids.shape, jnp.float32)}

  def init(self, rng, batch):
    half = batch["inputs"].shape[1] // 2
    return self.module().init(rng, batch["inputs"][:, :half], batch["inputs"][:, half:])["params"]

  def loss(self, params, batch, *, rng=None, train=True, aux_state=None, step=None):
    half = batch["inputs"].shape[1] // 2
    logits, context = self.module().apply({"params": params}, batch["inputs"][:, :half],
                                          batch["inputs"][:, half:])
    targets, weights = batch["targets"][:, half:], batch["weights"][:, half:]
    nll, weight = losses.weighted_nll(logits, targets, weights)
    aux = 1e-3 * jnp.mean(context.astype(jnp.float32) ** 2) * jax.lax.stop_gradient(weight)
    metrics = {"weight": weight, "nll": nll, "aux_loss": aux}
    if not train:
      metrics["correct"] = losses.weighted_correct(logits, targets, weights)
    return nll + aux, metrics

  def generate(self, params, prompt, rng, *, max_new, temperature=0.0, top_k=0):
    """Encodes the prompt, then decodes from EOS (re-running the decoder: a double needs no cache)."""
    ids = jnp.full((prompt.shape[0], 1), EOS, jnp.int32)
    for _ in range(max_new):
      rng, sub = jax.random.split(rng)
      logits, _ = self.module().apply({"params": params}, prompt, ids)
      ids = jnp.concatenate([ids, decoding.sample_logits(logits[:, -1], sub, temperature, top_k)[:, None]], 1)
    return ids[:, 1:]


def _config():
  config = tiny.get_config()
  config.model.name = "test_seq2seq"
  config.train.steps, config.checkpoint.every, config.train.eval_every = 6, 3, 3
  config.train.log_every = 3
  return config


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("families") / "seq2seq")
  final = loop.run(_config(), workdir)
  return workdir, final


def test_a_new_family_trains_through_the_unchanged_loop(seq2seq_run):
  workdir, final = seq2seq_run
  assert final["step"] == 6 and 0 < final["eval/bpb"] < 16
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [3, 6]
  assert all(r["aux_loss"] > 0 for r in train)  # the family's extra metric sums are logged as means
  # Only the decoder half of each window is scored: 4 rows x 2 batches x 16 positions at most.
  assert all(0 < r["eval/bytes"] <= 2 * 4 * 16 for r in records if "eval/bytes" in r)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


def test_evaluate_runs_the_family_s_tasks_and_refuses_others(seq2seq_run):
  workdir, final = seq2seq_run
  results = evaluation.evaluate(workdir, tasks=("bpb", "generate"), options={"prompt": "def f("},
                                overrides=["--eval.max_batches=2", "--generate.max_new_bytes=4"])
  assert results["bpb"][0]["metrics"]["bpb"] == pytest.approx(final["eval/bpb"], rel=1e-5)
  assert isinstance(results["generate"][0]["metrics"]["completion"], str)
  with pytest.raises(ConfigError, match=r"does not support the task\(s\) \['passkey'\]; it supports bpb, "
                                        r"generate"):
    evaluation.evaluate(workdir, tasks=("passkey",))


def test_unknown_family_is_one_config_error(tmp_path):
  config = _config()
  config.model.name = "no_such_family"
  with pytest.raises(ConfigError, match="unknown model.name 'no_such_family'; registered model families: "):
    loop.run(config, str(tmp_path / "run"))
  assert "landmark_lm" in models.family_names() and "transformer" in models.family_names()


def test_training_never_branches_on_a_model_name_and_models_never_import_data():
  for path in glob.glob(os.path.join(REPO_ROOT, "training", "**", "*.py"), recursive=True):
    with open(path) as f:
      source = f.read()
    assert not re.search(r"model\.name\s*(==|!=|in\b)", source), path
    assert not re.search(r"[\"'](transformer|landmark_lm)[\"']", source), path
  for path in glob.glob(os.path.join(REPO_ROOT, "models", "*.py")):
    with open(path) as f:
      source = f.read()
    assert not re.search(r"^\s*(from data\b|import data\b)", source, re.M), path
