"""Hourglass (specs/token_free.md §6, Nawrot et al. 2022): fixed shortening by k with the shift by k - 1.

    python train.py --config=configs/hourglass.py --workdir=runs/hourglass

"1@1 4@4 1@1" at this CPU scale: one full-resolution layer on each side (§6: at least one after
upsampling is mandatory), mean pooling of k = 4 bytes. The shift by k - 1 is the §5.1 gather with fixed
boundaries (byte t reads the last completed patch), the same information flow (ops/pooling).
"""

import ml_collections

from configs import dynamic_pooling


def get_config() -> ml_collections.ConfigDict:
  config = dynamic_pooling.get_config()
  h = config.model.hierarchical
  h.boundaries = "fixed"
  h.patch_size = 4
  return config
