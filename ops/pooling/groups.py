"""Boundaries -> groups, pooling and upsampling with a static capacity (specs/token_free.md §5.1, §19.2).

Conventions (dynamic pooling's `shortening.py`, spec §5.1):
  * boundaries b [B, T] in {0, 1}: b_t = 1 means the group ends at byte t (byte t is the last byte of its
    group; the next group starts at t + 1). So a whitespace boundary is at the space itself (§5.2).
  * group of byte t: the exclusive cumsum g_t = sum_{i<t} b_i (0-based). Groups 0 .. n-1, n = sum_t b_t,
    are complete; bytes after the last boundary form an incomplete trailing group n.
  * slots: pooled vectors live in S = `capacity` slots per row. Slot 0 is the null group (dynamic
    pooling's learnable s_null, prepended to the pooled groups); group j is slot j + 1. So
    s = [s_null; Pool(h)] has S slots and at most S - 1 groups are stored.
  * upsampling reads one slot per byte, exactly causally:
      rule "inclusive" (§5.1, the default): byte t reads slot c_t = sum_{i<=t} b_i, the last group complete
        at t (its own group when b_t = 1), or the null slot 0 before the first boundary. Causal when b_t is
        decided by bytes <= t (whitespace, fixed, spacelike, a boundary predictor on the prefix).
      rule "exclusive" (§4.4, HAT's p_{w(t)-1}): byte t reads slot g_t, the group before its own (null for
        the first group). Causal when a group's end is only known once the next byte arrives (b_t depends
        on byte t + 1); b_t is never used at t. When it is known later still (HAT words: once the whole
        character that opens the next word is in), `known` delays each boundary for the reads.
  * overflow: a byte whose read slot is >= S has no stored group to read. Pooling drops the bytes of
    groups that do not fit (g_t + 1 >= S); upsampling reads slot S - 1 for an overflow byte (the last stored
    group, complete before t, so still causal) or the null slot ("null"); `Groups.overflow` [B, T] flags
    those bytes so that the model masks their loss and counts them (SpaceByte §11.1: the loss on bytes
    inside patches beyond T_global is ignored; with S = T_global + 1 the flags are exactly those bytes).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

RULES = ("inclusive", "exclusive")
MODES = ("mean", "sum", "last")
IMPLS = ("segment_sum", "onehot")
OVERFLOW = ("clamp", "null")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["exclusive", "inclusive", "reads", "counts", "overflow"],
                   meta_fields=["capacity", "rule"])
@dataclasses.dataclass(frozen=True)
class Groups:
  """Group ids of a boundary vector (a pytree; capacity and rule are static).

  exclusive [B, T] int32: g_t = sum_{i<t} b_i, the group of byte t (its slot is g_t + 1).
  inclusive [B, T] int32: c_t = sum_{i<=t} b_i, the number of groups complete at t.
  reads     [B, T] int32: the slot byte t reads in `upsample` before overflow handling: c_t ("inclusive")
                          or g_t ("exclusive"), counted over `known` when given.
  counts    [B]    int32: n = sum_t b_t, complete groups per row (also those beyond capacity).
  overflow  [B, T] bool:  reads >= capacity.
  capacity: S, slots per row including the null slot 0.   rule: "inclusive" or "exclusive".
  """
  exclusive: jax.Array
  inclusive: jax.Array
  reads: jax.Array
  counts: jax.Array
  overflow: jax.Array
  capacity: int
  rule: str


def group_ids(boundaries: jax.Array, capacity: int, *, rule: str = "inclusive",
              known: jax.Array | None = None) -> Groups:
  """Boundaries b [B, T] (bool or {0, 1}; b_t = 1: the group ends at t) -> `Groups` (spec §5.1, §19.2).

  g = cumsum(b) - b (exclusive), c = cumsum(b) (inclusive), n = sum(b); capacity S >= 1 slots, slot 0 the
  null group; reads = c ("inclusive") or g ("exclusive"); overflow = reads >= S.
  known [B, T]: the same boundaries at the byte where the reader learns them, when that is later than the
  boundary itself (each moved to the same or a later byte, never earlier); reads then count known instead
  of b. `hat_word_boundaries(..., known=True)` gives it: a word ends before the character that opens the
  next word, which is only known once that character's last byte is in.
  """
  if boundaries.ndim != 2:
    raise ValueError(f"boundaries must be [B, T], got shape {boundaries.shape}.")
  if capacity < 1:
    raise ValueError(f"capacity must be >= 1 (slot 0 is the null group), got {capacity}.")
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
  if known is not None and known.shape != boundaries.shape:
    raise ValueError(f"known {known.shape} must have the shape of boundaries {boundaries.shape}.")

  def cumsums(b):
    b = (b != 0).astype(jnp.int32)
    inclusive = jnp.cumsum(b, axis=1, dtype=jnp.int32)
    return inclusive - b, inclusive

  exclusive, inclusive = cumsums(boundaries)
  read_exclusive, read_inclusive = (exclusive, inclusive) if known is None else cumsums(known)
  reads = read_inclusive if rule == "inclusive" else read_exclusive
  return Groups(exclusive=exclusive, inclusive=inclusive, reads=reads, counts=inclusive[:, -1],
                overflow=reads >= capacity, capacity=capacity, rule=rule)


def _scatter(values: jax.Array, slots: jax.Array, num_slots: int, impl: str) -> jax.Array:
  """sum_t values[b, t] into slot slots[b, t] -> [B, num_slots, D] f32; slots == num_slots are dropped."""
  if impl == "segment_sum":
    scatter = jax.vmap(functools.partial(jax.ops.segment_sum, num_segments=num_slots + 1))
    return scatter(values.astype(jnp.float32), slots)[:, :num_slots]
  onehot = (slots[..., None] == jnp.arange(num_slots)).astype(values.dtype)  # [B, T, S]
  return jnp.einsum("bts,btd->bsd", onehot, values, preferred_element_type=jnp.float32)


def pool(x: jax.Array, groups: Groups, *, mode: str = "mean", impl: str = "segment_sum",
         null: jax.Array | None = None, boundaries: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Pools x [B, T, D] over each group -> (pooled [B, S, D] in x.dtype, valid [B, S] bool), S = capacity.

  pooled[:, 0] is the null slot (`null` [D], zeros when None); pooled[:, j + 1] pools group j (spec §5.1's
  s = [s_null; MeanPool(h, b)]): "mean" (dynamic pooling), "sum", or "last" (the group's last byte in the
  window, SpaceByte's gather of x at its global positions when b marks them). The incomplete trailing
  group is pooled too (its last byte is byte T - 1); no byte ever reads it. Bytes of groups j >= S - 1
  are dropped. valid: slot 0, and every slot holding at least one byte.
  impl: "segment_sum" (`jax.ops.segment_sum` vmapped over the batch) or "onehot" (a [T, S] one-hot
  matmul per row, MXU-friendly; §19.2); they are equal up to f32 rounding order.
  boundaries [B, T] float (optional): the boundaries `groups` was built from as floats whose forward values
  are those 0/1, e.g. a straight-through estimate (`ops.pooling.learned`); then the pooled groups are
  differentiable w.r.t. them, as dynamic pooling's one-hot (B, T, S) matrix normalised over T (§5.1):
  entry (t, g_t + 1) is 1 - (j - g~_t) with j = g_t the hard group and g~_t = sum_{i<t} b_i from the float
  b, 1 in the forward pass, so d entry / d b_i = 1 for i < t. Both impls apply it as a per-byte weight
  w_t = 1 + (g~_t - stopgrad(g~_t)) on x and on the counts (the same matrix, one nonzero per row):
  "mean" pools sum_t w_t h_t / sum_t w_t, so d pooled_j / d b_i = sum_{t in j, t > i} (h_t - pooled_j) / n_j.
  Upsampling has no such path (dynamic pooling's upsampling matrix, normalised over S, has zero gradient).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
  if x.shape[:2] != groups.exclusive.shape:
    raise ValueError(f"x {x.shape} must be [B, T, D] with [B, T] = {groups.exclusive.shape}.")
  num_slots = groups.capacity
  slots = groups.exclusive + 1
  slots = jnp.where(slots < num_slots, slots, num_slots)
  ones = jnp.ones(x.shape[:2] + (1,), x.dtype)
  if boundaries is not None:
    if boundaries.shape != groups.exclusive.shape:
      raise ValueError(f"boundaries {boundaries.shape} must be [B, T] = {groups.exclusive.shape}.")
    b = boundaries.astype(jnp.float32)
    soft_groups = jnp.cumsum(b, axis=1) - b
    weight = (1.0 + (soft_groups - jax.lax.stop_gradient(soft_groups)))[..., None]  # forward: exactly 1
    ones, x = ones * weight, x * weight.astype(x.dtype)
  counts = _scatter(ones, slots, num_slots, impl)  # [B, S, 1]
  if mode == "last":
    is_last = (groups.inclusive > groups.exclusive).at[:, -1].set(True)  # b_t, or the window's last byte
    x = jnp.where(is_last[..., None], x, jnp.zeros((), x.dtype))
  pooled = _scatter(x, slots, num_slots, impl)
  if mode == "mean":
    pooled = pooled / jnp.where(counts > 0, counts, 1.0)  # not maximum: its gradient at counts == 1 is 1/2
  null = jnp.zeros(x.shape[-1:], jnp.float32) if null is None else null.astype(jnp.float32)
  pooled = pooled.at[:, 0].set(jnp.broadcast_to(null, pooled.shape[:1] + pooled.shape[2:]))
  valid = (counts[..., 0] > 0).at[:, 0].set(True)
  return pooled.astype(x.dtype), valid


def upsample(pooled: jax.Array, groups: Groups, *, overflow: str = "clamp") -> jax.Array:
  """Slot vectors pooled [B, S, D] -> per byte [B, T, D]: byte t gets pooled[:, read_t] (module docstring).

  read_t = c_t ("inclusive", spec §5.1: u_t = s'[sum_{i<=t} b_i], index 0 = null) or g_t ("exclusive").
  Overflow bytes (read_t >= S, `groups.overflow`) read slot S - 1 ("clamp") or the null slot 0 ("null");
  either way the output at t depends on no byte after t when every slot is a causal function of its
  group's bytes and the slots before it.
  """
  if overflow not in OVERFLOW:
    raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}.")
  if pooled.shape[1] != groups.capacity or pooled.shape[0] != groups.exclusive.shape[0]:
    raise ValueError(f"pooled {pooled.shape} must be [B, S, D] with B = {groups.exclusive.shape[0]}, "
                     f"S = capacity = {groups.capacity}.")
  fallback = groups.capacity - 1 if overflow == "clamp" else 0
  index = jnp.where(groups.overflow, fallback, groups.reads)
  return jnp.take_along_axis(pooled, index[..., None], axis=1)
