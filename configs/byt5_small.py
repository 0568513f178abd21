"""ByT5-Small (300M params; specs/token_free.md §2.3 table, heads from t5x's byt5/small.gin).

    python train.py --config=configs/byt5_small.py --workdir=gs://bucket/byt5_small

d_model 1472, d_ff 3584, 6 heads x 64, encoder 12 / decoder 4 layers, inputs 1024 / targets 189 bytes
(§2.4), bf16 compute. For accelerators: on CPU use configs/byt5.py.
"""

import ml_collections

from configs import byt5


def get_config() -> ml_collections.ConfigDict:
  config = byt5.get_config()
  config.model.d_model = 1472
  config.model.mlp_dim = 3584
  config.model.num_heads = 6
  config.model.head_dim = 64
  config.model.num_layers = 12
  config.model.num_decoder_layers = 4
  config.train.seq_len = 1024
  config.train.batch_size = 1024  # 2^20 input tokens per batch (§2.4)
  config.train.steps = 1_000_000
  config.train.eval_every = 10_000
  config.checkpoint.every = 10_000
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_steps = 10_000
  return config
