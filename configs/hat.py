"""HAT (specs/token_free.md §4, Neitemeier et al. 2025): byte encoder -> one embedding per word ->
word-level backbone -> byte decoder that reads one predictive embedding.

    python train.py --config=configs/hat.py --workdir=runs/hat

The released TFree-HAT layout (§4.3) at CPU scale: words from the exact HAT splitter rule (§4.1,
host-side, words capped at 32 bytes); causal byte encoder over the whole stream; the encoder connector,
one learned query cross-attending to the word's bytes (pooling "latent"); a causal backbone over words;
the decoder continues the encoder's byte states and, before each of its layers, adds the cross-attention
to the one predictive embedding of the words completed before the byte's word (upsampling "cross"; a
word's end is known once the next word's first character is in). The backbone's slot 0 is a learned
null word, HAT's first_word_embedding.
"""

import ml_collections

from configs import dynamic_pooling


def get_config() -> ml_collections.ConfigDict:
  config = dynamic_pooling.get_config()
  h = config.model.hierarchical
  h.boundaries = "hat_words"
  h.expected_patch = 3
  h.max_word_bytes = 32
  h.pooling = "latent"
  h.upsampling = "cross"
  h.encoder_layers, h.global_layers, h.decoder_layers = 1, 4, 2
  return config
