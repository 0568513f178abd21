"""Import a Hugging Face ByT5 / MrT5 checkpoint into a run directory that evaluate.py and train.py accept.

    python -m models.convert_hf --from HF_DIR --to WORKDIR
    python -m models.convert_hf --from HF_DIR --to WORKDIR --config=configs/byt5.py --config.train.steps=1000

HF_DIR holds `config.json` (a T5Config, or jkallini/mrt5's MrT5Config) and the weights: `model.safetensors`,
or sharded `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`, or (only where torch is
installed) `pytorch_model.bin` / its sharded index. WORKDIR gets what train.py writes at the start of a
run: `config.json` and an orbax checkpoint of the TrainState at step 0 (the converted params, a fresh
optimizer state) with the data iterator of that config, so `python evaluate.py --workdir=WORKDIR` scores
it and train.py fine-tunes it from step 0. train.py builds its model from its --config, not from
WORKDIR/config.json, so the converter prints the train.py command line that rebuilds this run config: the
config file plus one --config.* override per key that differs from it.

The run config starts from configs/byt5.py (configs/base.py while that file does not exist) or `--config`,
takes the architecture from config.json (`model.*` below) and then applies the `--config.*` overrides.
Everything is read and checked before anything is written: a missing tensor, an unexpected one, a shape
that config.json does not imply, an unsupported config and a WORKDIR that already holds a run are each one
error sentence, and then nothing is written.

Tensor names ([out, in] torch Linear layout) -> Flax params of models/byt5/ (all f32):

    shared.weight [V, D]                                  -> embed/embedding [V, D]
      (encoder./decoder.embed_tokens.weight, where saved, must equal it: HF ties all three)
    {enc,dec}oder.block.0.layer.0.SelfAttention.relative_attention_bias.weight [B, H]
                                                          -> {enc,dec}oder/relative_bias/table [H, B]
    encoder.block.{i}.layer.0.layer_norm.weight           -> encoder/layer_{i}/attention_norm/scale
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v}.weight [H*Dh, D]
                                             -> encoder/layer_{i}/attention/{query,key,value}/kernel [D, H, Dh]
    encoder.block.{i}.layer.0.SelfAttention.o.weight [D, H*Dh] -> encoder/layer_{i}/attention/out/kernel [H, Dh, D]
    encoder.block.{i}.layer.1.layer_norm.weight           -> encoder/layer_{i}/mlp_norm/scale
    encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight -> encoder/layer_{i}/mlp/{wi_gate,wi_up,wo}/kernel
    encoder.final_layer_norm.weight                       -> encoder/final_norm/scale
    decoder.block.{i}.layer.0.* (SelfAttention)           -> decoder/layer_{i}/self_attention{_norm}/...
    decoder.block.{i}.layer.1.* (EncDecAttention)         -> decoder/layer_{i}/cross_attention{_norm}/...
    decoder.block.{i}.layer.2.* (DenseReluDense)          -> decoder/layer_{i}/mlp{_norm}/...
    decoder.final_layer_norm.weight                       -> decoder/final_norm/scale
    lm_head.weight [V, D]                                 -> lm_head/kernel [D, V]
  MrT5 (jkallini/mrt5 models/modeling_mrt5.py: `MrT5Stack` gives encoder block `delete_gate_layer` a
  `MrT5Block.delete_gate = SigmoidDeleteGate(config)`, which holds `layer_norm = T5LayerNorm(d_model)` and
  `feed_forward = nn.Linear(d_model, 1)`):
    encoder.block.{g}.delete_gate.layer_norm.weight [D]   -> encoder/delete_gate/norm/scale [D]
    encoder.block.{g}.delete_gate.feed_forward.weight [1, D] -> encoder/delete_gate/proj/kernel [D, 1]
    encoder.block.{g}.delete_gate.feed_forward.bias [1]   -> encoder/delete_gate/proj/bias [1]
  (T5LayerNorm there keeps its default eps 1e-6, not layer_norm_epsilon; ByT5 uses 1e-6 for both.)
  Ignored, as HF ignores it: decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight
  (old T5 checkpoints carry it unused).

config.json -> config.model: name "byt5"; d_model, num_heads (num_heads), head_dim (d_kv), mlp_dim (d_ff),
num_layers (encoder), num_decoder_layers (default num_layers), vocab_size (embedding rows, vocab_size),
norm_eps (layer_norm_epsilon); model.byt5.relative_buckets (relative_attention_num_buckets),
relative_max_distance (relative_attention_max_distance), dropout (dropout_rate), softmax1 (MrT5's
use_softmax1) and for MrT5 model.byt5.delete_gate.{enabled, layer (delete_gate_layer), scale
(sigmoid_mask_scale, k), threshold (deletion_threshold)}. Absent T5 keys take T5Config's defaults, as HF
does. feed_forward_proj must be "gated-gelu" (HF: GeGLU with gelu_new, the tanh approximation; its
spelling "gated-gelu_new" is the same function) and tie_word_embeddings false (ByT5 unties them). MrT5 choices where its config.json is silent: use_softmax1
absent means true (the released modeling_mrt5.py always applies softmax1 in MrT5Attention), a null
deletion_threshold means sigmoid_mask_scale / 2 (the training scripts' -15 for k = -30).
"""

