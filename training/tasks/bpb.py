"""Bits per byte on a split of any data source (fixed, non-overlapping windows; real bytes only)."""

import jax

import models
from training import sharding
from training import train_step as ts
from training.loop import evaluate_bpb
from training.tasks import EvalContext, register_task


@register_task("bpb")
def bpb_task(ctx: EvalContext) -> dict:
  config = ctx.config
  model = models.get_model(config.model)
  eval_fn = jax.jit(lambda p, b: ts.eval_step(p, b, model=model),
                    in_shardings=(None, sharding.batch_sharding(ctx.mesh)))
  split = ctx.options.get("split") or config.eval.split
  result = evaluate_bpb(eval_fn, ctx.params, config, ctx.mesh, split=split)
  return {"metrics": {"split": split, "source": config.data.source, "bpb": result["bpb"],
                      "loss_nats": result["loss"], "bytes": int(result["bytes"])}}
