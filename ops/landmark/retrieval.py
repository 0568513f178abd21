"""Landmark attention, inference form: top-k block retrieval from a KV cache (spec §2.4).

specs/attention_variants.md §2.4 (inference), §2.2 (grouped softmax), §2.8 (pitfalls).

Public entries: `retrieval_attention` (the attention output), `select_blocks` (which memory blocks each
query retrieves) and the stingy position mapping `stingy_landmark_positions` / `stingy_block_starts`.

Stream and cache. Positions are positions in the landmark-expanded stream (L = block_size counts the
landmark): position x is a landmark iff x % L == L - 1 and lies in block x // L. Cache slot s holds
position s; slots after the newest query are unfilled and never read (causal mask). Queries are the T
newest tokens, already written into the cache, at contiguous positions p.

Windows, per query at position p with block bq = p // L and m = max(bq - local_blocks, 0):
  LOCAL window: every slot s <= p of blocks >= bq - local_blocks (local_blocks=0: current block only);
    always attended. It comes from one static-size `dynamic_slice` of the cache per call,
    W = (ceil(T / L) + local_blocks + 1) * L slots from a block boundary (>= T + (local_blocks + 1) * L).
  MEMORY: the complete blocks b < m. Only these are retrieved.

Selection (spec §2.4 "Retrieval", code `lm_benchmark/models/caches/mem_cache.py::retrieve_for_query`):
score each memory block by its landmark key, P = softmax_b(scale * <q, k_{landmark b}>) over the memory
blocks, and keep the top_k blocks (all of them when fewer than top_k exist; surplus slots are masked).
`granularity`:
  "per_token_and_head" (default; matches training): a block set per (token, head); softmax is monotone,
    so this is the top_k of the logits.
  "max_over_heads": P max-reduced over the H query heads: one block set per token, shared by all heads.
  "max_over_tokens": P max-reduced over the T tokens of the call: one set per head per call. Within a
    chunk the tokens can have different memories (a block boundary inside the chunk); a token's P is 0
    on blocks outside its memory, candidates are the last token's memory (the union), and each token
    uses the chosen blocks that are in its own memory (the rest is in its local window or not yet
    complete), so a token may retrieve fewer than min(top_k, m) blocks. At T=1 this equals
    "per_token_and_head".

Guards (spec §2.8): finite stand-ins for -inf in maxima and zero-denominator checks, so a query with no
memory block, fewer than top_k of them, or a cache shorter than a block never gives NaN.

Attention (spec §2.2 closed form, §2.4 step 4): the grouped softmax over [retrieved blocks, local
window]. Retrieved blocks and the complete local blocks are "earlier blocks": their landmark score
joins the top group, their regular keys a within-block softmax; the current block's regular keys s <= p
join the top group and its landmark is masked (also for the landmark query itself). With s the scaled
scores:
  Z = sum_{current regular j} e^{s_j} + sum_{earlier blocks b} e^{s_{l_b}};
  w_j = e^{s_j} / Z (current);  w_j = (e^{s_{l_b}} / Z) * softmax_{j in b, regular}(s_j) (earlier);
  landmarks carry no value. With top_k >= m this is exactly `ops.landmark.landmark_attention` on the
  whole cache (the training-time form), so retrieval only approximates by dropping blocks (spec §2.8).

Positions (RoPE, spec §2.4 "Stingy position mapping", paper §3.2.1):
  rope_theta=None: q and cache_k are used as given (the caller rotated them) and nothing is mapped.
  rope_theta set: q and cache_k are UNROTATED (keys cached before RoPE) and RoPE (rotate-half layout, as
    `ops.rope.rope`) is applied here. The query and the local window keep their true positions.
    stingy=False: every key at its true position.
    stingy=True: the mapping of epfml/landmark-attention `llama/llama_mem.py::LlamaAttention.forward`
    (commit 111ee30e: the `mem_freq is not None` branch, the lines computing `top_k = min(cache_top_k,
    num_mems)`, `prefix_len`, `mem_indices`, `mem_pos` and `selected_indices`), with the local window
    start m * L in the role of its `full_len` and k = min(top_k, m) (so k=1 still reserves 2 blocks):
      prefix: the (k + 1) * L positions [(m - k - 1) * L, m * L) before the local window;
      scoring: the landmarks of the latest k memory blocks (b >= m - k) at their true slots
        b * L + L - 1; every older landmark at the first prefix slot's landmark, (m - k - 1) * L + L - 1;
        i.e. block b's landmark scores at max(b, m - k - 1) * L + L - 1 (`stingy_landmark_positions`);
      retrieval: the chosen blocks sorted by block index c_0 < c_1 < ..., block c_j laid out from
        (m - k - 1 + j + [c_j >= m - k]) * L (`stingy_block_starts`): older blocks from the left of the
        prefix, latest-k ones shifted one block right, which leaves an empty block between the groups.
        If the k latest blocks are chosen (or m <= top_k) every key keeps its true position.
    Positions can be negative (m < k + 1); only differences matter for RoPE. lm_benchmark's
    `MemLMCacheStorage.retrieve_for_query` (`mem_indices`, `k_indices`; queries from `start_index` of
    `MemLMCache.forward`) is the same layout once m >= top_k + 1, with k = top_k and the prefix at 0; for
    smaller m it keeps k = top_k and can place a landmark after the query, so the llama form is used.

Cost per call: landmark scores O(B * T * H * S / L); a gather of O(B * T * H * top_k * L * D) retrieved
keys and values; one local slice of O(B * W * Hkv * D); scores and weights of
O(B * T * H * (top_k * L + W)).
Never O(T * S * H); static shapes, jit-safe with traced positions. A cache length S that is not a
multiple of L (or is shorter than W) costs one pad copy of the cache.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ops.rope import rope
from ops.tiling import cdiv, round_up

__all__ = ["retrieval_attention", "select_blocks", "stingy_landmark_positions", "stingy_block_starts",
           "GRANULARITIES"]

GRANULARITIES = ("per_token_and_head", "max_over_heads", "max_over_tokens")

# Finite stand-in for -inf inside maxima, so empty groups never give inf - inf = NaN.
_MASK_VALUE = -1e30
_HIGHEST = jax.lax.Precision.HIGHEST


def stingy_landmark_positions(num_memory_blocks: jax.Array, *, top_k: int, block_size: int,
                              num_blocks: int) -> jax.Array:
  """Stingy scoring positions of the landmarks of blocks 0..num_blocks-1 (spec §2.4 step 2).

  Args:
    num_memory_blocks: int array [...], m (memory = complete blocks 0..m-1).
    top_k: retrieval k (the mapping uses k = min(top_k, m)).
    block_size: L.
    num_blocks: how many blocks to map.

  Returns:
    [..., num_blocks] int32: max(b, m - k - 1) * L + L - 1 (meaningless for b >= m).
  """
  m = jnp.asarray(num_memory_blocks, jnp.int32)[..., None]
  k = jnp.minimum(top_k, m)
  b = jnp.arange(num_blocks, dtype=jnp.int32)
  return jnp.maximum(b, m - k - 1) * block_size + block_size - 1


def stingy_block_starts(blocks: jax.Array, num_memory_blocks: jax.Array, *, top_k: int,
                        block_size: int) -> jax.Array:
  """Stingy start positions of retrieved blocks (spec §2.4 step 3).

  Args:
    blocks: int [..., K], the chosen block indices sorted ascending (valid ones first).
    num_memory_blocks: int [...], m.
    top_k: retrieval k (the mapping uses k = min(top_k, m)).
    block_size: L.

  Returns:
    [..., K] int32: block c_j occupies positions start_j .. start_j + L - 1 with
    start_j = (m - k - 1 + j + [c_j >= m - k]) * L.
  """
  blocks = jnp.asarray(blocks, jnp.int32)
  m = jnp.asarray(num_memory_blocks, jnp.int32)[..., None]
  k = jnp.minimum(top_k, m)
  j = jnp.arange(blocks.shape[-1], dtype=jnp.int32)
  return (m - k - 1 + j + (blocks >= m - k).astype(jnp.int32)) * block_size


def _validate(q, cache_k, cache_v, q_positions, block_size, top_k, local_blocks, granularity,
              rope_theta, scale) -> None:
  def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

  if granularity not in GRANULARITIES:
    raise ValueError(f"Unknown granularity {granularity!r}; valid values are "
                     f"{', '.join(repr(g) for g in GRANULARITIES)}.")
  if not is_int(top_k) or top_k < 1:
    raise ValueError(f"top_k must be an int >= 1 (blocks retrieved per query), got {top_k!r}.")
  if not is_int(local_blocks) or local_blocks < 0:
    raise ValueError(f"local_blocks must be an int >= 0, got {local_blocks!r}.")
  if not is_int(block_size) or block_size < 2:
    raise ValueError(f"block_size must be an int >= 2 (regular tokens + 1 landmark), got "
                     f"{block_size!r}.")
  if jnp.ndim(q) != 4 or not jnp.issubdtype(jnp.result_type(q), jnp.floating):
    raise ValueError(f"q must be a float array [B, T, H, D], got {jnp.result_type(q)} {jnp.shape(q)}.")
  b, t, h, d = jnp.shape(q)
  for name, x in (("cache_k", cache_k), ("cache_v", cache_v)):
    shape = jnp.shape(x)
    if len(shape) != 4 or shape[0] != b or shape[3] != d or not jnp.issubdtype(
        jnp.result_type(x), jnp.floating):
      raise ValueError(f"{name} must be a float array [B={b}, S, Hkv, D={d}], got "
                       f"{jnp.result_type(x)} {shape}.")
  if jnp.shape(cache_k) != jnp.shape(cache_v):
    raise ValueError(f"cache_k and cache_v must have the same shape, got {jnp.shape(cache_k)} and "
                     f"{jnp.shape(cache_v)}.")
  hkv = jnp.shape(cache_k)[2]
  if h % hkv:
    raise ValueError(f"The number of query heads ({h}) must be a multiple of the kv heads ({hkv}).")
  if jnp.shape(q_positions) not in ((b, t), (t,)) or not jnp.issubdtype(jnp.result_type(q_positions),
                                                                         jnp.integer):
    raise ValueError(f"q_positions must be an integer array [B={b}, T={t}], got "
                     f"{jnp.result_type(q_positions)} {jnp.shape(q_positions)}.")
  if rope_theta is not None and (not isinstance(rope_theta, (int, float)) or rope_theta <= 0 or d % 2):
    raise ValueError(f"rope_theta must be None or a positive number with an even head_dim, got "
                     f"rope_theta={rope_theta!r}, head_dim={d}.")
  if scale is not None and not isinstance(scale, (int, float)):
    raise ValueError(f"scale must be None or a Python float, got {type(scale).__name__}.")


def _memory_counts(q_positions, block_size, local_blocks):
  """m [B, T]: the number of memory blocks (complete blocks before the local window) of each query."""
  return jnp.maximum(q_positions // block_size - local_blocks, 0)


def _select(q, cache_k, q_positions, *, block_size, top_k, local_blocks, granularity, stingy,
            rope_theta, scale):
  """(blocks [B, T, H, K] int32 sorted ascending, valid [B, T, H, K] bool); K = min(top_k, S // L)."""
  b, t, h, d = q.shape
  hkv = cache_k.shape[2]
  num_blocks = cache_k.shape[1] // block_size
  kk = min(top_k, num_blocks)
  m = _memory_counts(q_positions, block_size, local_blocks)  # [B, T]
  qf = q.astype(jnp.float32)
  landmarks = cache_k[:, block_size - 1:num_blocks * block_size:block_size].astype(jnp.float32)

  def scores(q_, k_):  # [B, T, H, D] x [B, N, Hkv, D] -> [B, T, H, N]
    s = jnp.einsum("btkgd,bnkd->btkgn", q_.reshape(b, t, hkv, h // hkv, d), k_, precision=_HIGHEST)
    return s.reshape(b, t, h, -1) * scale

  if rope_theta is None:
    logits = scores(qf, landmarks)
  else:
    true_pos = jnp.arange(num_blocks, dtype=jnp.int32) * block_size + block_size - 1
    logits = scores(rope(qf, q_positions[:, :, None], rope_theta),
                    rope(landmarks, true_pos[None, :, None], rope_theta))
    if stingy:
      # Older landmarks all sit at one position P(m) per query: <R(p) q, R(P) k> = <R(p - P) q, k>.
      old_pos = (m - jnp.minimum(top_k, m) - 1) * block_size + block_size - 1  # [B, T]
      logits_old = scores(rope(qf, (q_positions - old_pos)[:, :, None], rope_theta), landmarks)
      is_old = jnp.arange(num_blocks) < (m - jnp.minimum(top_k, m))[:, :, None]  # [B, T, N]
      logits = jnp.where(is_old[:, :, None, :], logits_old, logits)

  is_memory = (jnp.arange(num_blocks) < m[:, :, None])[:, :, None, :]  # [B, T, 1, N]
  if granularity == "per_token_and_head":
    key = jnp.where(is_memory, logits, -jnp.inf)
  else:
    probs = jax.nn.softmax(jnp.where(is_memory, logits, -jnp.inf), axis=-1)
    probs = jnp.where(is_memory, probs, 0.0)  # a query without memory: all-NaN row -> 0
    if granularity == "max_over_heads":
      key = jnp.where(is_memory, jnp.max(probs, axis=2, keepdims=True), -1.0)
    else:  # max_over_tokens: candidates are the union of the tokens' memories
      union = jnp.any(is_memory, axis=1, keepdims=True)
      key = jnp.where(union, jnp.max(probs, axis=1, keepdims=True), -1.0)
    key = jnp.broadcast_to(key, (b, t, h, num_blocks))
  _, idx = jax.lax.top_k(key, kk)  # [B, T, H, K]
  idx = jnp.where(idx < m[:, :, None, None], idx, num_blocks)  # not in this token's memory
  idx = jnp.sort(idx, axis=-1)  # block order, valid ones first
  valid = idx < num_blocks
  return jnp.where(valid, idx, 0).astype(jnp.int32), valid


def _attend(q, cache_k, cache_v, q_positions, blocks, valid, *, block_size, top_k, local_blocks,
            stingy, rope_theta, scale):
  """Grouped softmax over the retrieved blocks and the local window (module docstring)."""
  b, t, h, d = q.shape
  s_len, hkv = cache_k.shape[1:3]
  g = h // hkv
  n_ret = blocks.shape[-1]
  lsz = block_size
  bq = q_positions // lsz  # [B, T]
  m = _memory_counts(q_positions, lsz, local_blocks)
  qf = q.astype(jnp.float32)
  q_att = qf if rope_theta is None else rope(qf, q_positions[:, :, None], rope_theta)
  slot = jnp.arange(lsz, dtype=jnp.int32)
  is_landmark_slot = slot == lsz - 1

  # Local window: one aligned static-size slice per batch row covering every query's local blocks.
  w_blocks = cdiv(t, lsz) + local_blocks + 1
  w = w_blocks * lsz
  padded_len = max(round_up(s_len, lsz), w)
  if padded_len != s_len:
    pad = ((0, 0), (0, padded_len - s_len), (0, 0), (0, 0))
    cache_k, cache_v = jnp.pad(cache_k, pad), jnp.pad(cache_v, pad)
  start = jnp.clip((bq[:, 0] - local_blocks) * lsz, 0, padded_len - w)  # [B], multiple of L
  window = jax.vmap(lambda x, s0: jax.lax.dynamic_slice_in_dim(x, s0, w, axis=0))
  local_k = window(cache_k, start).astype(jnp.float32)  # [B, W, Hkv, D]
  local_v = window(cache_v, start).astype(jnp.float32)
  local_pos = start[:, None] + jnp.arange(w, dtype=jnp.int32)  # [B, W]
  if rope_theta is not None:
    local_k = rope(local_k, local_pos[:, :, None], rope_theta)
  s_loc = jnp.einsum("btkgd,bwkd->btkgw", q_att.reshape(b, t, hkv, g, d), local_k,
                     precision=_HIGHEST).reshape(b, t, h, w_blocks, lsz) * scale
  loc_block = (local_pos[:, ::lsz] // lsz)[:, None, :]  # [B, 1, Wb]
  in_local = loc_block >= (bq - local_blocks)[:, :, None]
  loc_earlier = in_local & (loc_block < bq[:, :, None])  # [B, T, Wb] complete local blocks
  loc_current = (loc_block == bq[:, :, None])[..., None] & ~is_landmark_slot & (
      local_pos.reshape(b, 1, w_blocks, lsz) <= q_positions[:, :, None, None])  # [B, T, Wb, L]

  earlier = jnp.broadcast_to(loc_earlier[:, :, None], (b, t, h, w_blocks))
  current = jnp.broadcast_to(loc_current[:, :, None], (b, t, h, w_blocks, lsz))
  s_all = s_loc
  if n_ret:
    # Retrieved blocks: gather [B, T, H, K, L, D] keys/values of each (token, head)'s own blocks.
    kb = cache_k[:, :(s_len // lsz) * lsz].reshape(b, -1, lsz, hkv, d).transpose(0, 3, 1, 2, 4)
    vb = cache_v[:, :(s_len // lsz) * lsz].reshape(b, -1, lsz, hkv, d).transpose(0, 3, 1, 2, 4)
    b_idx = jnp.arange(b)[:, None, None, None]
    h_idx = (jnp.arange(h) // g)[None, None, :, None]
    ret_k = kb[b_idx, h_idx, blocks].astype(jnp.float32)
    ret_v = vb[b_idx, h_idx, blocks].astype(jnp.float32)
    if rope_theta is not None:
      if stingy:
        starts = stingy_block_starts(blocks, m[:, :, None], top_k=top_k, block_size=lsz)
      else:
        starts = blocks * lsz
      ret_k = rope(ret_k, starts[..., None] + slot, rope_theta)
    s_ret = jnp.einsum("bthd,bthkld->bthkl", q_att, ret_k, precision=_HIGHEST) * scale
    s_all = jnp.concatenate([s_ret, s_all], axis=3)
    earlier = jnp.concatenate([valid, earlier], axis=3)
    current = jnp.concatenate([jnp.zeros((b, t, h, n_ret, lsz), bool), current], axis=3)

  # Grouped softmax (spec §2.2 closed form) over [B, T, H, blocks, L].
  regular = earlier[..., None] & ~is_landmark_slot
  blk_max = jax.lax.stop_gradient(jnp.max(jnp.where(regular, s_all, _MASK_VALUE), -1, keepdims=True))
  e_in = jnp.exp(jnp.where(regular, s_all - blk_max, -jnp.inf))
  denom_in = jnp.sum(e_in, -1, keepdims=True)
  p_in = e_in / jnp.where(denom_in > 0.0, denom_in, 1.0)
  s_lm = s_all[..., lsz - 1]
  top_max = jnp.maximum(jnp.max(jnp.where(earlier, s_lm, _MASK_VALUE), -1),
                        jnp.max(jnp.where(current, s_all, _MASK_VALUE), (-2, -1)))
  top_max = jax.lax.stop_gradient(top_max)[..., None]
  e_lm = jnp.exp(jnp.where(earlier, s_lm - top_max, -jnp.inf))
  e_cur = jnp.exp(jnp.where(current, s_all - top_max[..., None], -jnp.inf))
  z = jnp.sum(e_lm, -1) + jnp.sum(e_cur, (-2, -1))
  z = jnp.where(z > 0.0, z, 1.0)[..., None]
  weights = (e_cur + e_lm[..., None] * p_in) / z[..., None]  # [B, T, H, blocks, L]

  w_loc = weights[:, :, :, n_ret:].reshape(b, t, hkv, g, w)
  o = jnp.einsum("btkgw,bwkd->btkgd", w_loc, local_v, precision=_HIGHEST).reshape(b, t, h, d)
  if n_ret:
    o = o + jnp.einsum("bthkl,bthkld->bthd", weights[:, :, :, :n_ret], ret_v, precision=_HIGHEST)
  return o.astype(q.dtype)


_STATIC = ("block_size", "top_k", "local_blocks", "granularity", "stingy", "rope_theta", "scale")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _select_jit(q, cache_k, q_positions, **kwargs):
  return _select(q, cache_k, q_positions, **kwargs)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _retrieval_jit(q, cache_k, cache_v, q_positions, *, granularity, **kwargs):
  num_blocks = cache_k.shape[1] // kwargs["block_size"]
  if num_blocks:
    blocks, valid = _select(q, cache_k, q_positions, granularity=granularity, **kwargs)
  else:  # the cache is shorter than one block: nothing can be retrieved
    blocks = jnp.zeros(q.shape[:3] + (0,), jnp.int32)
    valid = jnp.zeros(q.shape[:3] + (0,), bool)
  return _attend(q, cache_k, cache_v, q_positions, blocks, valid, **kwargs)


def _canonical(q, cache_k, cache_v, q_positions, *, block_size, top_k, local_blocks, granularity,
               stingy, rope_theta, scale) -> tuple[tuple[Any, ...], dict[str, Any]]:
  _validate(q, cache_k, cache_v, q_positions, block_size, top_k, local_blocks, granularity, rope_theta,
            scale)
  b, t, _, d = jnp.shape(q)
  q_positions = jnp.broadcast_to(jnp.asarray(q_positions, jnp.int32), (b, t))
  kwargs = dict(block_size=int(block_size), top_k=int(top_k), local_blocks=int(local_blocks),
                granularity=granularity, stingy=bool(stingy),
                rope_theta=None if rope_theta is None else float(rope_theta),
                scale=float(d ** -0.5 if scale is None else scale))
  return q_positions, kwargs


def select_blocks(q: jax.Array, cache_k: jax.Array, *, q_positions: jax.Array, block_size: int,
                  top_k: int, local_blocks: int = 1, granularity: str = "per_token_and_head",
                  stingy: bool = True, rope_theta: float | None = None,
                  scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """The memory blocks each (token, head) retrieves (module docstring, "Selection").

  Arguments as `retrieval_attention`. Requires S >= block_size.

  Returns:
    blocks: [B, T, H, K] int32 block indices sorted ascending, K = min(top_k, S // block_size); slots
      that are not valid hold 0.
    valid: [B, T, H, K] bool, True for a retrieved block (valid slots come first).
  """
  q_positions, kwargs = _canonical(q, cache_k, cache_k, q_positions, block_size=block_size,
                                   top_k=top_k, local_blocks=local_blocks, granularity=granularity,
                                   stingy=stingy, rope_theta=rope_theta, scale=scale)
  if jnp.shape(cache_k)[1] < block_size:
    raise ValueError(f"select_blocks needs a cache of at least one block ({block_size} slots), got "
                     f"{jnp.shape(cache_k)[1]}.")
  return _select_jit(q, cache_k, q_positions, **kwargs)


def retrieval_attention(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, *,
                        q_positions: jax.Array, block_size: int, top_k: int, local_blocks: int = 1,
                        granularity: str = "per_token_and_head", stingy: bool = True,
                        rope_theta: float | None = None, scale: float | None = None) -> jax.Array:
  """Landmark attention of the newest T queries over a KV cache with top-k block retrieval (spec §2.4).

  Semantics, position mapping and cost: see the module docstring.

  Args:
    q: [B, T, H, D] the newest T queries (unrotated when rope_theta is set).
    cache_k: [B, S, Hkv, D] keys, slot s = stream position s (unrotated when rope_theta is set);
      H % Hkv == 0.
    cache_v: [B, S, Hkv, D] values.
    q_positions: [B, T] (or [T]) int, contiguous stream positions of the queries, already in the cache.
    block_size: L, landmark block size counting the landmark (int >= 2).
    top_k: memory blocks retrieved per selection unit (int >= 1).
    local_blocks: complete blocks before the current one that are always attended (int >= 0).
    granularity: "per_token_and_head", "max_over_heads" or "max_over_tokens".
    stingy: with rope_theta, use the stingy position mapping (else true positions).
    rope_theta: None (q, cache_k used as given) or the RoPE base applied here.
    scale: logit scale, default D ** -0.5.

  Returns:
    o: [B, T, H, D] in q.dtype (computed in float32).

  Raises:
    ValueError: on an unknown granularity, top_k < 1, a bad block_size / local_blocks / rope_theta, or
      inconsistent shapes.
  """
  q_positions, kwargs = _canonical(q, cache_k, cache_v, q_positions, block_size=block_size,
                                   top_k=top_k, local_blocks=local_blocks, granularity=granularity,
                                   stingy=stingy, rope_theta=rope_theta, scale=scale)
  return _retrieval_jit(q, cache_k, cache_v, q_positions, **kwargs)
