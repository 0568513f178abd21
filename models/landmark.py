"""Landmark attention (Mohtashami & Jaggi 2023; specs/attention_variants.md §2): mixer and model family.

Pieces:
  * `LandmarkFamily` ("landmark_lm", configs/landmark.py): the Transformer LM with landmark insertion as
    an explicit part of the model. `LandmarkInsertion` inserts landmark ids inside the model (as the
    paper's llama flash path, `enable_landmark_insertion`) with `ops.landmark.insertion.insert_landmarks`,
    the layer stack runs on the expanded stream and the hidden states at landmarks are dropped before the
    LM head. Landmarks are never predicted nor trained on, so the byte loss equals the lm_benchmark loss on
    the expanded stream (spec §2.3; `insertion.lm_benchmark_targets`), and bpb / generate / passkey / mqar
    work unchanged. With model.name="transformer" the same mixers run on inputs that already hold the
    landmarks (the lm_benchmark data path).
  * `LandmarkAttention` ("landmark"), projections / RoPE / GQA / qk-norm as models/attention.py's
    SelfAttention, calling `ops.landmark.landmark_attention` (grouped softmax, spec §2.2) with the
    expanded positions, and for decoding a KV cache read either exactly ("full") or by top-k block
    retrieval (`ops.landmark.retrieval.retrieval_attention`, spec §2.4, "topk").

Packed documents (`packed_blocks`):
  "document" (module default): blocks restart in every packed segment (positions restart at 0), so a
    packed document is computed exactly as if alone; the op's key slots then do not hold their own
    positions, so training uses the O(N^2)-memory "reference" grouped softmax.
  "stream" (configs/landmark.py): blocks are aligned to the window as in lm_benchmark's continuous stream
    (a landmark after every block_size - 1 bytes of the window, whatever the documents); documents are
    still isolated by segment ids, RoPE positions still restart per document, and the blockwise "xla" /
    Pallas op runs (O(N * tile) memory). A document's block boundaries then depend on where it starts in
    the window, so "packed == alone" holds only for documents starting at a block boundary.
  Without segment ids (decoding, unpacked text) the two are the same.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models import transformer
from models.family import register_family
from models.registry import mixer_options, register_mixer
from ops.landmark import insertion as landmark_data
from ops.landmark import landmark_attention
from ops.landmark.retrieval import GRANULARITIES, retrieval_attention

# Options under `config.model.landmark` (configs/landmark.py takes them with `mixer_config`). `inference`
# only affects decode=True; training never uses the cache (spec §2.3).
DEFAULTS: dict[str, Any] = {
    "block_size": landmark_data.DEFAULT_BLOCK_SIZE,  # 50 regular tokens + 1 landmark (spec §2.1)
    "inference": "full",  # full: exact grouped softmax over the whole cache | topk: retrieval (spec §2.4)
    "top_k": 4,  # retrieved blocks; paper Fig. 3 caption k=4 (llama/run_test.py uses 5, spec §2.8)
    "local_blocks": 1,  # complete blocks before the current one that are always attended (topk)
    "granularity": "per_token_and_head",  # | max_over_heads | max_over_tokens (spec §2.4)
    "stingy": True,  # stingy RoPE position mapping of retrieved blocks (paper §3.2.1)
    "chunk_len": 250,  # topk: queries per retrieval call (spec §2.4 ℓ_local=250), bounds memory
    "impl": "",  # "" = model.attention_impl; "reference" | "xla" | "pallas"
    "packed_blocks": "document",  # document (exact per-document blocks) | stream (window-aligned, fast)
}
_INFERENCE_MODES = ("full", "topk")
_PACKED_BLOCKS = ("document", "stream")
_IMPLS = ("", "reference", "xla", "pallas")


def landmark_options(config: Any) -> dict[str, Any]:
  """`DEFAULTS` updated by `config.landmark` (the model config's optional sub-config), validated."""
  options = mixer_options(config, "landmark", DEFAULTS)

  def check(name, ok, expected):
    if not ok:
      raise ValueError(f"model.landmark.{name} must be {expected}, got {options[name]!r}.")

  def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)

  check("block_size", is_int(options["block_size"]) and options["block_size"] >= 2, "an int >= 2")
  check("inference", options["inference"] in _INFERENCE_MODES, f"one of {list(_INFERENCE_MODES)}")
  check("top_k", is_int(options["top_k"]) and options["top_k"] >= 1, "an int >= 1")
  check("local_blocks", is_int(options["local_blocks"]) and options["local_blocks"] >= 0, "an int >= 0")
  check("granularity", options["granularity"] in GRANULARITIES, f"one of {list(GRANULARITIES)}")
  check("stingy", isinstance(options["stingy"], bool), "a bool")
  check("chunk_len", is_int(options["chunk_len"]) and options["chunk_len"] >= 1, "an int >= 1")
  check("impl", options["impl"] in _IMPLS, f"one of {list(_IMPLS)}")
  check("packed_blocks", options["packed_blocks"] in _PACKED_BLOCKS, f"one of {list(_PACKED_BLOCKS)}")
  return options


