"""Gated Linear Attention (GLA) language model: the base byte-level model with every mixer set to GLA.

    python train.py --config=configs/gla.py --workdir=runs/gla
    python train.py --config=configs/gla.py --workdir=/tmp/gla_run --config.train.steps=30   # smoke run

Layer options (models/gla.py `DEFAULTS`, specs/attention_variants.md §1.2) are all under `model.gla`; the
defaults are fla's `GatedLinearAttention` layer (expand_k 0.5, expand_v 1, low-rank gate 16 with
logsigmoid / 16, swish output gate without bias, per-head RMSNorm). The paper / original-repo variants:
`--config.model.gla.output_norm=layernorm --config.model.gla.output_gate_bias=True`, and berlino's gate
clamp `--config.model.gla.clamp_min=-3.0`. As in the paper (§4.4 "Block"), the mixer has no positional
encoding (RoPE settings of the base config are unused by GLA layers).
"""

import ml_collections

import models
from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.mixer = "gla"
  config.model.gla = models.mixer_config("gla")  # every option, with its default (models/gla.py)
  return config