import json
import os
import shlex
import sys
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import flags

from training import checkpoint as ckpt_lib
from training import cli
from training import loop
from training import runtime
from training import train_step as ts
from training.errors import CheckpointError, ConfigError

_CONFIG_FILES = (os.path.join(cli.REPO_ROOT, "configs", "byt5.py"), cli.DEFAULT_CONFIG)
_MIN_VOCAB = 259  # byte ids 0 pad, 1 eos, 2 unk, byte b -> b + 3
# T5Config's defaults (transformers configuration_t5.py), used where config.json omits a key.
_T5_DEFAULTS = {"d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_decoder_layers": None,
                "num_heads": 8, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu",
                "tie_word_embeddings": True, "vocab_size": 32128}
_GATED_GELU = ("gated-gelu", "gated-gelu_new")  # HF maps both to gelu_new (tanh-approximated GELU)
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
_TIED_EMBEDDINGS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


class Architecture(NamedTuple):
  """The sizes config.json implies (HF names in comments)."""
  d_model: int
  num_heads: int
  head_dim: int  # d_kv
  mlp_dim: int  # d_ff
  num_layers: int  # encoder blocks
  num_decoder_layers: int
  vocab_size: int  # embedding rows
  num_buckets: int  # relative_attention_num_buckets
  max_distance: int  # relative_attention_max_distance
  norm_eps: float
  dropout: float
  softmax1: bool
  gate_layer: int | None  # MrT5's delete_gate_layer; None for ByT5
  gate_scale: float | None  # sigmoid_mask_scale (k)
  gate_threshold: float | None  # deletion_threshold


class _Entry(NamedTuple):
  path: tuple[str, ...]  # Flax param path
  name: str  # HF tensor name
  shape: tuple[int, ...]  # HF shape
  convert: Callable[[np.ndarray], np.ndarray]


def _identity(x):
  return x


def _transposed(x):
  return x.T


