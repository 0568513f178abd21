"""Offsets, concatenation pooling, per-offset upsampling and slot attention masks (specs/token_free.md
§4.3, §6, §8, §10.1) on top of `ops.pooling.groups` (its conventions: b_t = 1 ends a group at t, slot 0 is
the null group, slot j + 1 holds group j).

Two offsets per byte:
  * group offset q_t: byte t's place in its own group, t - (first byte of group g_t). Concatenation
    pooling puts byte t at q_t of its slot's vector (Hourglass LinearPool, MEGABYTE's h^g-in, LYT's
    canvas), so a slot is [h at q = 0, ..., h at q = width - 1] with zeros after the group's last byte.
  * read offset o_t: t - r_t, where r_t is the byte at which byte t's read slot became readable (the
    boundary byte under the inclusive rule; a document's first run starts at r = its first byte - 1, the
    null slot's virtual boundary). MEGABYTE's local position p (§10.1): with fixed patches (b_t = 1[t mod
    P == 0], its shifted form) byte t reads slot t // P + 1 at o_t = t mod P, the boundary byte at p = 0
    (predicted from the global state and E^l-pad alone) and the next P - 1 bytes after it. A document whose
    first byte is no boundary starts its null-slot run at o = 1 (p = 0 would predict byte 0, which no
    target asks for).
Runs of equal reads within a document are the "patches" a local model (MEGABYTE, LYT's word decoder)
sees on its own: `run_ids` numbers them.
"""

import jax
import jax.numpy as jnp

from ops.pooling.groups import Groups


def _run_starts(values: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """[B, T] bool: t = 0, values_t != values_{t-1}, or a new segment."""
  changed = jnp.concatenate([jnp.ones_like(values[:, :1], bool), values[:, 1:] != values[:, :-1]], axis=1)
  if segment_ids is not None:
    changed |= jnp.concatenate([jnp.ones_like(values[:, :1], bool),
                                segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return changed


def _offsets_from(starts: jax.Array, origin: jax.Array) -> jax.Array:
  """t - (the latest origin_s over s <= t with starts_s) [B, T] int32."""
  t = jnp.arange(starts.shape[1], dtype=jnp.int32)
  latest = jax.lax.cummax(jnp.where(starts, origin, -2 ** 30), axis=1)
  return t - latest


def group_offsets(groups: Groups, segment_ids: jax.Array | None = None) -> jax.Array:
  """q_t = t - (first byte of byte t's group) [B, T] int32 (a document start also starts a group)."""
  starts = _run_starts(groups.exclusive, segment_ids)
  return _offsets_from(starts, jnp.arange(starts.shape[1], dtype=jnp.int32))


def read_offsets(reads: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """o_t = t - r_t [B, T] int32 for the slots actually read, reads [B, T] (module docstring): a change
  of read slot starts a run at o = 0; a document's (or row's) first run, which reads the null slot 0,
  starts at o = 1."""
  t = jnp.arange(reads.shape[1], dtype=jnp.int32)
  starts = _run_starts(reads, segment_ids)
  null_start = starts & (reads == 0)
  return _offsets_from(starts, jnp.where(null_start, t - 1, t))


def run_ids(reads: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """Ids [B, T] int32 >= 1 of the runs of equal reads within a document (a segment change starts one)."""
  return jnp.cumsum(_run_starts(reads, segment_ids), axis=1, dtype=jnp.int32)


def concat_pool(x: jax.Array, groups: Groups, width: int, segment_ids: jax.Array | None = None,
                null: jax.Array | None = None) -> jax.Array:
  """x [B, T, D] -> slots [B, S, width * D]: slot j + 1 = concat(h at group offsets 0 .. width - 1 of
  group j), zeros past the group's end; bytes at offsets >= width are left out. Slot 0 = `null`
  [width * D] (zeros when None). MEGABYTE's h^g-in_k = concat(h^emb of patch k - 1) (§10.1) when the
  groups are fixed patches of width bytes; Hourglass's LinearPool input (§6)."""
  b, t, d = x.shape
  if width < 1:
    raise ValueError(f"width must be >= 1, got {width}.")
  s = groups.capacity
  offsets = group_offsets(groups, segment_ids)
  slots = groups.exclusive + 1
  index = jnp.where((slots < s) & (offsets < width), slots * width + offsets, s * width)  # dropped: past end
  flat = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=s * width + 1))(x, index)
  pooled = flat[:, :s * width].reshape(b, s, width * d)
  fill = jnp.zeros((width * d,), x.dtype) if null is None else null.astype(x.dtype)
  return pooled.at[:, 0].set(jnp.broadcast_to(fill, (b, width * d)))


def offset_slices(y: jax.Array, offsets: jax.Array, width: int) -> jax.Array:
  """y [B, T, width * D] (a slot vector gathered per byte) -> [B, T, D]: slice offsets_t of each row
  (Hourglass LinearUpsampling's reshape to k vectors, MEGABYTE's h^g-out_{k, pD:(p+1)D}); zeros where
  offsets_t >= width (a patch longer than the width)."""
  b, t, wd = y.shape
  if wd % width:
    raise ValueError(f"the last dim {wd} must be a multiple of width {width}.")
  parts = y.reshape(b, t, width, wd // width)
  index = jnp.clip(offsets, 0, width - 1)[..., None, None]
  out = jnp.take_along_axis(parts, index, axis=2)[:, :, 0]
  return jnp.where((offsets < width)[..., None], out, jnp.zeros((), y.dtype))


def pooling_mask(groups: Groups) -> jax.Array:
  """[B, S, T] bool: slot j + 1 attends to the bytes of group j (attention pooling, HAT's connector);
  the null slot 0 to none."""
  slots = groups.exclusive + 1
  return slots[:, None, :] == jnp.arange(groups.capacity, dtype=jnp.int32)[None, :, None]


def upsampling_mask(reads: jax.Array, slot_segments: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """[B, T, S] bool: byte t attends to the slots it may read, 0 < slot <= reads_t of its own document,
  and always to the null slot 0 (Hourglass attention upsampling over the shortened sequence, §6).
  reads [B, T]: the slot byte t reads (clamped to S - 1 for overflow bytes)."""
  s = slot_segments.shape[1]
  slot = jnp.arange(s, dtype=jnp.int32)
  same = slot_segments[:, None, :] == segment_ids[:, :, None]
  return (slot == 0) | ((slot[None, None] <= reads[..., None]) & same)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     scale: float | None = None) -> jax.Array:
  """softmax(scale q k^T + mask) v for q [B, Q, H, Dh], k, v [B, K, H, Dh], mask [B, Q, K] bool ->
  [B, Q, H, Dh]; a query with no visible key gets 0. Dense over Q x K: the masks here pair queries with
  keys of another sequence (slots with bytes), small (S x T) and not the q/kv-position pattern of
  `ops.attention`."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask[:, None], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32
                    ).astype(q.dtype)
