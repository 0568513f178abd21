"""Copy probes (data/synthetic.py): teacher-forced accuracy on bytes that only copying can predict.

Tells apart a model that retrieves from its context from one that has learned the text's shape: the passkey
task scores a whole greedy answer, this scores each copied byte. For each probe in `copy.probes`,
`copy.num_examples` rows at train.seq_len (seed `copy.seed`) run one parallel forward per batch. Rows:
probe, examples, scored (bytes), accuracy (argmax = target), chance (1 / the probe's alphabet), loss_nats.
"""

from data import synthetic
from training.errors import ConfigError
from training.tasks import EvalContext, register_task, scored_totals


def _options(ctx: EvalContext):
  c = ctx.config.copy  # old runs get the defaults (training.evaluation)
  probes = (c.probes,) if isinstance(c.probes, str) else tuple(c.probes)
  unknown = [p for p in probes if p not in synthetic.COPY_PROBES]
  if not probes or unknown:
    raise ConfigError(f"copy.probes must be one or more of {', '.join(synthetic.COPY_PROBES)}, got "
                      f"{c.probes!r}.")
  for name in ("num_examples", "batch_size"):
    if int(c[name]) < 1:
      raise ConfigError(f"copy.{name} must be positive, got {c[name]}.")
  return c, probes


@register_task("copy")
def copy_task(ctx: EvalContext) -> dict:
  c, probes = _options(ctx)
  seq_len, batch_size, num_examples = int(ctx.config.train.seq_len), int(c.batch_size), int(c.num_examples)
  rows = []
  for probe in probes:
    def probe_batch(ids, probe=probe):
      try:
        return synthetic.copy_probe_batch(probe, ids, seed=int(c.seed), seq_len=seq_len)
      except ValueError as e:
        raise ConfigError(f"copy.probes: {e}") from None

    total = scored_totals(ctx, probe_batch, num_examples, batch_size)
    rows.append({"probe": probe, "examples": num_examples, "scored": int(total["weight"]),
                 "accuracy": total["correct"] / total["weight"], "chance": 1 / len(synthetic.COPY_PROBES[probe]),
                 "loss_nats": total["nll"] / total["weight"]})
  return {"rows": rows, "seed": int(c.seed),
          "data": f"probes={','.join(probes)}:examples={num_examples}:seed={int(c.seed)}:seq_len={seq_len}"}
