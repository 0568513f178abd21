"""Toucan (specs/token_free.md §7, Fleshman & Van Durme 2023): dynamic pooling with an end-of-token token.

    python train.py --config=configs/toucan.py --workdir=runs/toucan
    python -m benchmarks.generation --configs=toucan,dynamic_pooling

Dynamic pooling's model with fixed-tokenizer boundaries. Toucan's predictor imitates a fixed tokenizer
(Unigram), so its EOTs mark boundaries that are a fixed function of the text; the nearest fixed tokenizer
here is the whitespace rule. With boundaries that move while the model trains, the EOTs are hard to
predict. Measured at d_model 64, 150 steps: the "entropy" source cost 4.16 nats per byte against dynamic
pooling's 2.87, where whitespace cost 2.37 against 2.30. At this config's size and 600 steps, "learned"
(whose straight-through gradient then also carries the EOT bits) drove the boundaries to none for most
of the run and ended at 3.38 bpb.

After every boundary the decoder byte layers see an EOT token (id 259, model.vocab_size 260): the last
byte of a token predicts EOT and the EOT predicts the first byte of the next token, so during generation
the decoder decides where a token ends and the global stack runs once per emitted EOT, never for the
bytes in between (ops/pooling/end_of_token.py). bpb charges the EOT predictions' bits to the bytes.
"""

import ml_collections

from configs import dynamic_pooling


def get_config() -> ml_collections.ConfigDict:
  config = dynamic_pooling.get_config()
  config.model.vocab_size = 260  # the ByT5 ids and EOT
  h = config.model.hierarchical
  h.boundaries = "whitespace"
  h.end_of_token = True
  return config
