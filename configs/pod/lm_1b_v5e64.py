"""A ~1B-parameter byte-level Transformer LM on a TPU v5e-64 pod slice (16 hosts x 4 chips, 16 GiB each).

    python -m training.plan --config=configs/pod/lm_1b_v5e64.py --num_devices=64     # on a laptop
    python train.py --config=configs/pod/lm_1b_v5e64.py --workdir=gs://bucket/lm_1b  # on every host

Expected to work, untested on a real pod: only the planner and the 2-process CPU run are tested here.
"""

from configs import base


def model_and_recipe():
  """The model and the optimisation recipe shared with configs/pod/lm_1b_8xh100.py."""
  config = base.get_config()
  # 20 layers x d_model 2048 (16 heads of 128, SwiGLU 5440): 1.0B parameters, ~12 d^2 per layer.
  config.model.d_model = 2048
  config.model.num_layers = 20
  config.model.num_heads = 16
  config.model.head_dim = 128
  # One scanned layer body: compile time does not grow with depth (params get a leading "layers" axis).
  config.model.scan_layers = True
  # 4096 bytes per sequence (about 1k BPE tokens of English); 256 of them = 2^20 bytes per step, the batch
  # ByT5 pretrained with.
  config.train.seq_len = 4096
  config.train.batch_size = 256
  # bf16 matmuls; params, optimizer moments, logits, softmax and loss stay float32 (master weights).
  config.train.compute_dtype = "bfloat16"
  # ~20 bytes per parameter (Chinchilla's tokens-per-parameter with a byte as the token): 2e10 bytes.
  config.train.steps = 20_000
  config.train.log_every = 50
  config.train.eval_every = 2_000
  config.train.progress_bar = False  # logs go to files on a pod; the plain lines are the log
  config.optimizer.lr = 3e-4  # a 1B model at a 2^20 batch; the small base config's 3e-3 would diverge
  config.optimizer.warmup_steps = 1_000
  config.checkpoint.every = 1_000  # ~1/20 of the run lost at most on a hard failure; SIGTERM saves anyway
  config.eval.batch_size = 64
  return config


def get_config():
  config = model_and_recipe()
  # fsdp over the 16 hosts (-1: the devices left after tensor), tensor within a host's 4 chips: params,
  # gradients and Adam moments are split 64 ways, the batch 16 ways (16 sequences per fsdp shard), and
  # each layer's heads / MLP columns over the 4 chips of one host, whose links are the fastest.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 4
  # Full remat: a layer keeps only its input and recomputes the rest in the backward pass; saving the matmul
  # outputs too (dots_saveable) multiplies the saved activations, which a 16 GiB chip cannot hold.
  config.model.remat = "full"
  # 4 micro-batches of 64 sequences (4 per fsdp shard): the planner's XLA:CPU estimate is 6.2 GiB per chip,
  # against 24 GiB for the whole batch at once; the optimizer step still sees all 256 sequences.
  config.train.grad_accum = 4
  return config
