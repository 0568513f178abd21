"""Gated Linear Attention (GLA) language model: the base byte-level model with every mixer set to GLA.

    python train.py --config=configs/gla.py --workdir=runs/gla
    python train.py --config=configs/gla.py --workdir=/tmp/gla_run --config.train.steps=30   # smoke run

Layer options (models/gla.py, specs/attention_variants.md §1.2) are spelled out under `model.gla`; the
defaults are fla's `GatedLinearAttention` layer (expand_k 0.5, expand_v 1, low-rank gate 16 with
logsigmoid / 16, swish output gate without bias, per-head RMSNorm). The paper / original-repo variants:
`--config.model.gla.output_norm=layernorm --config.model.gla.output_gate_bias=True`, and berlino's gate
clamp `--config.model.gla.clamp_min=-3.0`. As in the paper (§4.4 "Block"), the mixer has no positional
encoding (RoPE settings of the base config are unused by GLA layers).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.mixer = "gla"
  config.model.gla = ml_collections.ConfigDict({
      "expand_k": 0.5,  # per-head d_k = expand_k * d_model / num_heads
      "expand_v": 1.0,  # per-head d_v = expand_v * d_model / num_heads
      "num_heads": 0,  # 0 = model.num_heads
      "gate_low_rank_dim": 16,
      "gate_logit_normalizer": 16.0,
      # Typed so that --config.model.gla.clamp_min=-3.0 can replace the None default.
      "clamp_min": ml_collections.FieldReference(None, field_type=float),
      "use_output_gate": True,
      "output_gate_bias": False,
      "output_norm": "rmsnorm",  # rmsnorm | layernorm | none
      "norm_eps": 1e-5,
      "feature_map": "none",  # none | relu | swish
      "chunk_size": 64,
      "impl": "",  # "" = model.attention_impl
  })
  return config
