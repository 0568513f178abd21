"""How much an encoder-decoder's predictions rest on its encoder: bits per target byte on a split as given
and with every encoder input byte blanked to a space (data/span_corruption.py blank_inputs: the sentinels,
EOS and padding stay, so the decoder still sees where the spans are, and nothing of their context).

    python evaluate.py --workdir=runs/byt5 --tasks=encoder_ablation            # valid split
    python evaluate.py --workdir=runs/mrt5 --tasks=encoder_ablation --split=test

"encoder_bits" = blank_inputs_bpb - bpb. Small values mean the decoder predicts the targets mostly from
themselves, so deleting encoder positions (MrT5, spec §3) costs little whatever the gate does.
"""

from data import span_corruption
from training.tasks import EvalContext, register_task
from training.tasks import bpb


def _blanked(batch: dict) -> dict:
  return {**batch, "inputs": span_corruption.blank_inputs(batch["inputs"])}


@register_task("encoder_ablation")
def encoder_ablation_task(ctx: EvalContext) -> dict:
  """Only encoder-decoder families list it (their batches' "inputs" are span-corrupted encoder ids)."""
  family, config = ctx.family, ctx.config
  eval_fn = bpb.jitted_eval_step(ctx)
  split = ctx.options.get("split") or config.eval.split
  common = dict(batch_format=family.batch_format, split=split, show_progress=ctx.progress)
  given = bpb.evaluate_bpb(eval_fn, ctx.params, config, ctx.mesh, **common)
  blank = bpb.evaluate_bpb(eval_fn, ctx.params, config, ctx.mesh, prepare=_blanked, **common)
  metrics = {"split": split, "bpb": given["bpb"], "blank_inputs_bpb": blank["bpb"],
             "encoder_bits": blank["bpb"] - given["bpb"], "bytes": given["bytes"]}
  return {"metrics": metrics, "data": bpb.data_key(config, split)}
