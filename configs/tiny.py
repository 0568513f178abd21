"""A tiny CPU config for tests and smoke runs (seconds per run, not a useful model).

    python train.py --config=configs/tiny.py --workdir=runs/tiny
"""

from configs import base


def get_config():
  config = base.get_config()
  config.train.steps = 20
  config.train.batch_size = 4
  config.train.seq_len = 32
  config.train.log_every = 5
  config.train.eval_every = 10
  config.train.progress_bar = False
  config.train.compute_dtype = "float32"  # exact comparisons in the tests (the base default is "auto")
  config.optimizer.warmup_steps = 5
  config.model.num_layers = 2
  config.model.d_model = 32
  config.model.num_heads = 2
  config.eval.batch_size = 4
  config.eval.max_batches = 2
  config.eval.final_max_batches = 2  # the whole valid split would dominate a tiny run
  config.checkpoint.every = 10
  config.checkpoint.async_save = False
  config.data.max_corpus_bytes = 200_000
  return config
