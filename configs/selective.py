"""Leviathan selective attention (Leviathan, Kalman, Matias 2024; specs/attention_variants.md §4B): the base
byte-level model with every mixer set to "selective".

    python train.py --config=configs/selective.py --workdir=runs/selective
    python train.py --config=configs/selective.py --workdir=/tmp/selective_run --config.train.steps=30
    python train.py --config=configs/selective.py --workdir=runs/selective_mem \
        --config.model.selective.memory_loss_weight=0.1                       # with the memory loss

Options (models/selective.py `DEFAULTS`) are spelled out under `model.selective`: the selection mask comes
from head 0 (spec §4B); the memory loss ([VERIFY], epsilon 0.1 and tau 1 in the reproduction) and context
pruning are off by default.
"""

import ml_collections

import models
from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.mixer = "selective"
  config.model.selective = models.mixer_config("selective")  # every option, with its default
  return config