def _heads_in(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
  """q/k/v [H*Dh, D] -> [D, H, Dh]."""
  return lambda x: x.T.reshape(x.shape[1], heads, head_dim)


def _heads_out(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
  """o [D, H*Dh] -> [H, Dh, D]."""
  return lambda x: x.T.reshape(heads, head_dim, x.shape[0])


def _error(cls: type[Exception], text: str) -> Exception:
  return cls(f"{text}; nothing was written.")


def read_architecture(hf_dir: str) -> Architecture:
  """config.json of HF_DIR -> its sizes; an unsupported T5 variant is one ConfigError."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise _error(ConfigError, f"{hf_dir} has no config.json (expected a Hugging Face T5/ByT5/MrT5 "
                              f"checkpoint directory)")
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise _error(ConfigError, f"{path} is not readable JSON ({e})") from None
  hf = {**_T5_DEFAULTS, **{k: v for k, v in raw.items() if v is not None or k not in _T5_DEFAULTS}}
  if hf["num_decoder_layers"] is None:
    hf["num_decoder_layers"] = hf["num_layers"]
  if hf["feed_forward_proj"] not in _GATED_GELU:
    raise _error(ConfigError, f"{path} has feed_forward_proj={hf['feed_forward_proj']!r}; only T5 v1.1 / ByT5 "
                              f"checkpoints with 'gated-gelu' (GeGLU) feed-forward layers can be converted")
  if hf["tie_word_embeddings"]:
    raise _error(ConfigError, f"{path} has tie_word_embeddings=true (or omits it, T5Config's default); only "
                              f"checkpoints with an untied lm_head, as ByT5's, can be converted")
  if hf["vocab_size"] < _MIN_VOCAB:
    raise _error(ConfigError, f"{path} has vocab_size={hf['vocab_size']}, fewer than the {_MIN_VOCAB} byte ids; "
                              f"this is not a byte-level (ByT5) checkpoint")
  mrt5 = raw.get("model_type") == "mrt5" or "delete_gate_layer" in raw
  gate = _gate_settings(raw, path, hf["num_layers"]) if mrt5 else (None, None, None)
  return Architecture(
      d_model=int(hf["d_model"]), num_heads=int(hf["num_heads"]), head_dim=int(hf["d_kv"]),
      mlp_dim=int(hf["d_ff"]), num_layers=int(hf["num_layers"]),
      num_decoder_layers=int(hf["num_decoder_layers"]), vocab_size=int(hf["vocab_size"]),
      num_buckets=int(hf["relative_attention_num_buckets"]),
      max_distance=int(hf["relative_attention_max_distance"]), norm_eps=float(hf["layer_norm_epsilon"]),
      dropout=float(hf["dropout_rate"]), softmax1=bool(raw.get("use_softmax1", mrt5)), gate_layer=gate[0],
      gate_scale=gate[1], gate_threshold=gate[2])


def _gate_settings(raw: dict, path: str, num_layers: int) -> tuple[int, float, float]:
  """(delete_gate_layer, sigmoid_mask_scale, deletion_threshold) of an MrT5 config.json."""
  for key in ("delete_gate_layer", "sigmoid_mask_scale"):
    if raw.get(key) is None:
      raise _error(ConfigError, f"{path} is an MrT5 config without {key}")
  layer, scale = raw["delete_gate_layer"], float(raw["sigmoid_mask_scale"])
  if not isinstance(layer, int) or not 0 <= layer < num_layers:
    raise _error(ConfigError, f"{path} has delete_gate_layer={layer!r}, not an encoder block index "
                              f"(0..{num_layers - 1})")
  if raw.get("deletion_type", "scaled_sigmoid") != "scaled_sigmoid":
    raise _error(ConfigError, f"{path} has deletion_type={raw['deletion_type']!r}; only MrT5's learned "
                              f"'scaled_sigmoid' delete gate can be converted")
  if not raw.get("gate_layer_norm", True):
    raise _error(ConfigError, f"{path} has gate_layer_norm=false; only delete gates with their RMS layer norm "
                              f"can be converted")
  threshold = raw.get("deletion_threshold")
  return layer, scale, scale / 2 if threshold is None else float(threshold)


def _attention(prefix: str, path: tuple[str, ...], a: Architecture) -> list[_Entry]:
  inner = a.num_heads * a.head_dim
  heads_in = _heads_in(a.num_heads, a.head_dim)
  return [*(_Entry((*path, ours, "kernel"), f"{prefix}.{hf}.weight", (inner, a.d_model), heads_in)
            for ours, hf in (("query", "q"), ("key", "k"), ("value", "v"))),
          _Entry((*path, "out", "kernel"), f"{prefix}.o.weight", (a.d_model, inner),
                 _heads_out(a.num_heads, a.head_dim))]


def _mlp(prefix: str, path: tuple[str, ...], a: Architecture) -> list[_Entry]:
  d, f = a.d_model, a.mlp_dim
  return [_Entry((*path, "wi_gate", "kernel"), f"{prefix}.wi_0.weight", (f, d), _transposed),
          _Entry((*path, "wi_up", "kernel"), f"{prefix}.wi_1.weight", (f, d), _transposed),
          _Entry((*path, "wo", "kernel"), f"{prefix}.wo.weight", (d, f), _transposed)]


def _norm(path: tuple[str, ...], name: str, a: Architecture) -> _Entry:
  return _Entry((*path, "scale"), name, (a.d_model,), _identity)


def mapping(a: Architecture) -> list[_Entry]:
  """Every HF tensor of the architecture with its Flax path, HF shape and conversion."""
  entries = [_Entry(("embed", "embedding"), "shared.weight", (a.vocab_size, a.d_model), _identity),
             _Entry(("lm_head", "kernel"), "lm_head.weight", (a.vocab_size, a.d_model), _transposed)]
  stacks = {"encoder": (a.num_layers, (("attention", "SelfAttention"), ("mlp", None))),
            "decoder": (a.num_decoder_layers, (("self_attention", "SelfAttention"),
                                               ("cross_attention", "EncDecAttention"), ("mlp", None)))}
  for stack, (num_layers, sublayers) in stacks.items():
    entries.append(_Entry((stack, "relative_bias", "table"),
                          f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                          (a.num_buckets, a.num_heads), _transposed))
    for i in range(num_layers):
      layer = (stack, f"layer_{i}")
      for j, (ours, hf) in enumerate(sublayers):
        prefix = f"{stack}.block.{i}.layer.{j}"
        entries.append(_norm((*layer, f"{ours}_norm"), f"{prefix}.layer_norm.weight", a))
        entries += (_attention(f"{prefix}.{hf}", (*layer, ours), a) if hf else
                    _mlp(f"{prefix}.DenseReluDense", (*layer, ours), a))
    entries.append(_norm((stack, "final_norm"), f"{stack}.final_layer_norm.weight", a))
  if a.gate_layer is not None:
    gate, prefix = ("encoder", "delete_gate"), f"encoder.block.{a.gate_layer}.delete_gate"
    entries += [_norm((*gate, "norm"), f"{prefix}.layer_norm.weight", a),
                _Entry((*gate, "proj", "kernel"), f"{prefix}.feed_forward.weight", (1, a.d_model), _transposed),
                _Entry((*gate, "proj", "bias"), f"{prefix}.feed_forward.bias", (1,), _identity)]
  return entries


def _weight_files(hf_dir: str) -> tuple[list[str], Callable[[str], dict[str, np.ndarray]]]:
  """The weight files of HF_DIR (safetensors preferred) and the function that reads one of them."""
  for single, index, reader in (("model.safetensors", "model.safetensors.index.json", _read_safetensors),
                                ("pytorch_model.bin", "pytorch_model.bin.index.json", _read_torch)):
    if os.path.isfile(os.path.join(hf_dir, single)):
      return [os.path.join(hf_dir, single)], reader
    if os.path.isfile(os.path.join(hf_dir, index)):
      try:
        with open(os.path.join(hf_dir, index)) as f:
          shards = sorted(set(json.load(f)["weight_map"].values()))
      except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
        raise _error(CheckpointError, f"{os.path.join(hf_dir, index)} is not a readable weight index "
                                      f"({type(e).__name__}: {e})") from None
      return [os.path.join(hf_dir, shard) for shard in shards], reader
  raise _error(CheckpointError, f"{hf_dir} has no weights (model.safetensors, model.safetensors.index.json, "
                                f"pytorch_model.bin or pytorch_model.bin.index.json)")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # bf16 tensors come back as ml_dtypes.bfloat16
  return load_file(path)


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise _error(CheckpointError, f"{path} is a PyTorch pickle and torch is not installed; convert it to "
                                  f"safetensors (model.safetensors) or install torch") from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {name: t.detach().float().numpy() for name, t in state.items()}


def load_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of HF_DIR's weight files, by name."""
  files, reader = _weight_files(hf_dir)
  tensors = {}
  for path in files:
    if not os.path.isfile(path):
      raise _error(CheckpointError, f"the weight shard {path} named by the index does not exist")
    try:
      tensors.update(reader(path))
    except CheckpointError:
      raise
    except Exception as e:  # a truncated or corrupt file: one sentence, whatever the reader raised
      raise _error(CheckpointError, f"{path} is unreadable ({type(e).__name__}: {str(e)[:200]})") from None
  return tensors


def to_params(tensors: dict[str, np.ndarray], a: Architecture, where: str) -> dict[str, Any]:
  """Checks the tensors against the architecture (names, shapes) and returns the Flax param tree (f32)."""
  entries = mapping(a)
  if "shared.weight" not in tensors:  # HF ties the three: a checkpoint may keep any one of them
    tensors = {**tensors, **{"shared.weight": tensors[n] for n in _TIED_EMBEDDINGS[::-1] if n in tensors}}
  for entry in entries:
    if entry.name not in tensors:
      raise _error(CheckpointError, f"{where} has no tensor {entry.name!r} (expected shape "
                                    f"{list(entry.shape)} from its config.json)")
    if tuple(tensors[entry.name].shape) != entry.shape:
      raise _error(CheckpointError, f"tensor {entry.name!r} in {where} has shape {list(tensors[entry.name].shape)}, "
                                    f"expected {list(entry.shape)} from its config.json")
  known = {e.name for e in entries} | set(_IGNORED)
  for name in _TIED_EMBEDDINGS:
    if name in tensors:
      known.add(name)
      if not np.array_equal(tensors[name], tensors["shared.weight"]):
        raise _error(CheckpointError, f"tensor {name!r} in {where} differs from shared.weight (HF ties them; "
                                      f"this checkpoint is inconsistent)")
  extra = sorted(set(tensors) - known)
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise _error(CheckpointError, f"{where} has an unexpected tensor {extra[0]!r}{more} that a "
                                  f"{'MrT5' if a.gate_layer is not None else 'ByT5'} checkpoint with its "
                                  f"config.json does not have")
  params: dict[str, Any] = {}
  for entry in entries:
    node = params
    for key in entry.path[:-1]:
      node = node.setdefault(key, {})
    node[entry.path[-1]] = np.ascontiguousarray(entry.convert(tensors[entry.name]), dtype=np.float32)
  return params


def _set(section: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets a key, replacing an existing field's type where it differs (e.g. an int default by a float)."""
  if key in section and type(section[key]) is not type(value):
    del section[key]
  section[key] = value


def apply_architecture(config: ml_collections.ConfigDict, a: Architecture) -> None:
  """Writes the architecture into config.model (in place), keeping the other keys the config file has."""
  with config.unlocked():
    _apply_architecture(config.model, a)


def _apply_architecture(m: ml_collections.ConfigDict, a: Architecture) -> None:
  if "byt5" not in m:  # configs/base.py has no ByT5 section: the model's defaults fill the rest
    m.byt5 = ml_collections.ConfigDict()
  if "delete_gate" not in m.byt5:
    m.byt5.delete_gate = ml_collections.ConfigDict()
  t5, gate = m.byt5, m.byt5.delete_gate
  values = [(m, "name", "byt5"), (m, "d_model", a.d_model), (m, "num_heads", a.num_heads),
            (m, "head_dim", a.head_dim), (m, "mlp_dim", a.mlp_dim), (m, "num_layers", a.num_layers),
            (m, "num_decoder_layers", a.num_decoder_layers), (m, "vocab_size", a.vocab_size),
            (m, "norm_eps", a.norm_eps), (t5, "relative_buckets", a.num_buckets),
            (t5, "relative_max_distance", a.max_distance), (t5, "dropout", a.dropout),
            (t5, "softmax1", a.softmax1), (gate, "enabled", a.gate_layer is not None)]
  if a.gate_layer is not None:
    values += [(gate, "layer", a.gate_layer), (gate, "scale", a.gate_scale), (gate, "threshold", a.gate_threshold)]
  for section, key, value in values:
    _set(section, key, value)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'encoder/layer_0/attention/query/kernel' -> shape, for any pytree of arrays or ShapeDtypeStructs."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape) for path, x in leaves}


def _check_against_model(params: dict, abstract: Any, where: str) -> None:
  """The converted tree must be exactly the family's init tree (paths and shapes)."""
  ours, theirs = _shapes(params), _shapes(abstract)
  for key in sorted(set(ours) | set(theirs)):
    if ours.get(key) != theirs.get(key):
      what = ("is not a parameter of" if key not in theirs else "is missing for" if key not in ours
              else f"has shape {list(ours[key])} from {where}, not {list(theirs[key])}, in")
      raise _error(ConfigError, f"the converted parameter {key} {what} model.name='byt5' built from this "
                                f"run config")


def _refuse_existing_run(workdir: str) -> None:
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  steps = checkpointer.all_steps()
  checkpointer.close()
  if steps:
    raise _error(CheckpointError, f"{workdir} already holds a checkpoint (step {steps[-1]} in "
                                  f"{ckpt_lib.checkpoint_dir(workdir)}); convert into a new --to directory")
  if os.path.exists(os.path.join(workdir, "config.json")):
    raise _error(CheckpointError, f"{workdir} already holds a run (config.json); convert into a new --to "
                                  f"directory")


def _write_run(config: ml_collections.ConfigDict, workdir: str, params: dict, where: str) -> None:
  """Checks the params against the model, then writes config.json + the step-0 checkpoint (training/)."""
  family = runtime.family(config)
  tx, _ = ts.make_optimizer(config.optimizer, config.train.steps)
  with runtime.mesh_context(config) as mesh:
    abstract_state, _ = ts.state_shardings(family, tx, config, mesh)
  _check_against_model(params, abstract_state.params, where)
  loop.write_initial_run(config, workdir, params)


def _override_value(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return ",".join(str(v) for v in value) if value else "()"
  return str(value)


def fine_tune_command(file_config: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                      config_file: str, workdir: str) -> str | None:
  """The train.py command line that rebuilds `config` from its config file (None if it lacks a key)."""
  before, after = _flat(file_config.to_dict()), _flat(config.to_dict())
  changed = [k for k in after if k != "model.dtype" and (k not in before or before[k] != after[k])]
  if any(k not in before for k in changed):
    return None
  inside = os.path.abspath(config_file).startswith(cli.REPO_ROOT + os.sep)
  config_file = os.path.relpath(config_file, cli.REPO_ROOT) if inside else config_file
  args = ["python", "train.py", f"--config={config_file}", f"--workdir={workdir}",
          *(f"--config.{k}={_override_value(after[k])}" for k in changed)]
  return " ".join(shlex.quote(a) for a in args)


def convert(hf_dir: str, workdir: str, *, config_file: str | None = None,
            overrides: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Reads and checks HF_DIR, then writes the run directory WORKDIR. Returns the resolved run config."""
  _refuse_existing_run(workdir)
  config_file = config_file or next(p for p in _CONFIG_FILES if os.path.isfile(p))
  file_config, _ = cli.parse(["convert_hf", f"--config={config_file}"])
  architecture = read_architecture(hf_dir)
  params = to_params(load_tensors(hf_dir), architecture, hf_dir)
  config = ml_collections.ConfigDict(file_config.to_dict())
  apply_architecture(config, architecture)
  cli.apply_overrides(config, overrides)
  config = runtime.resolve_config(config)
  _write_run(config, workdir, params, hf_dir)
  kind = "MrT5" if architecture.gate_layer is not None else "ByT5"
  print(f"wrote {kind} ({runtime.param_count(params):,} params, {architecture.num_layers} encoder / "
        f"{architecture.num_decoder_layers} decoder layers) from {hf_dir} to {workdir} as step 0", flush=True)
  print(f"evaluate: python evaluate.py --workdir={shlex.quote(workdir)}")
  command = fine_tune_command(file_config, config, config_file, workdir)
  print(f"fine-tune: {command}" if command else
        f"fine-tune: train.py needs a config file with every key of {workdir}/config.json "
        f"(configs/byt5.py); {config_file} lacks some")
  return config


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("from", None, "Hugging Face checkpoint directory (config.json + weights).", flag_values=fv)
  flags.DEFINE_string("to", None, "Run directory to create (must not hold a run yet).", flag_values=fv)
  flags.DEFINE_string("config", None, "Config file the run config starts from (default configs/byt5.py, else "
                      "configs/base.py).", flag_values=fv)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)

  def body():
    is_override = lambda a: a.startswith("-") and "." in a.lstrip("-").split("=", 1)[0]
    fv = flags.FlagValues()
    _define_flags(fv)
    try:
      rest = fv([a for a in argv if not is_override(a)])
    except flags.Error as e:
      raise ConfigError(f"invalid command line: {e}") from None
    if len(rest) > 1:
      raise ConfigError(f"unexpected positional arguments: {' '.join(rest[1:])}.")
    if not fv["from"].value or not fv["to"].value:
      raise ConfigError("--from (the Hugging Face checkpoint directory) and --to (the new run directory) "
                        "are both required.")
    convert(fv["from"].value, fv["to"].value, config_file=fv["config"].value,
            overrides=tuple(a for a in argv[1:] if is_override(a)))

  return cli.run_main(body)


if __name__ == "__main__":
  sys.exit(main())
