"""MEGABYTE (specs/token_free.md §10, Yu et al. 2023): a global model over concatenated patch embeddings
and a local model per patch.

    python train.py --config=configs/megabyte.py --workdir=runs/megabyte

§10.1 as configuration: fixed patches of P = 4 bytes (SpaceByte found P = 4 often better than 8 under a
compute budget); no byte layers before pooling, so the global input of patch k + 1 is concat(E^g[x] of
patch k) (pooling "concat", projection "pad" with global_d_model = P * d_model: the concatenation itself,
patch 0 the learned pad); the local model is the decoder, causal within each patch ("decoder_scope":
"patch") on a fresh embedding E^l with E^l-pad at p = 0 ("embed_pad"), plus W^GL of slice p of the global
output ("slice"), and its own output matrix. Positions within a patch enter through RoPE at the local
offset rather than MEGABYTE's learned E^pos.
"""

import ml_collections

from configs import dynamic_pooling


def get_config() -> ml_collections.ConfigDict:
  config = dynamic_pooling.get_config()
  config.model.d_model, config.model.num_heads = 128, 4
  config.model.tie_embeddings = False
  h = config.model.hierarchical
  h.boundaries = "fixed"
  h.patch_size = 4
  h.encoder_layers, h.global_layers, h.decoder_layers = 0, 3, 2
  h.pooling = "concat"
  h.projection = "pad"
  h.global_d_model = h.patch_size * config.model.d_model
  h.global_num_heads = 8
  h.upsampling = "slice"
  h.decoder_scope = "patch"
  h.decoder_input = "embed_pad"
  return config
