"""Bits per byte on a split of any data source, beside gzip -9 and xz -9e on exactly the same bytes.

Splits with more scored bytes than eval.compressor_max_bytes get the compressors on an even sample of
~1 MiB blocks of them instead (data/scoring.py eval_scored_bytes); the result's "compressor_bytes" says
how many.

The split is read in fixed, non-overlapping windows (data/pipeline.py eval_batches): all of it, or with
eval.max_batches > 0 that many batches of windows spread evenly over it. Real bytes only (EOS and padding
carry no weight); the first byte of the split is predicted after an EOS context.
"""

import os
from typing import Any

import jax
import jax.numpy as jnp

from data import compressors
from data import corpora
from data import pipeline
from data import scoring
from ops import losses
from training import metrics as metrics_lib
from training import paths
from training import sharding
from training import train_step as ts
from training.tasks import EvalContext, register_task


def evaluate_bpb(eval_fn: Any, params: Any, config: Any, mesh: Any, *, batch_format: str,
                 summarize: Any = None,
                 data_config: Any = None, split: str | None = None, max_batches: int | None = None,
                 show_progress: bool = False, prepare: Any = None) -> dict[str, Any]:
  """{"bpb", "loss" (nats), "bytes", "gzip_bpb", "xz_bpb", "sample"} of one split.

  `eval_fn(params, global_batch)` returns the family's metric sums; they are added on the device and read
  once at the end, so the host never waits per batch. `prepare(batch) -> batch`, if given, changes each
  host batch first (an ablation such as encoder_ablation's blank inputs); the scored bytes stay the same.
  """
  data_config = data_config or config.data
  split = split or config.eval.split
  max_batches = config.eval.max_batches if max_batches is None else max_batches
  window = dict(seq_len=config.train.seq_len, batch_size=config.eval.batch_size, max_batches=max_batches)
  synthetic = data_config.source in corpora.SYNTHETIC_SOURCES
  total = None if synthetic else scoring.eval_scored_count(data_config, split, batch_format=batch_format,
                                                             **window)
  desc = f"bpb {split}"
  with metrics_lib.progress(total=total, unit="B", desc=desc,
                            enabled=show_progress and jax.process_index() == 0) as bar:
    sums = None
    for batch in pipeline.eval_batches(data_config, split, batch_format=batch_format, **window):
      batch = prepare(batch) if prepare is not None else batch
      out = eval_fn(params, sharding.global_batch(sharding.process_rows(batch), mesh))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      bar.update(int(batch["weights"].sum()))
  sums = {k: float(v) for k, v in jax.device_get(sums).items()}
  count = sums["weight"]
  result = {"bpb": losses.bits_per_byte(sums["nll"], count), "loss": sums["nll"] / max(count, 1.0),
            "bytes": int(count)}
  if summarize is not None:  # the family's derived metrics (e.g. MrT5's deletion rate)
    result.update({k: float(v) for k, v in summarize(sums).items()})
  if not synthetic:
    # Bounded (eval.compressor_max_bytes): xz -9e runs at about 1 MB/s, and a multi-GB split stays on disk.
    scored = scoring.eval_scored_bytes(data_config, split, batch_format=batch_format,
                                        max_bytes=int(config.eval.get("compressor_max_bytes", 0)), **window)
    result.update({f"{name}_bpb": v for name, v in compressors.compressed_bits_per_byte(scored).items()})
    if len(scored) < total:
      result["compressor_bytes"] = len(scored)
  result["sample"] = _sample_text(data_config, split, batch_format=batch_format, **window)
  return result


def _sample_text(data_config: Any, split: str, *, seq_len: int, batch_size: int, max_batches: int,
                 batch_format: str) -> str:
  """What part of the split was scored, for the printed lines and the JSON."""
  if data_config.source in corpora.SYNTHETIC_SOURCES:
    return "synthetic examples"
  num_windows = pipeline.eval_num_windows(data_config, split, seq_len=seq_len, batch_format=batch_format)
  scored = len(pipeline.eval_window_indices(num_windows, batch_size, max_batches))
  if scored == num_windows:
    return "whole split"
  unit = "span-corruption chunks" if batch_format == "span_corruption" else "windows"
  return f"even sample of {scored:,} of the split's {num_windows:,} {unit}"


def data_key(config: Any, split: str) -> str:
  """What a bpb result scored: the source (and files), the split and the sample size."""
  d = config.data
  source = d.source if d.source not in ("files", "single_file") else f"{d.source}:{','.join(
      os.fspath(paths.run_path(p)) for p in d.paths)}"
  cap = config.eval.max_batches
  sample = "" if cap <= 0 else f"@{cap}x{config.eval.batch_size}x{config.train.seq_len}"
  return f"{source}:{split}{sample}"


def jitted_eval_step(ctx: EvalContext) -> Any:
  """The family's eval step for `evaluate_bpb`, compiled with the batch sharded over ctx.mesh."""
  return jax.jit(lambda p, b: ts.eval_step(p, b, family=ctx.family),
                 in_shardings=(None, sharding.batch_sharding(ctx.mesh)))


@register_task("bpb")
def bpb_task(ctx: EvalContext) -> dict:
  config = ctx.config
  eval_fn = jitted_eval_step(ctx)
  split = ctx.options.get("split") or config.eval.split
  result = evaluate_bpb(eval_fn, ctx.params, config, ctx.mesh, batch_format=ctx.family.batch_format,
                        split=split, show_progress=ctx.progress, summarize=ctx.family.summarize)
  row = {"split": split, "source": config.data.source, "bpb": result["bpb"]}
  row.update({k: result[k] for k in ("gzip_bpb", "xz_bpb") if k in result})
  row.update(loss_nats=result["loss"], bytes=result["bytes"])
  row.update({k: v for k, v in result.items() if k not in row and k not in ("loss", "sample")})
  return {"metrics": row, "sample": result["sample"], "data": data_key(config, split)}
