"""Selective Self-Attention (SSA, Zhang et al. 2024; specs/attention_variants.md §4A, §7.1, §7.3): the base
byte-level model with every mixer set to "ssa" (softmax attention on temperature-scaled q and v).

    python train.py --config=configs/ssa.py --workdir=runs/ssa
    python train.py --config=configs/ssa.py --workdir=/tmp/ssa_run --config.train.steps=30   # smoke run
    python train.py --config=configs/ssa.py --workdir=runs/ssa_mul --config.model.ssa.combine=mul

Options (models/attention.py `SSA_DEFAULTS`) are spelled out under `model.ssa`. Defaults: additive
combination tau = tau_pos + tau_tok (spec §7.3 recommendation, [VERIFY]), tau_pos on q and v, weight-shared
token temperatures tanh(u . GELU(W x)) with u = 0 at init, and the official code's position scalar
s = exp(-exp(beta)) with beta = 2.0 (s ~ 6.2e-4: near identity). `--config.model.ssa.position_init=5.0`
makes the step-0 model exactly the softmax model; `position_param=sigmoid` is the third-party form.
"""

import ml_collections

import models
from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.mixer = "ssa"
  config.model.ssa = models.mixer_config("ssa")  # every option, with its default
  return config
