"""Byte2Word (specs/token_free.md §9, Lee et al. 2022) as a causal byte LM: word representations built by
cross-attention directly from the byte embeddings, a word-level stack, and byte prediction from the
word-level states.

    python train.py --config=configs/byte2word.py --workdir=runs/byte2word

No byte layers before pooling: one learned query per word attends to the word's byte embeddings (pooling
"latent"; §9: "byte embeddings are keys/values"); whitespace words; the word stack is causal; the bytes of
the next word are predicted by byte layers from the word-level state (the §5.1 gather) over the byte
embeddings. The paper's model is a BERT-style encoder (MLM); this is its autoregressive analogue.
"""

import ml_collections

from configs import dynamic_pooling


def get_config() -> ml_collections.ConfigDict:
  config = dynamic_pooling.get_config()
  h = config.model.hierarchical
  h.boundaries = "whitespace"
  h.pooling = "latent"
  h.encoder_layers, h.global_layers, h.decoder_layers = 0, 4, 2
  return config
