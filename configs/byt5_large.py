"""ByT5-Large (1.23B params): `configs.byt5.PAPER_SIZES["large"]` with the pretraining recipe.

    python train.py --config=configs/byt5_large.py --workdir=gs://bucket/byt5_large
"""

from configs import byt5


def get_config():
  return byt5.paper_config("large")
