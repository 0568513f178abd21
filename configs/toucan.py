"""Toucan (specs/token_free.md §7, Fleshman & Van Durme 2023): dynamic pooling with an end-of-token token.

    python train.py --config=configs/toucan.py --workdir=runs/toucan
    python -m benchmarks.generation --configs=toucan,dynamic_pooling --config.model.hierarchical.boundaries=learned

Dynamic pooling's model with learned boundaries (Gumbel-sigmoid, straight-through, Binomial prior, §5.2);
after every boundary the decoder byte layers see an EOT token (id 259, model.vocab_size 260): the last byte
of a token predicts EOT and the EOT predicts the first byte of the next token, so during generation the
decoder decides where a token ends and the global stack runs once per emitted EOT, never for the bytes in
between (ops/pooling/end_of_token.py). bpb charges the EOT predictions' bits to the bytes.
"""

import ml_collections

from configs import dynamic_pooling


def get_config() -> ml_collections.ConfigDict:
  config = dynamic_pooling.get_config()
  config.model.vocab_size = 260  # the ByT5 ids and EOT
  h = config.model.hierarchical
  h.boundaries = "learned"
  h.end_of_token = True
  return config
