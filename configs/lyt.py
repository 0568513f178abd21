"""Learn Your Tokens (specs/token_free.md §8, Thawani et al. 2023): word-pooled tokenization with a word
encoder, a word backbone and a word decoder.

    python train.py --config=configs/lyt.py --workdir=runs/lyt

As configuration of the shared pieces: whitespace words; the word encoder sees only its own word
("encoder_scope": "patch") and one learned prefix query reads it out (pooling "latent", LYT's p = 1
prefix slot); a causal backbone over words; the word decoder runs on fresh byte embeddings of the next
word, causal within it ("decoder_scope": "patch"), with the backbone output written at its first slot
(upsampling "boundary" on the learned pad of "embed_pad": the byte that closes a word starts the next
word's canvas). Two differences from eTok, by construction of a causal byte stream: the word encoder is
causal within the word (eTok's is bidirectional; the readout query still sees every byte of the word),
and a word is not truncated to a canvas of c0 bytes.
"""

import ml_collections

from configs import dynamic_pooling


def get_config() -> ml_collections.ConfigDict:
  config = dynamic_pooling.get_config()
  h = config.model.hierarchical
  h.boundaries = "whitespace"
  h.encoder_scope = "patch"
  h.pooling = "latent"
  h.upsampling = "boundary"
  h.decoder_input = "embed_pad"
  h.decoder_scope = "patch"
  h.encoder_layers, h.global_layers, h.decoder_layers = 2, 4, 2
  return config
