"""Dynamic token pooling (specs/token_free.md §5, Nawrot et al. 2023) on the bundled corpus.

    python train.py --config=configs/dynamic_pooling.py --workdir=runs/dp
    python train.py --config=configs/dynamic_pooling.py --config.model.hierarchical.boundaries=spacelike

Shape of the paper's "[2, (8,), 2]" scaled to this CPU: byte layers before and after the shortened
stack, mean pooling with a learned null group, the shifted gather of §5.1. Boundaries "whitespace"
(§5.2; the paper's best on English); "fixed" with patch_size k is the fixed-SF baseline; the trained
sources "learned" (Gumbel, end-to-end, Binomial prior `prior`) and "entropy" (a predictor imitating the
entropy spikes of the model's own next-byte distribution) add a boundary predictor and log its loss as
"boundary_loss":

    python train.py --config=configs/dynamic_pooling.py --config.model.hierarchical.boundaries=learned
"""

import ml_collections

from configs import base
from models import hierarchical


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.name = "hierarchical"
  config.model.hierarchical = hierarchical.hierarchical_config()
  h = config.model.hierarchical
  h.boundaries = "whitespace"
  h.expected_patch = 3  # capacity = seq_len // 3 + 1 slots: Python source averages ~5 bytes per space
  h.encoder_layers, h.global_layers, h.decoder_layers = 1, 4, 1
  h.pooling = "mean"
  return config
