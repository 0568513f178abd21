"""Tiling helpers shared by the blockwise pure-JAX ("xla") implementations, and the integer arithmetic and
padding the Pallas wrappers use too.

The blockwise attention ops (`ops.attention.xla`, `ops.landmark.xla`) cut [B, T, H, D] queries into
`nq` tiles of `bq` rows and [B, S, Hkv, D] keys into `nk` tiles of `bkv` slots, with the tile index
leading so that `lax.map` / `lax.scan` walk the tiles; lengths are zero-padded to whole tiles and the
padding is masked through `valid_tiles`. Query tiles split the heads into [Hkv, G] (G = H // Hkv, the
GQA group) so a query tile meets the kv head of its group by broadcasting. `online_softmax_scan` is the
key-tile scan of one query tile in their forwards (the per-tile update is each op's own).
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import cdiv  # noqa: F401  (re-exported: ceil(a / b))


def round_up(x: int, multiple: int) -> int:
  return cdiv(x, multiple) * multiple


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """Pads `axis` of x at the end with `value` up to `size` (x itself when it already has that size)."""
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def q_tiles(x: jax.Array, hkv: int, bq: int, nq: int) -> jax.Array:
  """[B, T, H, ...] -> [nq, B, Hkv, G, bq, ...] (T zero-padded to nq * bq)."""
  x = pad_axis(x, 1, nq * bq)
  b, _, h = x.shape[:3]
  x = x.reshape(b, nq, bq, hkv, h // hkv, *x.shape[3:])
  return jnp.moveaxis(x, (1, 2), (0, 4))


def q_untile(x: jax.Array, t: int) -> jax.Array:
  """Inverse of `q_tiles`: [nq, B, Hkv, G, bq, D] -> [B, T, H, D]."""
  nq, b, hkv, g, bq, d = x.shape
  x = jnp.moveaxis(x, (0, 4), (1, 2)).reshape(b, nq * bq, hkv * g, d)
  return x[:, :t]


def kv_tiles(x: jax.Array, bkv: int, nk: int) -> jax.Array:
  """[B, S, Hkv, D] -> [nk, B, Hkv, bkv, D] (S zero-padded to nk * bkv)."""
  x = pad_axis(x, 1, nk * bkv)
  b, _, hkv, d = x.shape
  return jnp.moveaxis(x.reshape(b, nk, bkv, hkv, d), (1, 2), (0, 3))


def kv_untile(x: jax.Array, s: int) -> jax.Array:
  """Inverse of `kv_tiles`: [nk, B, Hkv, bkv, D] -> [B, S, Hkv, D]."""
  nk, b, hkv, bkv, d = x.shape
  return jnp.moveaxis(x, (0, 3), (1, 2)).reshape(b, nk * bkv, hkv, d)[:, :s]


def seq_tiles(x: jax.Array | None, blk: int, n: int) -> jax.Array | None:
  """[B, L] -> [n, B, blk] for positions / segment ids (padding is masked by validity)."""
  if x is None:
    return None
  x = pad_axis(x, 1, n * blk)
  return jnp.moveaxis(x.reshape(x.shape[0], n, blk), 1, 0)


def valid_tiles(length: int, blk: int, n: int) -> jax.Array:
  """[n, blk] bool: False on the padding added to reach n * blk."""
  return (jnp.arange(n * blk) < length).reshape(n, blk)


def softmax_start(mask_value: float, softmax1: bool) -> tuple[float, float]:
  """Initial running (max m, normaliser l) of an online softmax: (mask_value, 0), or (0, 1) for softmax1,
  whose virtual key (logit 0, value 0) is then in the state from the start: the final l is
  sum_j exp(a_j - m) + exp(-m) with m = max(0, max_j a_j), and a row that sees no key keeps l = 1, o = 0."""
  return (0.0, 1.0) if softmax1 else (mask_value, 0.0)


def online_softmax_scan(kv_step, kv_xs, rows: tuple[int, ...], d: int, mask_value: float, dtype,
                        softmax1: bool = False):
  """The forward of one query tile: `lax.scan` of `kv_step` over the key tiles `kv_xs`, then normalise.

  The carry is the online-softmax state (m, l, acc) in f32: running max m and normaliser l of shape
  `rows` (e.g. [B, Hkv, G, bq]), starting at `softmax_start(mask_value, softmax1)` (a finite mask_value,
  so exp(m - m') stays finite), and the unnormalised output acc [*rows, d], starting at 0. Returns
  (o = acc / l in `dtype`, lse = m + log l), both 0 on rows with l = 0 (nothing in the normaliser).
  """
  m0, l0 = softmax_start(mask_value, softmax1)
  init = (jnp.full(rows, m0, jnp.float32), jnp.full(rows, l0, jnp.float32),
          jnp.zeros((*rows, d), jnp.float32))
  (m, l, acc), _ = jax.lax.scan(kv_step, init, kv_xs)
  has_key = l > 0.0
  l_safe = jnp.where(has_key, l, 1.0)
  o_tile = (acc / l_safe[..., None]).astype(dtype)
  lse = jnp.where(has_key, m + jnp.log(l_safe), 0.0)
  return o_tile, lse
