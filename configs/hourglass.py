"""Hourglass (specs/token_free.md §6, Nawrot et al. 2022): fixed shortening by k with the shift by k - 1.

    python train.py --config=configs/hourglass.py --workdir=runs/hourglass
    python train.py --config=configs/hourglass.py --config.model.hierarchical.pooling=mean \\
        --config.model.hierarchical.upsampling=gather      # AvgPool + repeat

"1@1 4@4 1@1" at this CPU scale: one full-resolution layer on each side (§6: at least one after
upsampling is mandatory), k = 4. Resampling is the paper's best pair (§6 ablations): attention pooling
with AvgPool queries (1.124 vs AvgPool 1.129) and attention upsampling with U = x + LinearUpsample(x')
(1.132 vs repeat 1.148). The shift by k - 1 is the §5.1 gather with fixed boundaries (byte t reads the
last completed patch), the same information flow (ops/pooling).
"""

import ml_collections

from configs import dynamic_pooling


def get_config() -> ml_collections.ConfigDict:
  config = dynamic_pooling.get_config()
  h = config.model.hierarchical
  h.boundaries = "fixed"
  h.patch_size = 4
  h.pooling = "attention"
  h.upsampling = "attention"
  return config
