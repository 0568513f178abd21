"""Cog attention (signed weights, specs/attention_variants.md §3): the base model with Cog token mixers.

    python train.py --config=configs/cog.py --workdir=runs/cog
    python train.py --config=configs/cog.py --workdir=runs/cog --config.model.cog.softmax_first_last=False

Per spec §3.2 (Cogformer `attn_type='np'`) the first and last layers keep softmax and every middle layer
uses Cog: `model.mixer = ["softmax"] + ["cog"] * (L - 2) + ["softmax"]`. The list is a lazy function of
`model.num_layers` and `model.cog.softmax_first_last`, so command-line overrides of either rebuild it.
With softmax_first_last (the default) a 2-layer model is all softmax.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()

  config.model.cog = ml_collections.ConfigDict()
  # [VERIFY] spec §3.2/§7.2: code-confirmed rule (softmax in layer 0 and layer L-1); the v3 paper wording
  # is unread. False uses Cog in every layer.
  config.model.cog.softmax_first_last = True

  # Lazy (FieldReference) so --config.model.num_layers / --config.model.cog.softmax_first_last apply.
  num_layers = config.model.get_ref("num_layers")
  edge = config.model.cog.get_ref("softmax_first_last").to_int()  # softmax layers at each end: 1 or 0
  config.model.mixer = ["softmax"] * edge + ["cog"] * (num_layers - 2 * edge) + ["softmax"] * edge
  return config