@dataclasses.dataclass(frozen=True)
class LandmarkInsertion:
  """Stream transform of the LM (`TransformerLM.stream`): ids [B, T] -> [B, T, D].

  Parallel forward: `insert_landmarks` (landmark after every block_size - 1 regular tokens of each
  segment), the layer stack on the expanded stream, then the rows of the regular tokens.

  Decode: the LM's cache holds `landmark_tokens_seen`, the number of regular tokens decoded so far (o).
  A call with T tokens inserts a landmark after each block it completes: n = floor((o mod (bs-1) + T) /
  (bs-1)) landmarks, which is T // (bs-1) or one more. Both counts are static, so the stack runs under
  `nn.cond` on the exact expanded length T + n: every slot is a real token, so every layer type (also
  softmax or recurrent layers in a mixed list) appends exactly the stream of the parallel forward to its
  cache. (A single static length with a traced number of valid slots would leave invalid slots in the
  caches of non-landmark layers.) The cache capacity comes from the init call: the expansion of max_len
  tokens, enough for any split of max_len tokens into calls.
  """

  block_size: int
  packed_blocks: str = "document"

  def _stream_aligned(self, inputs: jax.Array, segment_ids: jax.Array | None):
    """"stream" mode: window-aligned blocks; (stream, expanded segment ids, per-document RoPE positions)."""
    stream = landmark_data.insert_landmarks(inputs, block_size=self.block_size)
    if segment_ids is None:
      segment_ids = jnp.ones(inputs.shape, jnp.int32)
    n = stream.ids.shape[1]
    slots = jnp.arange(n, dtype=jnp.int32)
    # Slot s holds regular token s - (landmarks at or before s); a landmark slot gets its previous token's.
    token_index = jnp.clip(slots - (slots + 1) // self.block_size, 0, inputs.shape[1] - 1)
    expanded_segments = jnp.take(segment_ids, token_index, axis=1)
    return stream, expanded_segments, landmark_data.segment_positions(expanded_segments)

  def __call__(self, lm: nn.Module, hidden_states: Callable[..., jax.Array], inputs: jax.Array,
               segment_ids: jax.Array | None, positions: jax.Array | None, *, decode: bool) -> jax.Array:
    if decode:
      seen = lm.variable("cache", "landmark_tokens_seen", lambda: jnp.zeros((), jnp.int32))
    packed = segment_ids is not None or positions is not None
    if not decode and packed and self.packed_blocks == "stream":
      stream, expanded_segments, rope_positions = self._stream_aligned(inputs, segment_ids)
      hidden = hidden_states(stream.ids, expanded_segments, rope_positions)
      return landmark_data.contract(hidden, stream.token_slots)
    if not decode or lm.is_initializing():
      stream = landmark_data.insert_landmarks(inputs, block_size=self.block_size, segment_ids=segment_ids,
                                              positions=positions)
      if segment_ids is None and positions is None:  # one full segment: slot j is position j
        hidden = hidden_states(stream.ids, None, None)
      else:
        hidden = hidden_states(stream.ids, stream.segment_ids, stream.positions)
      return landmark_data.contract(hidden, stream.token_slots)

    t = inputs.shape[1]
    per_block = self.block_size - 1
    stream = landmark_data.insert_landmarks(
        inputs, block_size=self.block_size,
        positions=seen.value + jnp.arange(t, dtype=jnp.int32)[None])

    def branch(num_landmarks):
      def run(module, ids, positions, token_slots):
        del module  # the layers are created from the (lifted) module context
        n = t + num_landmarks
        return landmark_data.contract(hidden_states(ids[:, :n], None, positions[:, :n]), token_slots)
      return run

    operands = (stream.ids, stream.positions, stream.token_slots)
    fewer = t // per_block
    if t % per_block == 0:  # the count does not depend on the offset
      hidden = branch(fewer)(lm, *operands)
    else:
      hidden = nn.cond(stream.num_valid[0] > t + fewer, branch(fewer + 1), branch(fewer), lm, *operands)
    seen.value = seen.value + t
    return hidden


@register_mixer("landmark", defaults=DEFAULTS)
class LandmarkAttention(nn.Module):
  """Causal landmark attention with RoPE (spec §2.2). x [B, N, D] (the expanded stream) -> [B, N, D].

  Options: `config.model.landmark` (see `DEFAULTS`) plus the model's num_heads, num_kv_heads (GQA),
  head_dim, qk_norm, rope_theta, attention_impl, interpret, dtype. `positions` are expanded-stream
  positions (a landmark iff position % block_size == block_size - 1); None means arange(N).

  Op implementation: with segment ids or explicit positions (packed documents restart their blocks) the
  key slots do not hold their own positions, which `ops.landmark`'s "xla" form requires, so the
  "reference" form is used there (O(N^2) memory); otherwise, and for the decode cache, the configured
  impl. Decode (`decode=True`, segment ids ignored as in the softmax mixer):
    inference="full": keys cached after RoPE; `landmark_attention` over the whole cache (exact; empty
      slots have position INT32_MAX).
    inference="topk": keys cached before RoPE (spec §2.4); `retrieval_attention` with top_k,
      local_blocks, granularity and stingy positions, in chunks of at most chunk_len queries.
  """
  config: Any
  layer_index: int = 0
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    opts = landmark_options(cfg)
    dtype = layers.dtype_of(cfg.dtype)
    batch, t, _ = x.shape
    q, _, k, v = layers.qkv_projections(cfg, x, dtype)

    impl = opts["impl"] or cfg.attention_impl or None
    run = dict(block_size=opts["block_size"], impl=impl, interpret=cfg.interpret)
    if self.decode:
      cache = layers.declare_kv_cache(self, k.shape, v.shape, k.dtype)
      if opts["inference"] == "topk" and cache.initialized:
        cache_k, cache_v, q_positions, _ = layers.cache_append(cache, k, v)  # keys before RoPE
        o = self._retrieve(q, cache_k, cache_v, q_positions, opts)
      else:
        positions = cache.positions(batch, t)
        q = layers.rope(q, positions, cfg.rope_theta)
        k = layers.rope(k, positions, cfg.rope_theta)
        k, v, q_positions, kv_positions = layers.cache_append(cache, k, v)
        o = landmark_attention(q, k, v, q_positions=q_positions, kv_positions=kv_positions, **run)
    else:
      rope_positions = positions
      if rope_positions is None:
        rope_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
      q = layers.rope(q, rope_positions, cfg.rope_theta)
      k = layers.rope(k, rope_positions, cfg.rope_theta)
      if opts["packed_blocks"] == "stream":
        positions = None  # window-aligned blocks: slot j is op position j; `positions` only feed RoPE
      elif segment_ids is not None or positions is not None:
        run["impl"] = "reference"  # slots do not hold their positions ("xla" layout requirement)
      o = landmark_attention(q, k, v, segment_ids=segment_ids, q_positions=positions,
                             kv_positions=positions, **run)
    return layers.attention_output(cfg, o, dtype)

  def _retrieve(self, q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, q_positions: jax.Array,
                opts: dict[str, Any]) -> jax.Array:
    """Top-k retrieval attention (spec §2.4) of q [B, T, H, D] (unrotated) in chunks of chunk_len."""
    kwargs = dict(block_size=opts["block_size"], top_k=opts["top_k"], local_blocks=opts["local_blocks"],
                  granularity=opts["granularity"], stingy=opts["stingy"],
                  rope_theta=float(self.config.rope_theta))

    def attend(q_chunk, positions_chunk):
      return retrieval_attention(q_chunk, cache_k, cache_v, q_positions=positions_chunk, **kwargs)

    batch, t = q.shape[:2]
    chunk = opts["chunk_len"]
    num_full = t // chunk
    if num_full <= 1 and t <= chunk:
      return attend(q, q_positions)
    split = num_full * chunk
    q_chunks = jnp.moveaxis(q[:, :split].reshape((batch, num_full, chunk) + q.shape[2:]), 1, 0)
    p_chunks = jnp.moveaxis(q_positions[:, :split].reshape(batch, num_full, chunk), 1, 0)
    out = jax.lax.map(lambda args: attend(*args), (q_chunks, p_chunks))  # [num_full, B, chunk, H, D]
    out = jnp.moveaxis(out, 0, 1).reshape((batch, split) + q.shape[2:])
    if split < t:
      out = jnp.concatenate([out, attend(q[:, split:], q_positions[:, split:])], axis=1)
    return out


@register_family("landmark_lm")
class LandmarkFamily(transformer.TransformerFamily):
  """The Transformer LM with landmark insertion (spec §2.1) around its layer stack.

  Every layer may use any mixer; the "landmark" layers see the landmarks as their block ends, the others
  see them as ordinary tokens (the paper's model is all landmark layers, configs/landmark.py).
  """

  def __init__(self, config: Any):
    super().__init__(config)
    rows = layers.padded_vocab_size(self.config.vocab_size, self.config.vocab_pad_multiple)
    if rows <= landmark_data.LANDMARK_ID:
      raise ValueError(f"the landmark id {landmark_data.LANDMARK_ID} needs an embedding row, but the "
                       f"table has {rows} rows (model.vocab_size / model.vocab_pad_multiple).")

  def stream(self) -> LandmarkInsertion:
    options = landmark_options(self.config)
    return LandmarkInsertion(options["block_size"], options["packed_blocks"])
