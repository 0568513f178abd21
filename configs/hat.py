"""HAT-style word hierarchy (specs/token_free.md §4): words from the HAT splitter rule (§4.1).

    python train.py --config=configs/hat.py --workdir=runs/hat

Word boundaries from the exact HAT rule, host-side; each byte reads the backbone output of the words
completed before the one it is in (known once the next word's first character is in). This is the
pooling / upsampling skeleton; HAT's learned-query connector and its decoder cross-attention to one
predictive embedding are not built yet (README status).
"""

import ml_collections

from configs import dynamic_pooling


def get_config() -> ml_collections.ConfigDict:
  config = dynamic_pooling.get_config()
  h = config.model.hierarchical
  h.boundaries = "hat_words"
  h.expected_patch = 3
  h.max_word_bytes = 32
  return config
