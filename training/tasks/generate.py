"""Autoregressive byte generation through the model family (greedy or temperature / top-k sampling)."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data import bytes as byte_ids
from models.family import ModelFamily
from training import metrics as metrics_lib
from training.tasks import EvalContext, register_task


def generate_text(family: ModelFamily, params: Any, prompt: str, *, max_new_bytes: int,
                  temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> str:
  """Continues `prompt` by up to max_new_bytes bytes; stops at EOS."""
  ids = byte_ids.encode(prompt)
  if ids.size == 0:
    ids = np.array([byte_ids.EOS_ID], np.int32)  # an empty prompt starts a new document
  out = np.asarray(family.generate(params, jnp.asarray(ids)[None], jax.random.key(seed),
                                   max_new=max_new_bytes, temperature=temperature, top_k=top_k))[0]
  eos = np.flatnonzero(out == byte_ids.EOS_ID)
  return byte_ids.decode(out[:eos[0]] if eos.size else out)


@register_task("generate")
def generate_task(ctx: EvalContext) -> dict:
  g = ctx.config.generate
  prompt = ctx.options.get("prompt") or ""
  params = jax.device_get(ctx.params)  # decoding is latency-bound: run unsharded
  with metrics_lib.progress(total=1, unit="prompt", desc="generate", enabled=ctx.progress) as bar:
    text = generate_text(ctx.family, params, prompt, max_new_bytes=g.max_new_bytes,
                         temperature=g.temperature, top_k=g.top_k, seed=g.seed)
    bar.update(1)
  return {"metrics": {"prompt": prompt, "completion": text, "temperature": g.temperature,
                      "max_new_bytes": g.max_new_bytes},
          "data": f"prompt={prompt!r}:temperature={g.temperature}:top_k={g.top_k}:seed={g.seed}:"
                  f"max_new_bytes={g.max_new_bytes}"}
