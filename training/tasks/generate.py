"""Autoregressive byte generation with the decode cache (greedy or temperature / top-k sampling)."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import models
from data import bytes as byte_ids
from models.transformer import init_cache
from training.tasks import EvalContext, register_task


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """logits [B, V] -> ids [B]. temperature 0 is greedy; top_k > 0 keeps the k largest logits."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new", "temperature", "top_k"))
def generate(model: Any, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new: int,
             temperature: float = 0.0, top_k: int = 0) -> jax.Array:
  """prompt [B, P] ids -> [B, max_new] new ids. `model` must be built with decode=True.

  The prompt is prefilled in one call, then one token per step; every step reuses the KV cache.
  """
  batch, prompt_len = prompt.shape
  cache = init_cache(model, batch, prompt_len + max_new)
  logits, mutated = model.apply({"params": params, "cache": cache}, prompt, mutable=["cache"])
  rng, sub = jax.random.split(rng)
  first = sample_logits(logits[:, -1], sub, temperature, top_k)

  def body(carry, _):
    cache, token, rng = carry
    logits, mutated = model.apply({"params": params, "cache": cache}, token[:, None], mutable=["cache"])
    rng, sub = jax.random.split(rng)
    nxt = sample_logits(logits[:, -1], sub, temperature, top_k)
    return (mutated["cache"], nxt, rng), nxt

  _, rest = jax.lax.scan(body, (mutated["cache"], first, rng), None, length=max_new - 1)
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate_text(model_config: Any, params: Any, prompt: str, *, max_new_bytes: int,
                  temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> str:
  """Continues `prompt` by up to max_new_bytes bytes; stops at EOS."""
  model = models.get_model(model_config, decode=True)
  ids = byte_ids.encode(prompt)
  if ids.size == 0:
    ids = np.array([byte_ids.EOS_ID], np.int32)  # an empty prompt starts a new document
  out = np.asarray(generate(model, params, jnp.asarray(ids)[None], jax.random.key(seed),
                            max_new=max_new_bytes, temperature=float(temperature), top_k=int(top_k)))[0]
  eos = np.flatnonzero(out == byte_ids.EOS_ID)
  return byte_ids.decode(out[:eos[0]] if eos.size else out)


@register_task("generate")
def generate_task(ctx: EvalContext) -> dict:
  g = ctx.config.generate
  prompt = ctx.options.get("prompt") or ""
  params = jax.device_get(ctx.params)  # decoding is latency-bound: run unsharded
  text = generate_text(ctx.config.model, params, prompt, max_new_bytes=g.max_new_bytes,
                       temperature=g.temperature, top_k=g.top_k, seed=g.seed)
  return {"metrics": {"prompt": prompt, "completion": text, "temperature": g.temperature,
                      "max_new_bytes": g.max_new_bytes}}
