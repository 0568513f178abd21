"""Multi-query associative recall (Zoology MQAR): a small model trained on synthetic recall sequences.

    python train.py --config=configs/mqar.py --workdir=runs/mqar_softmax
    python train.py --config=configs/mqar.py --workdir=runs/mqar_gla --config.model.mixer=gla
    python evaluate.py --workdir=runs/mqar_gla --tasks=mqar
    python train.py --config=configs/mqar.py:landmark --workdir=runs/mqar_landmark   # any mixer, with its options

Data (data/synthetic.py): each 32-byte sequence holds P key-value pairs (P drawn from data.mqar.num_pairs
= 1, 2, 4) followed by every key again in random order with its value; the loss counts only the queries'
values. The logged "eval/bpb" is bits per answer byte (log2(47) = 5.55 for a model that only knows the
value alphabet), and `evaluate.py --tasks=mqar` reports the recall accuracy per number of pairs (default
rows 4, 8, 16, 32 at seq_len 32, 32, 63, 127: 8 or more pairs are never seen in training).

A 2-layer, d_model 64 softmax model: 1000 steps of 32 x 32 bytes, about a minute on 2 CPU cores; recall
appears abruptly (induction-head style) after roughly 500 steps. Short sequences with few pairs are what
make it learn this fast: the same model on 64-byte sequences with 2-8 pairs stays near the 1/P
"copy a value from the context" level for 1000 steps. Measured once each (2-core CPU, 2026-11-23), recall
accuracy at 4 / 8 / 16 / 32 pairs after the 1000 steps: softmax 0.99 / 0.86 / 0.45 / 0.15 (74 s wall);
`--config.model.mixer=gla` 0.19 / 0.06 / 0.03 / 0.01, i.e. not learned in this budget.
"""

import ml_collections

import models
from configs import base

# Landmark blocks of 8 bytes + 1 landmark: its default of 50 + 1 is longer than the 32-byte sequences.
_LANDMARK_BLOCK_SIZE = 9


def get_config(mixer: str = "softmax") -> ml_collections.ConfigDict:
  """The MQAR model with every layer's mixer = `mixer` (its options at their defaults)."""
  config = base.get_config()
  config.model.mixer = mixer
  if mixer not in ("softmax", "cog"):  # the mixers with options
    config.model[mixer] = models.mixer_config(mixer)
  if mixer == "landmark":
    config.model.name = "landmark_lm"
    config.model.landmark.block_size = _LANDMARK_BLOCK_SIZE
  config.data.source = "mqar"
  config.data.mqar.num_pairs = (1, 2, 4)
  config.data.mqar.eval_examples = 128
  config.train.steps = 1000
  config.train.batch_size = 32
  config.train.seq_len = 32
  config.train.log_every = 25
  config.train.eval_every = 250
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 20
  config.optimizer.weight_decay = 0.0
  config.model.num_layers = 2
  config.model.d_model = 64
  config.model.num_heads = 2
  config.train.compute_dtype = "float32"  # the accuracies below were measured in f32
  config.eval.batch_size = 32
  config.eval.max_batches = 4
  config.checkpoint.every = 500
  config.mqar.num_examples = 128
  return config
