"""Training FLOPs per byte and parameter counts from a model config: arithmetic only, nothing is traced.

    flops.training_flops_per_byte(config.model, config.train.seq_len)                  # compiled shapes
    flops.training_flops_per_byte(config.model, seq_len, patches_per_byte=1 / 5.2)    # realised patches

Counting conventions (specs/token_free.md §1.3, applied to every family alike):
  * forward FLOPs = 2 x the multiply-accumulates (MACs) of every matmul; training FLOPs = 3 x forward
    (backward = 2 x forward), i.e. 6 x MACs. Weight matmuls: the mixer projections (and GLA's gates),
    the MLP, the hierarchical down / up projections and the output logits over the *padded* vocabulary
    rows the model computes (`model.vocab_pad_multiple`: 384 rows for 259 ids). Attention matmuls: the
    scores q.k and the weighted values (plus GLA's state terms). Elementwise work (norms, softmax, RoPE,
    activations, selective's mask cumsum, pooling's segment sums, gathers) and the embedding lookup
    count nothing.
  * causal attention counts the full T x T square: every query against all T keys of the window, what
    the dense reference op computes (Kaplan et al.'s 2 n_ctx d_attn per token; SpaceByte's 2L(2WD) with
    W = T). A kernel that skips the tiles above the diagonal does about half of this term.
  * softmax, cog, ssa, selective, landmark: per token and layer 2 T H d_head MACs (scores and values; H
    query heads, so GQA does not shrink it). landmark counts its grouped softmax like softmax (it scores
    every key); the landmark_lm family runs its layers on the landmark-expanded stream (T + T // 50 for
    the default block) and its logits on the T bytes. gla, chunkwise (chunk C = min(chunk_size, T)):
    H (C d_k + C d_v + 2 d_k d_v) per token: intra-chunk scores and values over the full C x C chunk,
    the readout q S and the state update k^T v.
  * hierarchical: encoder and decoder byte layers (and a trained source's boundary predictor) at T, the
    global stack and the down / up projections on S slots (null slot included) at the global width, the
    resampling pieces (attention pooling and upsampling, HAT's connector and predictive embedding,
    MEGABYTE's slice projection) on the side each matmul runs on, their dense S x T attention; Toucan's
    decoder layers and logits on its expanded stream of T + S - 1 tokens (S the static capacity); per
    byte = per row / T. S is the static capacity (what the compiled step runs) or, with
    `patches_per_byte` p, S = p T + 1 (what exactly the realised patches would cost; at fixed patches of
    k bytes p = 1/k gives the static capacity back).
"""

from typing import Any

from models import gla
from models import hierarchical
from models import layers
from models.attention import ssa_options
from models.landmark import landmark_options
from models.transformer import layer_mixers
from ops.landmark.insertion import expanded_length

FAMILIES = ("transformer", "landmark_lm", "hierarchical")
SOFTMAX_LIKE = ("softmax", "cog", "ssa", "selective", "landmark")


def _mixer(cfg: Any, mixer: str, length: int) -> tuple[int, int, int]:
  """(weight MACs per token, other params, attention MACs per token) of one mixer on `length` tokens."""
  d = cfg.d_model
  if mixer == "gla":
    opts = gla.gla_options(cfg)
    h, dk, dv = gla.gla_dims(cfg)
    rank = opts["gate_low_rank_dim"]
    weights = d * h * (2 * dk + dv) + d * rank + rank * h * dk + h * dv * d  # q k v, low-rank gate, out
    other = h * dk  # the gate bias
    if opts["use_output_gate"]:
      weights += d * h * dv
      other += h * dv if opts["output_gate_bias"] else 0
    other += dv if opts["output_norm"] == "rmsnorm" else 0
    chunk = min(opts["chunk_size"], length)
    return weights, other, h * (chunk * (dk + dv) + 2 * dk * dv)
  if mixer not in SOFTMAX_LIKE:
    raise ValueError(f"no FLOP count for mixer {mixer!r}; counted: {', '.join(SOFTMAX_LIKE + ('gla',))}.")
  h, hkv, dh = layers.attention_dims(cfg)
  weights = d * (h + 2 * hkv) * dh + h * dh * d  # q, k, v, out
  other = 2 * dh if cfg.qk_norm else 0
  if mixer == "ssa":  # u_q . GELU(W_q x) per head (and u_v per kv head): one MAC per weight per token
    opts = ssa_options(cfg)
    if opts["token_temperature"]:
      weights += h * dh + (hkv * dh if opts["value_temperature"] else 0)
    other += 1  # the position scale
  return weights, other, 2 * length * h * dh


def _block(cfg: Any, mixer: str, length: int) -> tuple[int, int, int]:
  """(weight MACs per token = matmul params, params, attention MACs per token) of models.transformer.Block."""
  weights, other, attention = _mixer(cfg, mixer, length)
  weights += 3 * cfg.d_model * (cfg.mlp_dim or layers.default_mlp_dim(cfg.d_model))  # gate, up, down
  return weights, weights + other + 2 * cfg.d_model, attention  # + the two norms


