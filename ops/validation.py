"""Argument checks and canonicalisation shared by the op entry points (`ops.attention`, `ops.landmark`,
`ops.selective`, `ops.gla`).

The checks raise ValueError with one sentence naming the argument, the expected form and what was given;
the messages are part of the ops' behaviour (tests match them), so each op keeps exactly the wording it
had: where ops word a check differently, the wording is a parameter. `sequence_args` brings positions
and segment ids to the canonical int32 [B, L] form every implementation takes (traced: call it inside
the op's jitted `_call`).
"""

from typing import Any

import jax
import jax.numpy as jnp


def check_int(name: str, x: Any, shape: tuple[int, ...]) -> None:
  """Validates an integer [B, L] array ([L] is also accepted and broadcast over the batch)."""
  x_shape, x_dtype = jnp.shape(x), jnp.result_type(x)
  if x_shape not in (shape, shape[1:]) or not jnp.issubdtype(x_dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array of shape {shape} (batch, length), "
                     f"got {x_dtype} {x_shape}.")


def int_or_none(x: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
  """x broadcast to `shape` as int32, or None."""
  return None if x is None else jnp.broadcast_to(x, shape).astype(jnp.int32)


def check_rank4(named: tuple[tuple[str, jax.Array], ...], float_word: str | None = None) -> None:
  """Each (name, x) must have rank 4 ([batch, length, heads, head_dim]) and, with `float_word` (how the
  op words it: "float", "floating-point"), a floating dtype."""
  for arg_name, x in named:
    if x.ndim != 4:
      raise ValueError(f"{arg_name} must have rank 4 ([batch, length, heads, head_dim]), "
                       f"got shape {x.shape}.")
    if float_word is not None and not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{arg_name} must be a {float_word} array, got {x.dtype}.")


def check_heads(h: int, hkv: int) -> None:
  """The query heads must be a (nonzero) multiple of the kv heads (GQA / MQA)."""
  if hkv == 0 or h % hkv:
    raise ValueError(f"The number of query heads ({h}) must be a multiple of the number of kv heads "
                     f"({hkv}).")


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  """q [B, T, H, D] against k, v [B, S, Hkv, D] (all rank 4 already): shapes, batch, head_dim, heads."""
  b, _, h, d = q.shape
  hkv = k.shape[2]
  if v.shape != k.shape:
    raise ValueError(f"k and v must have the same shape [B, S, Hkv, D], got {k.shape} and {v.shape}.")
  if k.shape[0] != b:
    raise ValueError(f"q and k must have the same batch size, got {b} and {k.shape[0]}.")
  if k.shape[3] != d:
    raise ValueError(f"q and k must have the same head_dim, got {d} and {k.shape[3]}.")
  check_heads(h, hkv)


def check_segments(segment_ids: Any, kv_segment_ids: Any, b: int, t: int, s: int,
                   check=check_int) -> None:
  """segment_ids [B, T] and kv_segment_ids [B, S] (given only with segment_ids; without it S == T).

  `check(name, x, shape)` validates one integer array (`check_int` unless the op words it otherwise)."""
  if segment_ids is None:
    if kv_segment_ids is not None:
      raise ValueError("kv_segment_ids requires segment_ids (the query segments).")
  else:
    check("segment_ids", segment_ids, (b, t))
    if kv_segment_ids is not None:
      check("kv_segment_ids", kv_segment_ids, (b, s))
    elif s != t:
      raise ValueError(f"segment_ids without kv_segment_ids needs as many keys as queries, got "
                       f"T={t} and S={s}; pass kv_segment_ids of shape ({b}, {s}).")


def check_block_sizes(block_sizes: Any, cls: type) -> None:
  """block_sizes must be None or an instance of the op's BlockSizes class."""
  if block_sizes is not None and not isinstance(block_sizes, cls):
    raise ValueError(f"block_sizes must be a BlockSizes or None, got {type(block_sizes).__name__}.")


def sequence_args(b: int, t: int, s: int, q_positions, kv_positions, segment_ids,
                  kv_segment_ids) -> dict[str, jax.Array | None]:
  """Canonical int32 [B, L] q_positions, kv_positions, segment_ids, kv_segment_ids (as keywords).

  Defaults: q_positions = arange(T) + (S - T) (queries aligned to the end of the keys), kv_positions =
  arange(S), kv_segment_ids = segment_ids; segment ids stay None when segment_ids is None.
  """
  if q_positions is None:
    q_positions = jnp.arange(t, dtype=jnp.int32) + (s - t)
  if kv_positions is None:
    kv_positions = jnp.arange(s, dtype=jnp.int32)
  if segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = segment_ids
  return dict(q_positions=int_or_none(q_positions, (b, t)), kv_positions=int_or_none(kv_positions, (b, s)),
              segment_ids=int_or_none(segment_ids, (b, t)),
              kv_segment_ids=int_or_none(kv_segment_ids, (b, s)))


def check_positions(q_positions: Any, kv_positions: Any, b: int, t: int, s: int) -> None:
  """q_positions [B, T] and kv_positions [B, S] integer arrays, each optional."""
  if q_positions is not None:
    check_int("q_positions", q_positions, (b, t))
  if kv_positions is not None:
    check_int("kv_positions", kv_positions, (b, s))


def is_positive_int(value: Any) -> bool:
  # bool is an int subclass; reject it so `BlockSizes(True, ...)` is not silently a block of 1.
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive_int_fields(obj: Any, names: tuple[str, ...]) -> None:
  """For a BlockSizes dataclass's __post_init__: each field in `names` must be a positive int."""
  for name in names:
    value = getattr(obj, name)
    if not is_positive_int(value):
      raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}.")
