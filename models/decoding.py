"""Autoregressive generation for any module with a decode cache (`decode=True`, the `cache` collection).

The module is called as `module.apply({"params", "cache"}, ids [B, N], mutable=["cache"]) -> logits
[B, N, V]`; a family's `generate` calls `generate` here with its decode-mode module.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def init_cache(model: nn.Module, batch_size: int, max_len: int) -> Any:
  """Zero decode cache for `model` (which must have decode=True), for sequences up to max_len tokens."""
  dummy = jnp.zeros((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


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
def generate(model: nn.Module, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new: int,
             temperature: float = 0.0, top_k: int = 0) -> jax.Array:
  """prompt [B, P] ids -> [B, max_new] new ids. `model` must be built with decode=True.

  The prompt is prefilled in one call, then one token per step; every step reuses the cache.
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


@functools.partial(jax.jit, static_argnames=("model", "max_new", "temperature", "top_k"))
def generate_by_recompute(model: nn.Module, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new: int,
                          temperature: float = 0.0, top_k: int = 0) -> jax.Array:
  """prompt [B, P] ids -> [B, max_new] new ids, for a causal model without a decode cache.

  Every step runs the whole forward on a fixed [B, P + max_new] buffer (one compiled program; positions
  after the current one hold padding, which a causal model never reads) and samples at the current one.
  """
  batch, prompt_len = prompt.shape
  buffer = jnp.zeros((batch, prompt_len + max_new), jnp.int32).at[:, :prompt_len].set(prompt)

  def body(i, carry):
    buffer, rng = carry
    logits = model.apply({"params": params}, buffer)
    rng, sub = jax.random.split(rng)
    nxt = sample_logits(jax.lax.dynamic_index_in_dim(logits, prompt_len + i - 1, axis=1, keepdims=False),
                        sub, temperature, top_k)
    return buffer.at[:, prompt_len + i].set(nxt), rng

  buffer, _ = jax.lax.fori_loop(0, max_new, body, (buffer, rng))
  return buffer[:, prompt_len:]


def _per_row(one_row: Any, prompt: jax.Array, rng: jax.Array) -> jax.Array:
  """one_row(prompt [P], rng) -> [N] over the rows of prompt [B, P], each with its own key; one row runs
  without vmap, so the model's conds stay conds (a vmapped cond runs both branches)."""
  if prompt.shape[0] == 1:
    return one_row(prompt[0], rng)[None]
  return jax.vmap(one_row)(prompt, jax.random.split(rng, prompt.shape[0]))


@functools.partial(jax.jit, static_argnames=("model", "max_new", "temperature", "top_k"))
def generate_stepwise(model: nn.Module, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new: int,
                      temperature: float = 0.0, top_k: int = 0) -> jax.Array:
  """prompt [B, P] ids -> [B, max_new] new ids, for a decode-mode model that takes one token of one row
  per call (models/hierarchical: its state is per row). Each row runs on its own (vmapped); the prompt
  is fed one token at a time too, so prefill and generation are the same step.
  """
  prompt_len = prompt.shape[1]
  cache = init_cache(model, 1, prompt_len + max_new)

  def step(cache, token):
    logits, mutated = model.apply({"params": params, "cache": cache}, token[None, None], mutable=["cache"])
    return mutated["cache"], logits[0, -1]

  def one_row(prompt_row, rng):
    row_cache, prompt_logits = jax.lax.scan(step, cache, prompt_row)
    rng, sub = jax.random.split(rng)
    first = sample_logits(prompt_logits[-1:], sub, temperature, top_k)[0]

    def body(carry, _):
      row_cache, token, rng = carry
      row_cache, logits = step(row_cache, token)
      rng, sub = jax.random.split(rng)
      nxt = sample_logits(logits[None], sub, temperature, top_k)[0]
      return (row_cache, nxt, rng), nxt

    _, rest = jax.lax.scan(body, (row_cache, first, rng), None, length=max_new - 1)
    return jnp.concatenate([first[None], rest])

  return _per_row(one_row, prompt, rng)


@functools.partial(jax.jit, static_argnames=("model", "max_new", "eot_id", "temperature", "top_k"))
def generate_with_end_of_token(model: nn.Module, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new: int,
                               eot_id: int, temperature: float = 0.0, top_k: int = 0) -> jax.Array:
  """prompt [B, P] bytes -> [B, max_new] new bytes, for a one-token-per-call decode-mode model whose stream
  has end-of-token tokens (models/hierarchical with end_of_token, Toucan). The prompt's bytes are fed one at
  a time, each followed by EOT where the model's boundary source proposes one (cache "proposed_end");
  generated EOTs are fed back but not returned. Once every slot is used ("slots_done" == the capacity) EOT
  is not sampled, as the parallel forward inserts none beyond the capacity."""
  prompt_len = prompt.shape[1]
  cache = init_cache(model, 1, prompt_len + max_new)
  capacity = cache["global_out"].shape[1]
  eot = jnp.full((), eot_id, jnp.int32)

  def step(cache, token):
    logits, mutated = model.apply({"params": params, "cache": cache}, token[None, None], mutable=["cache"])
    return mutated["cache"], logits[0, -1]

  def feed(carry, byte):
    cache, logits = step(carry[0], byte)
    closes = cache["proposed_end"][0] & (cache["slots_done"] < capacity)
    return jax.lax.cond(closes, lambda c: step(c, eot), lambda c: (c, logits), cache), None

  def one_row(prompt_row, rng):
    (row_cache, logits), _ = jax.lax.scan(feed, (cache, jnp.zeros((model.config.vocab_size,), jnp.float32)),
                                          prompt_row)

    def body(carry):
      row_cache, logits, rng, out, emitted = carry
      logits = jnp.where((jnp.arange(logits.shape[0]) == eot_id) & (row_cache["slots_done"] >= capacity),
                         -jnp.inf, logits)
      rng, sub = jax.random.split(rng)
      token = sample_logits(logits[None], sub, temperature, top_k)[0]
      is_byte = token != eot_id
      out = jnp.where(is_byte, out.at[emitted].set(token), out)
      row_cache, logits = step(row_cache, token)
      return row_cache, logits, rng, out, emitted + is_byte.astype(jnp.int32)

    init = (row_cache, logits, rng, jnp.zeros((max_new,), jnp.int32), jnp.zeros((), jnp.int32))
    return jax.lax.while_loop(lambda c: c[4] < max_new, body, init)[3]

  return _per_row(one_row, prompt, rng)