def _stack(cfg: Any, mixers: Any, length: int) -> tuple[int, int, int]:
  """_block summed over a list of layers (one mixer name each)."""
  parts = [_block(cfg, m, length) for m in mixers]
  return tuple(sum(p[i] for p in parts) for i in range(3))


def _vocab_rows(cfg: Any) -> int:
  return layers.padded_vocab_size(cfg.vocab_size, cfg.vocab_pad_multiple)


def _part(rows_per_byte: float, weights: float, attention: float = 0.0) -> dict[str, float]:
  """Training FLOPs per byte of a piece run on rows_per_byte rows per byte."""
  return {"param_flops": 6.0 * rows_per_byte * weights, "attention_flops": 6.0 * rows_per_byte * attention}


def _breakdown(parts: dict[str, dict[str, float]]) -> dict[str, Any]:
  param = sum(p["param_flops"] for p in parts.values())
  attention = sum(p["attention_flops"] for p in parts.values())
  return {"param_flops": param, "attention_flops": attention, "total": param + attention,
          "forward": (param + attention) / 3.0, "parts": parts}


def _flat_length(cfg: Any, seq_len: int) -> int:
  """Tokens the flat LM's layers see per row: the bytes, or landmark_lm's expanded training stream."""
  if cfg.name != "landmark_lm":
    return seq_len
  opts = landmark_options(cfg)  # packed training batches carry positions: "document" blocks may add one
  return expanded_length(seq_len, opts["block_size"], aligned=opts["packed_blocks"] == "stream")


def _predictor(cfg: Any, opts: dict[str, Any]) -> tuple[int, int]:
  """(weight MACs per byte, params) of the trained sources' boundary predictor Linear(d, P) -> Linear(P, 1)."""
  if opts["boundaries"] not in ("learned", "entropy"):
    return 0, 0
  hidden = opts["predictor_dim"] or cfg.mlp_dim or layers.default_mlp_dim(cfg.d_model)
  weights = cfg.d_model * hidden + hidden
  return weights, weights + hidden + 1  # + both biases


def _resampling(cfg: Any, opts: dict[str, Any], dg: int, seq_len: int, slots: float
                ) -> tuple[dict[str, dict[str, float]], int]:
  """(per-byte FLOP parts, params) of the pooling, the way into the global width and the upsampling
  (HierarchicalLM's _pool, _to_global and upsampling), on S = slots per T = seq_len bytes. Attention
  pooling / upsampling: q and out projections on the queries' side, k and v on the keys', and the dense
  S x T scores and values."""
  heads, _, head_dim = layers.attention_dims(cfg)
  d, hd = cfg.d_model, heads * head_dim
  mlp = 3 * d * (cfg.mlp_dim or layers.default_mlp_dim(d))
  width, rate = hierarchical.group_width(opts), slots / seq_len
  pool_mode, up_mode, linear = opts["pooling"], opts["upsampling"], opts["projection"] == "linear"
  in_width = width * d if pool_mode == "concat" else d
  params = in_width  # the null group
  on_slots = on_bytes = attention = 0.0  # weight MACs per slot / per byte, attention MACs per byte
  if pool_mode in ("attention", "latent"):
    on_slots += 2 * d * hd + (mlp if pool_mode == "attention" else 0)
    on_bytes += 2 * d * hd
    attention += 2 * slots * hd
    params += 4 * d * hd + (mlp + 3 * d if pool_mode == "attention" else 2 * d)  # + norms, or query + norm
  if linear:  # "down" and its norm
    on_slots += in_width * dg
    params += in_width * dg + dg
  if up_mode in ("gather", "boundary", "attention") and linear:  # "up"
    on_slots += dg * d
    params += dg * d
  if up_mode in ("linear", "attention"):  # "up_linear"
    on_slots += dg * width * d
    params += dg * width * d
  if up_mode == "slice":  # MEGABYTE's W^GL on one slice per byte
    on_bytes += dg // width * d
    params += dg // width * d
  if up_mode == "attention":
    on_bytes += 2 * d * hd + mlp
    on_slots += 2 * d * hd
    attention += 2 * slots * hd
    params += 4 * d * hd + mlp + 3 * d
  if up_mode == "cross":  # per decoder layer: norm, value and out on the slots
    on_slots += opts["decoder_layers"] * (dg * hd + hd * d)
    params += opts["decoder_layers"] * (dg * hd + hd * d + dg)
  if opts["decoder_input"] != "encoder":  # decoder_embed (and its pad)
    params += _vocab_rows(cfg) * d + (d if opts["decoder_input"] == "embed_pad" else 0)
  parts = {"resampling": {"param_flops": 6.0 * (rate * on_slots + on_bytes), "attention_flops": 6.0 * attention}}
  return parts, params


