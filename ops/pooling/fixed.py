"""Fixed-size shortening by reshapes: Hourglass (specs/token_free.md §6) and MEGABYTE (§10.1) patches.

Convention: the model's output at byte t predicts byte t + 1 (the repo's inputs/targets), so a patch may
use byte t at position t. Shifting right by k - 1 before shortening is then the minimal shift that keeps
upsampling causal (Hourglass §6: patch m pools bytes mk - k + 1 .. mk and serves positions mk .. mk + k - 1;
spacebyte's MEGABYTE folds its byte shift into the targets the same way by prepending P - 1 BOS bytes).
Patch 0 holds k - 1 pad vectors and byte 0. The general group machinery with
`fixed_boundaries(ids, k)` forms the same groups m >= 1 (it pools group 0 = byte 0 without the pads).
"""

import jax
import jax.numpy as jnp


def shift_right(x: jax.Array, n: int, pad: jax.Array | None = None) -> jax.Array:
  """x [B, T, ...] shifted right by n along T: out[:, t] = x[:, t - n] for t >= n, `pad` (broadcast to
  x.shape[2:], zeros when None) for t < n."""
  if n == 0:
    return x
  if not 0 < n <= x.shape[1]:
    raise ValueError(f"shift n must be in [0, {x.shape[1]}], got {n}.")
  fill = jnp.zeros(x.shape[2:], x.dtype) if pad is None else pad.astype(x.dtype)
  fill = jnp.broadcast_to(fill, (x.shape[0], n) + x.shape[2:])
  return jnp.concatenate([fill, x[:, :-n]], axis=1)


def fixed_pool(x: jax.Array, k: int, *, mode: str = "mean", pad: jax.Array | None = None) -> jax.Array:
  """Shorten(ShiftRight(x, k - 1), k) for x [B, T, D], T % k == 0 (§6):
  "mean" -> [B, T/k, D], Hourglass AvgPool (patch 0 averages k - 1 pads with byte 0);
  "concat" -> [B, T/k, k D], the patch's k vectors concatenated (Hourglass LinearPool's input, and
  MEGABYTE's global input h^g-in_m = concat(h_{mk-k+1} .. h_{mk}) in this shifted form, §10.1)."""
  b, t, d = x.shape
  if k < 1 or t % k:
    raise ValueError(f"k must be >= 1 and divide the length {t}, got {k}.")
  patches = shift_right(x, k - 1, pad).reshape(b, t // k, k, d)
  if mode == "mean":
    return jnp.mean(patches.astype(jnp.float32), axis=2).astype(x.dtype)
  if mode == "concat":
    return patches.reshape(b, t // k, k * d)
  raise ValueError(f"mode must be 'mean' or 'concat', got {mode!r}.")


def fixed_upsample(y: jax.Array, k: int) -> jax.Array:
  """Patches y [B, T/k, ...] -> [B, T, ...], each repeated k times (Hourglass's repeat upsampling): byte t
  reads patch t // k, which holds bytes <= k (t // k) <= t after `fixed_pool`'s shift."""
  return jnp.repeat(y, k, axis=1)
