"""ByT5-Large (1.23B, configs/byt5_large.py: the paper's size and pretraining recipe) on a TPU v5p-128
pod slice (64 chips: 16 hosts x 4, 95 GiB each).

    python -m training.plan --config=configs/pod/byt5_large_v5p128.py --num_devices=64
    python train.py --config=configs/pod/byt5_large_v5p128.py --workdir=gs://bucket/byt5_large

Expected to work, untested on a real pod.
"""

from configs import byt5


def get_config():
  # The paper's batch: 1024 sequences of 1024 input bytes (2^20 bytes; 189 target bytes each).
  config = byt5.paper_config("large")
  # fsdp over the 16 hosts, tensor over each host's 4 chips: 16 heads, d_ff 3840 and the 384 vocabulary
  # rows all split in 4; 64 sequences per fsdp shard.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 4
  # The byt5 family has no remat option, so micro-batches bound the activations: 16 of 64 sequences (4 per
  # fsdp shard). The planner's XLA:CPU estimate is about 14 GiB per sequence per shard without remat, too
  # much for a v5e's 16 GiB even at 1; here 63 GiB of 95. The optimizer step still sees all 1024.
  config.train.grad_accum = 16
  # bf16 matmuls, float32 params and optimizer state (t5x trained ByT5 in bf16 with Adafactor; AdamW here).
  config.train.compute_dtype = "bfloat16"
  config.train.progress_bar = False  # logs go to files on a pod; the plain lines are the log
  config.eval.batch_size = 64
  return config
