"""ByT5-Small (300M params): `configs.byt5.PAPER_SIZES["small"]` with the pretraining recipe.

    python train.py --config=configs/byt5_small.py --workdir=gs://bucket/byt5_small
"""

from configs import byt5


def get_config():
  return byt5.paper_config("small")
