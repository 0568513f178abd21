"""ByT5-Base (582M params): `configs.byt5.PAPER_SIZES["base"]` with the pretraining recipe.

    python train.py --config=configs/byt5_base.py --workdir=gs://bucket/byt5_base
"""

from configs import byt5


def get_config():
  return byt5.paper_config("base")
