"""ByT5 (specs/token_free.md §2): a small T5 v1.1 encoder-decoder trained with span corruption on the
bundled corpus, sized to train in minutes on 2 CPU cores.

    python train.py --config=configs/byt5.py --workdir=runs/byt5
    python evaluate.py --workdir=runs/byt5                              # bits per target byte
    python evaluate.py --workdir=runs/byt5 --tasks=generate --prompt="def main(" 

The ByT5 recipe at a small scale: encoder 3x deeper than the decoder (§2.1), GeGLU, RMSNorm, T5 relative
position bias, untied 384-row lm_head, z-loss 1e-4, span corruption with mean span 20 bytes and noise
density 0.15 (§2.4). train.seq_len is the encoder input length; the targets follow from it (256 inputs ->
48 targets here; 1024 -> 189 as in the paper). AdamW stands in for t5x's Adafactor. The paper sizes are
configs/byt5_small.py, byt5_base.py and byt5_large.py.
"""

import ml_collections

from configs import base
from models import byt5


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.name = "byt5"
  config.model.d_model = 192
  config.model.num_heads = 3
  config.model.head_dim = 64
  config.model.mlp_dim = 512
  config.model.num_layers = 6  # encoder
  config.model.num_decoder_layers = 2  # 3:1 (§2.1)
  config.model.vocab_size = 384  # t5x's 384 rows (259 byte ids + unused), as the released checkpoints
  config.model.byt5 = byt5.byt5_config()
  config.train.seq_len = 256  # encoder input bytes
  config.train.batch_size = 16
  config.train.steps = 1500
  config.train.eval_every = 500
  config.checkpoint.every = 500
  config.optimizer.lr = 2e-3
  config.eval.max_batches = 8
  config.eval.final_max_batches = 0
  return config


# The paper's sizes (specs/token_free.md §2.3 table; heads from t5x's byt5/{small,base,large}.gin):
# name -> (params, d_model, d_ff, heads, encoder layers, decoder layers); head_dim 64 throughout.
PAPER_SIZES = {
    "small": ("300M", 1472, 3584, 6, 12, 4),
    "base": ("582M", 1536, 3968, 12, 18, 6),
    "large": ("1.23B", 1536, 3840, 16, 36, 12),
}


def paper_config(size: str) -> ml_collections.ConfigDict:
  """ByT5 at a paper size, with the pretraining recipe: inputs 1024 / targets 189 bytes, 2^20 input
  bytes per batch, 1M steps (§2.4); for accelerators."""
  _, d_model, d_ff, heads, encoder_layers, decoder_layers = PAPER_SIZES[size]
  config = get_config()
  config.model.d_model, config.model.mlp_dim = d_model, d_ff
  config.model.num_heads, config.model.head_dim = heads, 64
  config.model.num_layers, config.model.num_decoder_layers = encoder_layers, decoder_layers
  config.train.seq_len = 1024
  config.train.batch_size = 1024
  config.train.steps = 1_000_000
  config.train.eval_every = config.checkpoint.every = 10_000
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_steps = 10_000
  return config
