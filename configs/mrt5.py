"""MrT5 (specs/token_free.md §3): configs/byt5.py with the learned delete gate, softmax1 and the PI
controller targeting 50% deletion.

    python train.py --config=configs/mrt5.py --workdir=runs/mrt5
    python evaluate.py --workdir=runs/mrt5            # bpb and deletion rate, hard (and soft) deletion

Knobs (model.byt5.delete_gate.*): layer (gated encoder layer, 0-based, §3.1), scale k = -30 and
threshold -15 (§3.2, §3.4), target (delta), kp / ki (the PI controller, §3.5: k_i written explicitly since
the README's prose and example disagree), alpha (the fixed weight when controller=False),
regularizer_delay, scores_loss (beta of the attention-score regulariser), hard_eval and capacity_buckets
(static capacities of hard deletion).
"""

import ml_collections

from configs import byt5 as byt5_config


def get_config() -> ml_collections.ConfigDict:
  config = byt5_config.get_config()
  config.model.byt5.softmax1 = True  # every MrT5 run (and its ByT5 baseline) uses softmax1 (§3.3)
  gate = config.model.byt5.delete_gate
  gate.enabled = True
  gate.layer = 3
  gate.scale = -30.0
  gate.threshold = -15.0
  gate.controller = True
  gate.target = 0.5
  gate.kp = 0.5
  gate.ki = 1e-5
  return config
