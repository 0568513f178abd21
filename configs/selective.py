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

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.mixer = "selective"
  config.model.selective = ml_collections.ConfigDict({
      "selection_head": 0,  # query head whose pre-softmax logits give the selection matrix S
      "memory_loss_weight": 0.0,  # epsilon of the memory loss; 0 = off (reproduction: 0.1)
      "memory_tau": 1.0,  # tau of M_i = n_i - sum_j min(F_ij, tau) / tau
      # Keys with accumulated F_ij above this are masked (evictable); None = off. Typed so that
      # --config.model.selective.prune_threshold=20.0 can replace the None default.
      "prune_threshold": ml_collections.FieldReference(None, field_type=float),
      "block_q": 0,  # query block of the "xla" op; 0 = default (128)
      "impl": "",  # "" = model.attention_impl; "reference" | "xla"
  })
  return config
