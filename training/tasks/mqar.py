"""Multi-query associative recall (Zoology MQAR; data/synthetic.py): teacher-forced recall accuracy.

For each P in `mqar.num_pairs` the task builds `mqar.num_examples` fresh sequences (stream "eval_task",
seed `mqar.seed`, so never the training examples) and runs one parallel forward per batch. Accuracy is the
fraction of query-value positions where the argmax of the logits is the value; chance is 1 / 47 for a model
that only knows the value alphabet. Rows: num_pairs, seq_len, examples, accuracy, loss_nats (mean -log p of
the values).
"""

from data import synthetic
from training import metrics as metrics_lib
from training.errors import ConfigError
from training.tasks import EvalContext, register_task, scored_totals


def mqar_seq_len(requested: int, train_seq_len: int, num_pairs: int) -> int:
  """mqar.seq_len, or train.seq_len when 0, raised to the 4P - 1 inputs that P pairs need."""
  return max(int(requested) or int(train_seq_len), synthetic.mqar_min_seq_len(num_pairs))


def _options(ctx: EvalContext):
  m = ctx.config.mqar  # old runs get the defaults (training.evaluation)
  try:
    pairs = synthetic.mqar_num_pairs(m.num_pairs)
  except ValueError as e:
    raise ConfigError(f"mqar.num_pairs: {e}") from None
  for name in ("num_examples", "batch_size"):
    if int(m[name]) < 1:
      raise ConfigError(f"mqar.{name} must be positive, got {m[name]}.")
  if int(m.seq_len) < 0:
    raise ConfigError(f"mqar.seq_len must be 0 (train.seq_len) or positive, got {m.seq_len}.")
  return m, pairs


@register_task("mqar")
def mqar_task(ctx: EvalContext) -> dict:
  m, pairs = _options(ctx)
  batch_size, num_examples = int(m.batch_size), int(m.num_examples)
  rows = []
  with metrics_lib.progress(total=len(pairs) * num_examples, unit="example", desc="mqar",
                            enabled=ctx.progress) as bar:
    for p in pairs:
      seq_len = mqar_seq_len(m.seq_len, ctx.config.train.seq_len, p)
      total = scored_totals(ctx, lambda ids: synthetic.mqar_batch(ids, seed=int(m.seed), num_pairs=p,
                                                                  seq_len=seq_len, stream="eval_task"),
                            num_examples, batch_size, bar)
      rows.append({"num_pairs": p, "seq_len": seq_len, "examples": num_examples,
                   "accuracy": total["correct"] / total["weight"], "loss_nats": total["nll"] / total["weight"]})
  return {"rows": rows, "seed": int(m.seed), "chance": 1.0 / len(synthetic.MQAR_VALUE_BYTES),
          "data": f"num_pairs={','.join(map(str, pairs))}:examples={num_examples}:seed={int(m.seed)}:"
                  f"seq_len={int(m.seq_len)}"}
