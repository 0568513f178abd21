"""Rule-based boundary sources over ByT5 ids, as pure jnp functions (specs/token_free.md §5.2, §11.1).

Input: ids int [B, T] in the ByT5 layout (data/bytes.py: 0 pad, 1 eos, 2 unk, byte b is id b + 3; ids >= 259
are extra specials). Output: b bool [B, T] with the §5.1 convention, b_t = 1: the group ends at byte t
(`ops.pooling.group_ids`). Each b_t depends only on ids <= t, so these pair with the "inclusive"
upsampling rule. Common to all sources:
  * EOS ends a group (b = 1 at every EOS, `eos_boundary=True`): the EOS is the last byte of its document's
    last group, so documents never share a group; it plays SpaceByte's "also every BOS" (§11.1).
  * PAD is never a boundary: padding joins the trailing group.
The HAT word rule (§4.1) is host-side: `ops.pooling.hat_split.hat_word_boundaries`.
"""

import jax
import jax.numpy as jnp

# The ByT5 id layout of data/bytes.py, restated so that ops/ does not import the data pipeline.
PAD_ID, EOS_ID, BYTE_OFFSET, VOCAB_SIZE = 0, 1, 3, 259


def is_byte_id(ids: jax.Array) -> jax.Array:
  """Whether each id encodes a byte (3 <= id < 259); works on numpy and jax arrays."""
  return (ids >= BYTE_OFFSET) & (ids < VOCAB_SIZE)


def _finish(b: jax.Array, ids: jax.Array, eos_boundary: bool) -> jax.Array:
  if eos_boundary:
    b = b | (ids == EOS_ID)
  return b & (ids != PAD_ID)


def fixed_boundaries(ids: jax.Array, k: int, *, eos_boundary: bool = True) -> jax.Array:
  """Every k-th byte (§5.2 `fixed_sf`, dynamic pooling's boundaries[:, ::k] = 1): b_t = 1[t mod k == 0].

  So group 0 is byte 0 alone and group m >= 1 is bytes (m-1)k+1 .. mk: with the inclusive rule, byte t reads
  the group of bytes up to k floor(t / k), Hourglass's shift by k - 1 (§6, `ops.pooling.fixed`).
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  b = jnp.broadcast_to(jnp.arange(ids.shape[-1]) % k == 0, ids.shape)
  return _finish(b, ids, eos_boundary)


def whitespace_boundaries(ids: jax.Array, *, chars: bytes = b" ", eos_boundary: bool = True) -> jax.Array:
  """b_t = 1[x_t is whitespace] (§5.2): b = 1 at the space, i.e. the group ends with the space (the
  boundary is after it), so the model closes the group as soon as it produces one. Whitespace is the space byte 0x20 only, as
  dynamic pooling's `data == whitespace_id`; `chars` widens it (e.g. b" \\t\\n\\r")."""
  b = jnp.isin(ids, jnp.asarray([c + BYTE_OFFSET for c in chars], ids.dtype))
  return _finish(b, ids, eos_boundary)


def is_spacelike(ids: jax.Array) -> jax.Array:
  """SpaceByte's spacelike(b) (§11.1, `spacebyte.py` patch_method "utf8"), over ids -> bool, same shape:
  b < '0' or '9' < b < 'A' or 'Z' < b < 'a' or 'z' < b < 0x80 or b >= 0xC0 — i.e. not an ASCII letter or
  digit and not a UTF-8 continuation byte (0x80-0xBF); leading bytes of multi-byte characters are
  spacelike. Special ids (PAD, EOS, UNK, ids >= 259) are spacelike, like SpaceByte's BOS byte 255."""
  x = ids - BYTE_OFFSET
  spacelike = ((x < ord("0")) | ((ord("9") < x) & (x < ord("A"))) | ((ord("Z") < x) & (x < ord("a")))
               | ((ord("z") < x) & (x < 0x80)) | (x >= 0xC0))
  return spacelike | ~is_byte_id(ids)


def spacelike_boundaries(ids: jax.Array, *, eos_boundary: bool = True) -> jax.Array:
  """SpaceByte's global positions (§11.1): b_t = spacelike(x_t) and not spacelike(x_{t-1}); b_0 =
  spacelike(x_0) (`use_global[:, 1:] &= ~use_global[:, :-1]`), and every EOS (their BOS). So the global
  step runs at the first byte of each spacelike run; CJK text gets one per character (its leading bytes
  are spacelike, its continuation bytes are not). With capacity S = T_global + 1, `pool(mode="last")`
  gathers SpaceByte's x[idx] into slots 1 .. min(n, T_global) and `Groups.overflow` is its ignored-loss
  mask (targets from the (T_global + 1)-th global position on)."""
  spacelike = is_spacelike(ids)
  b = spacelike.at[..., 1:].set(spacelike[..., 1:] & ~spacelike[..., :-1])
  return _finish(b, ids, eos_boundary)
