"""The ~1B byte LM of configs/pod/lm_1b_v5e64.py on one host with 8 x H100 (80 GiB each).

    python -m training.plan --config=configs/pod/lm_1b_8xh100.py --num_devices=8
    python train.py --config=configs/pod/lm_1b_8xh100.py --workdir=runs/lm_1b   # one process, 8 GPUs

Expected to work, untested on real GPUs.
"""

from configs.pod import lm_1b_v5e64


def get_config():
  config = lm_1b_v5e64.model_and_recipe()
  # Pure fsdp over the 8 GPUs (ZeRO-3 on NVLink): gathering 1B bf16-cast weights per layer is cheap there,
  # and tensor parallelism would cut d_model-2048 matmuls into slivers too small for an H100.
  config.mesh.data = 1
  config.mesh.fsdp = 8
  config.mesh.tensor = 1
  # The same 2^20 bytes per optimizer step as on the pod (a comparable loss curve), in 8 micro-batches of
  # 32 sequences (4 per GPU): the planner's XLA:CPU estimate is 33 GiB per GPU (64 GiB with 4 micro-batches).
  config.train.grad_accum = 8
  # 80 GiB leaves room to keep the matmul outputs: the backward pass recomputes no matmul (full remat
  # would, for about a third more compute, at 41 GiB with 4 micro-batches).
  config.model.remat = "dots_saveable"
  return config
