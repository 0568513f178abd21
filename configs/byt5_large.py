"""ByT5-Large (1.23B params; specs/token_free.md §2.3 table, heads from t5x's byt5/large.gin).

    python train.py --config=configs/byt5_large.py --workdir=gs://bucket/byt5_large

d_model 1536, d_ff 3840, 16 heads x 64, encoder 36 / decoder 12 layers, inputs 1024 / targets 189 bytes
(§2.4), bf16 compute. For accelerators: on CPU use configs/byt5.py.
"""

import ml_collections

from configs import byt5


def get_config() -> ml_collections.ConfigDict:
  config = byt5.get_config()
  config.model.d_model = 1536
  config.model.mlp_dim = 3840
  config.model.num_heads = 16
  config.model.head_dim = 64
  config.model.num_layers = 36
  config.model.num_decoder_layers = 12
  config.train.seq_len = 1024
  config.train.batch_size = 1024  # 2^20 input tokens per batch (§2.4)
  config.train.steps = 1_000_000
  config.train.eval_every = 10_000
  config.checkpoint.every = 10_000
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_steps = 10_000
  return config