def _hierarchical_parts(cfg: Any, seq_len: int, slots: float) -> dict[str, dict[str, float]]:
  opts = hierarchical.options(cfg)
  gcfg = hierarchical.global_config(cfg, opts)
  d, dg = cfg.d_model, gcfg.d_model
  encoder = _stack(cfg, (cfg.mixer,) * opts["encoder_layers"], seq_len)
  # Toucan: the decoder layers and the logits run on the expanded stream of T + S - 1 tokens.
  decoder_len = seq_len + int(hierarchical.capacity(opts, seq_len)) - 1 if opts["end_of_token"] else seq_len
  decoder = _stack(cfg, (cfg.mixer,) * opts["decoder_layers"], decoder_len)
  # The global stack runs on the S slots (a fractional S, the realised patches, is kept as is).
  weights, _, attention = _stack(gcfg, (gcfg.mixer,) * opts["global_layers"], slots)
  slot_rate = slots / seq_len
  resampling, _ = _resampling(cfg, opts, dg, seq_len, slots)
  return {"encoder": _part(1.0, encoder[0], encoder[2]),
          "boundary_predictor": _part(1.0, _predictor(cfg, opts)[0]),
          **resampling,
          "global": _part(slot_rate, weights, attention),
          "decoder": _part(decoder_len / seq_len, decoder[0], decoder[2]),
          "logits": _part(decoder_len / seq_len, d * _vocab_rows(cfg))}


def training_flops_per_byte(model_config: Any, seq_len: int, patches_per_byte: float | None = None
                            ) -> dict[str, Any]:
  """Training FLOPs per byte of `model_config` (`config.model`) on windows of seq_len bytes.

  Returns {"param_flops", "attention_flops", "total", "forward" (= total / 3), "parts": {piece:
  {"param_flops", "attention_flops"}}} (conventions: module docstring), plus "matmul_params" (weights
  used in a matmul once per byte-layer token) for the flat families, and for "hierarchical" "slots" (the
  static capacity S), "patches_per_byte" ((S - 1) / T) and, when `patches_per_byte` is given, "realised":
  the same breakdown with S = patches_per_byte * T + 1.
  """
  cfg = model_config
  if cfg.name not in FAMILIES:
    raise ValueError(f"no FLOP count for model family {cfg.name!r}; counted: {', '.join(FAMILIES)}.")
  if cfg.name == "hierarchical":
    slots = hierarchical.capacity(hierarchical.options(cfg), seq_len)
    result = _breakdown(_hierarchical_parts(cfg, seq_len, slots))
    result.update(slots=slots, patches_per_byte=(slots - 1) / seq_len)
    if patches_per_byte is not None:
      result["realised"] = _breakdown(_hierarchical_parts(cfg, seq_len, patches_per_byte * seq_len + 1))
      result["realised"]["slots"] = patches_per_byte * seq_len + 1
    return result
  length = _flat_length(cfg, seq_len)
  weights, _, attention = _stack(cfg, layer_mixers(cfg), length)
  logits = cfg.d_model * _vocab_rows(cfg)
  result = _breakdown({"layers": _part(length / seq_len, weights, attention), "logits": _part(1.0, logits)})
  result["matmul_params"] = weights + logits
  return result


def param_count(model_config: Any) -> int:
  """Every parameter of the model (what `training.runtime.param_count` gives on the initialised tree)."""
  cfg = model_config
  if cfg.name not in FAMILIES:
    raise ValueError(f"no parameter count for model family {cfg.name!r}; counted: {', '.join(FAMILIES)}.")
  d, rows = cfg.d_model, _vocab_rows(cfg)
  total = rows * d + d + (0 if cfg.tie_embeddings else d * rows)  # embedding, final norm, unembed
  if cfg.name != "hierarchical":
    return total + _stack(cfg, layer_mixers(cfg), 1)[1]
  opts = hierarchical.options(cfg)
  gcfg = hierarchical.global_config(cfg, opts)
  byte_layers = _stack(cfg, (cfg.mixer,) * (opts["encoder_layers"] + opts["decoder_layers"]), 1)[1]
  global_layers = _stack(gcfg, (gcfg.mixer,) * opts["global_layers"], 1)[1]
  resampling = _resampling(cfg, opts, gcfg.d_model, 1, 1)[1]
  return total + byte_layers + global_layers + resampling + _predictor(cfg, opts)[1]


def param_count_non_embedding(model_config: Any) -> int:
  """Parameters less the input embedding tables (an untied output matrix counts, as SpaceByte's m); a
  hierarchical decoder on fresh embeddings (MEGABYTE's E^l) has a second one."""
  cfg = model_config
  tables = 1
  if cfg.name == "hierarchical" and hierarchical.options(cfg)["decoder_input"] != "encoder":
    tables = 2
  return param_count(cfg) - tables * _vocab_rows(cfg) * cfg.d_model


def describe(result: dict[str, Any]) -> str:
  """One line: 'training FLOPs/byte 21.4M (weights 18.2M, attention 3.2M)' (+ the realised cost)."""
  m = lambda x: f"{x / 1e6:.1f}M"
  text = (f"training FLOPs/byte {m(result['total'])} (weights {m(result['param_flops'])}, attention "
          f"{m(result['attention_flops'])})")
  if "slots" in result:
    text += f" at {result['slots']} slots"
  if "realised" in result:
    text += f"; {m(result['realised']['total'])} at the realised {result['realised']['slots']:.1f} slots"
  return text
