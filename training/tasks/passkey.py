"""Passkey retrieval (specs/attention_variants.md section 2.7): greedy decoding accuracy per prompt length.

For each length in `passkey.lengths` (multiples of train.seq_len) the task builds `passkey.trials` prompts
of exactly that many bytes (data/synthetic.py), prefills each batch of `passkey.batch_size` prompts in one
call and decodes `passkey.max_new_bytes` bytes greedily through the model family's `generate`, so every registered
mixer runs without per-mixer code. The answer is the
first integer in the output (up to EOS); a trial is correct when it equals the key.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from data import bytes as byte_ids
from data import synthetic
from models.family import ModelFamily
from training import metrics as metrics_lib
from training.errors import ConfigError
from training.tasks import EvalContext, register_task

_FIRST_INTEGER = re.compile(r"\d+")


def first_integer(text: str) -> int | None:
  """The first run of digits in text as an int, or None."""
  match = _FIRST_INTEGER.search(text)
  return int(match.group()) if match else None


def _decode_answer(ids: np.ndarray) -> str:
  eos = np.flatnonzero(ids == byte_ids.EOS_ID)
  return byte_ids.decode(ids[:eos[0]] if eos.size else ids)


def passkey_accuracy(family: ModelFamily, params, *, length_bytes: int, trials: int, max_new_bytes: int,
                     batch_size: int, seed: int, bar=None) -> dict:
  """Greedy passkey accuracy at one prompt length: {"accuracy", "outputs" (decoded answers)}."""
  ids, keys = synthetic.passkey_batch(length_bytes, trials, seed)
  outputs = []
  for start in range(0, trials, batch_size):
    rows = ids[start:start + batch_size]
    padded = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), axis=0)])  # one shape
    new = np.asarray(family.generate(params, jnp.asarray(padded), jax.random.key(0),
                                     max_new=max_new_bytes))
    outputs.extend(_decode_answer(row) for row in new[:len(rows)])
    if bar is not None:
      bar.update(len(rows))
  correct = [first_integer(text) == int(key) for text, key in zip(outputs, keys)]
  return {"accuracy": float(np.mean(correct)), "outputs": outputs, "keys": [int(k) for k in keys]}


def _options(ctx: EvalContext):
  p = ctx.config.passkey  # old runs get the defaults (training.evaluation)
  try:
    lengths = tuple(int(x) for x in p.lengths)
  except (TypeError, ValueError):
    raise ConfigError(f"passkey.lengths must be integers (multiples of train.seq_len), got {p.lengths!r}.")
  if not lengths or min(lengths) < 1:
    raise ConfigError(f"passkey.lengths must be positive multiples of train.seq_len, got {p.lengths!r}.")
  for name in ("trials", "max_new_bytes", "batch_size"):
    if int(p[name]) < 1:
      raise ConfigError(f"passkey.{name} must be positive, got {p[name]}.")
  fixed = synthetic.passkey_fixed_bytes()
  too_short = [n for n in lengths if n * ctx.config.train.seq_len < fixed]
  if too_short:
    raise ConfigError(f"passkey.lengths {too_short} x train.seq_len {ctx.config.train.seq_len} are shorter "
                      f"than the prompt's fixed text ({fixed} bytes); use multiples of at least "
                      f"{-(-fixed // ctx.config.train.seq_len)}.")
  return p, lengths


@register_task("passkey")
def passkey_task(ctx: EvalContext) -> dict:
  p, lengths = _options(ctx)
  params = jax.device_get(ctx.params)  # decoding is latency-bound: run unsharded
  rows, samples = [], {}
  with metrics_lib.progress(total=len(lengths) * int(p.trials), unit="prompt", desc="passkey",
                            enabled=ctx.progress) as bar:
    for multiple in lengths:
      length_bytes = multiple * ctx.config.train.seq_len
      out = passkey_accuracy(ctx.family, params, length_bytes=length_bytes, trials=int(p.trials),
                             max_new_bytes=int(p.max_new_bytes), batch_size=int(p.batch_size),
                             seed=int(p.seed), bar=bar)
      rows.append({"length_bytes": length_bytes, "length_x_train": multiple, "trials": int(p.trials),
                   "accuracy": out["accuracy"]})
      samples[str(length_bytes)] = [{"key": k, "output": o} for k, o in zip(out["keys"], out["outputs"])]
  return {"rows": rows, "key_range": [synthetic.PASSKEY_MIN, synthetic.PASSKEY_MAX],
          "max_new_bytes": int(p.max_new_bytes), "seed": int(p.seed), "samples": samples,
          "data": f"lengths={','.join(map(str, lengths))}x{ctx.config.train.seq_len}:trials={int(p.trials)}:"
                  f"seed={int(p.seed)}:max_new_bytes={int(p.max_new_bytes)}"}
