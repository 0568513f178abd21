"""SpaceByte (specs/token_free.md §11, Slagle 2024): global blocks at spacelike boundaries.

    python train.py --config=configs/spacebyte.py --workdir=runs/spacebyte

global_t = spacelike(x_t) and not spacelike(x_{t-1}) (§11.1); the global stack is wider than the byte
layers, fed by zero-padding the boundary bytes' states (projection "pad", pooling "last") and added back,
truncated, at those bytes only (upsampling "boundary"). Capacity T_global = seq_len // 6 + 1; bytes of
patches beyond it are masked from the loss and counted (overflow_bytes), as SpaceByte does. qk-norm on, as
the paper strongly recommends.
"""

import ml_collections

from configs import dynamic_pooling


def get_config() -> ml_collections.ConfigDict:
  config = dynamic_pooling.get_config()
  config.model.qk_norm = True
  config.model.tie_embeddings = False
  h = config.model.hierarchical
  h.boundaries = "spacelike"
  h.expected_patch = 6
  h.pooling = "last"
  h.upsampling = "boundary"
  h.projection = "pad"
  h.global_d_model = 2 * config.model.d_model
  h.global_num_heads = 2 * config.model.num_heads
  h.encoder_layers, h.global_layers, h.decoder_layers = 2, 4, 2
  return config
