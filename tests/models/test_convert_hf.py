"""models/convert_hf.py: a Hugging Face ByT5 / MrT5 checkpoint becomes a run directory.

The checkpoints here are small random ones written in exactly HF's layout with the safetensors package:
HF tensor names, torch Linear [out, in] shapes, the relative_attention_bias only in block 0 of each stack,
a T5 config.json with the real keys (and MrT5's extra keys for the gate). Every test reads its own copy.
"""

import importlib.util
import json
import os
import shlex

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import models
from models import convert_hf
from training import checkpoint as ckpt_lib
from training import cli
from training import runtime

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
D, H, DH, F, V = 8, 2, 3, 5, 384  # H * DH != D, so a transposed reshape cannot pass
BUCKETS, MAX_DISTANCE, ENC, DEC, GATE = 4, 16, 3, 2, 2
# A run small enough for CPU tests (the converter's run config is configs/byt5.py plus these).
RUN_OVERRIDES = ("--config.train.seq_len=64", "--config.train.batch_size=2", "--config.train.steps=2",
                 "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.progress_bar=False",
                 "--config.train.compute_dtype=float32", "--config.data.max_corpus_bytes=200000",
                 "--config.eval.batch_size=2", "--config.eval.max_batches=1", "--config.eval.final_max_batches=1",
                 "--config.checkpoint.async_save=False", "--config.model.attention_impl=reference")


def _hf_config(mrt5=False, **changes):
  config = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": D, "d_kv": DH,
            "d_ff": F, "num_layers": ENC, "num_decoder_layers": DEC, "num_heads": H,
            "relative_attention_num_buckets": BUCKETS, "relative_attention_max_distance": MAX_DISTANCE,
            "vocab_size": V, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
            "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1, "is_encoder_decoder": True,
            "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "initializer_factor": 1.0,
            "use_cache": True, "tokenizer_class": "ByT5Tokenizer"}
  if mrt5:  # jkallini/mrt5's MrT5Config keys, with its training script's values
    config.update(architectures=["MrT5ForConditionalGeneration"], model_type="mrt5", delete_gate_layer=GATE,
                  sigmoid_mask_scale=-30.0, deletion_threshold=-15.0, use_softmax1=True, gate_layer_norm=True,
                  deletion_type="scaled_sigmoid", use_gumbel_noise=False)
  config.update(changes)
  return config


def _hf_tensors(seed=0, mrt5=False):
  """Random tensors under HF's T5ForConditionalGeneration (and MrT5) names, [out, in] Linear layout."""
  rng = np.random.default_rng(seed)
  tensors = {}

  def add(name, *shape):
    tensors[name] = rng.standard_normal(shape).astype(np.float32)

  add("shared.weight", V, D)
  add("lm_head.weight", V, D)
  for stack, layers, attentions in (("encoder", ENC, ["SelfAttention"]),
                                    ("decoder", DEC, ["SelfAttention", "EncDecAttention"])):
    add(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", BUCKETS, H)
    for i in range(layers):
      for j, attention in enumerate(attentions):
        add(f"{stack}.block.{i}.layer.{j}.layer_norm.weight", D)
        for p in "qkv":
          add(f"{stack}.block.{i}.layer.{j}.{attention}.{p}.weight", H * DH, D)
        add(f"{stack}.block.{i}.layer.{j}.{attention}.o.weight", D, H * DH)
      ff = f"{stack}.block.{i}.layer.{len(attentions)}"
      add(f"{ff}.layer_norm.weight", D)
      add(f"{ff}.DenseReluDense.wi_0.weight", F, D)
      add(f"{ff}.DenseReluDense.wi_1.weight", F, D)
      add(f"{ff}.DenseReluDense.wo.weight", D, F)
    add(f"{stack}.final_layer_norm.weight", D)
  if mrt5:
    add(f"encoder.block.{GATE}.delete_gate.layer_norm.weight", D)
    add(f"encoder.block.{GATE}.delete_gate.feed_forward.weight", 1, D)
    add(f"encoder.block.{GATE}.delete_gate.feed_forward.bias", 1)
  return tensors


def _write_hf(path, tensors, config):
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return str(path)


def _expected(t, mrt5=False):
  """The Flax tree models/byt5/ uses, built by hand from HF's tensors (the brief's table)."""
  qkv = lambda w: w.T.reshape(D, H, DH)
  attention = lambda p: {"query": {"kernel": qkv(t[f"{p}.q.weight"])}, "key": {"kernel": qkv(t[f"{p}.k.weight"])},
                         "value": {"kernel": qkv(t[f"{p}.v.weight"])},
                         "out": {"kernel": t[f"{p}.o.weight"].T.reshape(H, DH, D)}}
  mlp = lambda p: {"wi_gate": {"kernel": t[f"{p}.wi_0.weight"].T}, "wi_up": {"kernel": t[f"{p}.wi_1.weight"].T},
                   "wo": {"kernel": t[f"{p}.wo.weight"].T}}
  norm = lambda name: {"scale": t[name]}
  encoder = {"relative_bias": {"table": t["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].T},
             "final_norm": norm("encoder.final_layer_norm.weight")}
  for i in range(ENC):
    b = f"encoder.block.{i}.layer"
    encoder[f"layer_{i}"] = {"attention_norm": norm(f"{b}.0.layer_norm.weight"),
                             "attention": attention(f"{b}.0.SelfAttention"),
                             "mlp_norm": norm(f"{b}.1.layer_norm.weight"), "mlp": mlp(f"{b}.1.DenseReluDense")}
  decoder = {"relative_bias": {"table": t["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].T},
             "final_norm": norm("decoder.final_layer_norm.weight")}
  for i in range(DEC):
    b = f"decoder.block.{i}.layer"
    decoder[f"layer_{i}"] = {
        "self_attention_norm": norm(f"{b}.0.layer_norm.weight"), "self_attention": attention(f"{b}.0.SelfAttention"),
        "cross_attention_norm": norm(f"{b}.1.layer_norm.weight"),
        "cross_attention": attention(f"{b}.1.EncDecAttention"),
        "mlp_norm": norm(f"{b}.2.layer_norm.weight"), "mlp": mlp(f"{b}.2.DenseReluDense")}
  if mrt5:
    g = f"encoder.block.{GATE}.delete_gate"
    encoder["delete_gate"] = {"norm": norm(f"{g}.layer_norm.weight"),
                              "proj": {"kernel": t[f"{g}.feed_forward.weight"].T, "bias": t[f"{g}.feed_forward.bias"]}}
  return {"embed": {"embedding": t["shared.weight"]}, "encoder": encoder, "decoder": decoder,
          "lm_head": {"kernel": t["lm_head.weight"].T}}


def _assert_same_tree(actual, expected):
  flat_actual = dict(jax.tree_util.tree_flatten_with_path(actual)[0])
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  assert sorted(map(jax.tree_util.keystr, flat_actual)) == sorted(map(jax.tree_util.keystr, flat_expected))
  for path, value in flat_expected.items():
    np.testing.assert_array_equal(np.asarray(flat_actual[path]), value, err_msg=jax.tree_util.keystr(path))
    assert np.asarray(flat_actual[path]).dtype == np.float32


def _convert_in_memory(hf_dir):
  architecture = convert_hf.read_architecture(hf_dir)
  return architecture, convert_hf.to_params(convert_hf.load_tensors(hf_dir), architecture, hf_dir)


def _main(hf_dir, workdir, *extra):
  return convert_hf.main(["convert_hf", f"--from={hf_dir}", f"--to={workdir}", *RUN_OVERRIDES, *extra])


def _one_error_line(capsys):
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err, err
  return err


def _shapes(tree):
  return {jax.tree_util.keystr(path): x.shape for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _load_script(name):
  spec = importlib.util.spec_from_file_location(f"_{name}_script", os.path.join(REPO_ROOT, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


needs_byt5 = pytest.mark.skipif("byt5" not in models.family_names(),
                                reason="models/byt5/ (model.name 'byt5') is not registered")


def test_every_byt5_tensor_lands_where_it_should(tmp_path):
  tensors = _hf_tensors()
  hf_dir = _write_hf(tmp_path / "hf", tensors, _hf_config())
  architecture, params = _convert_in_memory(hf_dir)
  _assert_same_tree(params, _expected(tensors))
  assert architecture.gate_layer is None and not architecture.softmax1


def test_model_config_comes_from_config_json(tmp_path):
  hf_dir = _write_hf(tmp_path / "hf", _hf_tensors(), _hf_config(layer_norm_epsilon=1e-5, dropout_rate=0.0))
  config = cli.parse(["x", f"--config={cli.DEFAULT_CONFIG}"])[0]
  convert_hf.apply_architecture(config, convert_hf.read_architecture(hf_dir))
  m = config.model
  assert (m.name, m.d_model, m.num_heads, m.head_dim, m.mlp_dim) == ("byt5", D, H, DH, F)
  assert (m.num_layers, m.num_decoder_layers, m.vocab_size, m.norm_eps) == (ENC, DEC, V, 1e-5)
  assert (m.byt5.relative_buckets, m.byt5.relative_max_distance, m.byt5.dropout) == (BUCKETS, MAX_DISTANCE, 0.0)
  assert not m.byt5.softmax1 and not m.byt5.delete_gate.enabled
  json.dumps(config.to_dict())  # as training/ writes config.json


def test_num_decoder_layers_and_max_distance_default_as_in_t5config(tmp_path):
  config = _hf_config(num_decoder_layers=None)
  del config["relative_attention_max_distance"]
  architecture = convert_hf.read_architecture(_write_hf(tmp_path / "hf", {}, config))
  assert (architecture.num_decoder_layers, architecture.max_distance) == (ENC, 128)


def test_mrt5_gate_tensors_and_config(tmp_path):
  tensors = _hf_tensors(seed=1, mrt5=True)
  hf_dir = _write_hf(tmp_path / "hf", tensors, _hf_config(mrt5=True))
  architecture, params = _convert_in_memory(hf_dir)
  _assert_same_tree(params, _expected(tensors, mrt5=True))
  assert params["encoder"]["delete_gate"]["proj"]["kernel"].shape == (D, 1)
  config = cli.parse(["x", f"--config={cli.DEFAULT_CONFIG}"])[0]
  convert_hf.apply_architecture(config, architecture)
  gate = config.model.byt5.delete_gate
  assert (gate.enabled, gate.layer, gate.scale, gate.threshold) == (True, GATE, -30.0, -15.0)
  assert config.model.byt5.softmax1


def test_mrt5_config_defaults_where_it_is_silent(tmp_path):
  config = _hf_config(mrt5=True, deletion_threshold=None)
  del config["use_softmax1"]
  architecture = convert_hf.read_architecture(_write_hf(tmp_path / "hf", {}, config))
  assert architecture.softmax1 and architecture.gate_threshold == -15.0  # released code: softmax1; k / 2


def test_sharded_safetensors_and_tied_embedding_copies(tmp_path):
  tensors = _hf_tensors(seed=2)
  hf_dir = tmp_path / "hf"
  os.makedirs(hf_dir)
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for shard, shard_names in shards.items():
    extra = {"encoder.embed_tokens.weight": tensors["shared.weight"]} if shard.startswith("model-00002") else {}
    save_file({**{n: tensors[n] for n in shard_names}, **extra}, str(hf_dir / shard))
  with open(hf_dir / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": {n: s for s, ns in shards.items() for n in ns}}, f)
  with open(hf_dir / "config.json", "w") as f:
    json.dump(_hf_config(), f)
  _, params = _convert_in_memory(str(hf_dir))
  _assert_same_tree(params, _expected(tensors))


def test_an_embed_tokens_copy_stands_for_a_missing_shared_weight(tmp_path):
  tensors = _hf_tensors(seed=7)
  copy = {**tensors, "decoder.embed_tokens.weight": tensors["shared.weight"]}
  del copy["shared.weight"]
  _, params = _convert_in_memory(_write_hf(tmp_path / "hf", copy, _hf_config()))
  _assert_same_tree(params, _expected(tensors))


def test_bfloat16_tensors_become_float32(tmp_path):
  import ml_dtypes
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in _hf_tensors(seed=3).items()}
  _, params = _convert_in_memory(_write_hf(tmp_path / "hf", tensors, _hf_config()))
  _assert_same_tree(params, _expected({k: v.astype(np.float32) for k, v in tensors.items()}))


@pytest.mark.parametrize("case, needle", [
    ("missing", "has no tensor 'decoder.block.1.layer.1.EncDecAttention.k.weight' (expected shape [6, 8]"),
    ("shape", "tensor 'encoder.block.2.layer.1.DenseReluDense.wo.weight' in"),
    ("extra", "unexpected tensor 'encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight'"),
    ("untied", "'decoder.embed_tokens.weight' in"),
    ("relu", "feed_forward_proj='relu'"),
    ("tied", "tie_word_embeddings=true"),
])
def test_bad_checkpoint_is_one_error_line_and_writes_nothing(tmp_path, capsys, case, needle):
  tensors, config = _hf_tensors(), _hf_config()
  if case == "missing":
    del tensors["decoder.block.1.layer.1.EncDecAttention.k.weight"]
  elif case == "shape":
    tensors["encoder.block.2.layer.1.DenseReluDense.wo.weight"] = np.zeros((F, D), np.float32)
  elif case == "extra":
    tensors["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros((BUCKETS, H),
                                                                                               np.float32)
  elif case == "untied":
    tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"] + 1
  elif case == "relu":
    config["feed_forward_proj"] = "relu"
  else:
    del config["tie_word_embeddings"]  # T5Config's default ties them
  workdir = tmp_path / "run"
  assert _main(_write_hf(tmp_path / "hf", tensors, config), workdir) == 1
  err = _one_error_line(capsys)
  assert needle in err and err.endswith("nothing was written.")
  assert not workdir.exists()


def test_mrt5_gate_tensor_missing_is_named(tmp_path, capsys):
  tensors = _hf_tensors(mrt5=True)
  del tensors[f"encoder.block.{GATE}.delete_gate.feed_forward.bias"]
  assert _main(_write_hf(tmp_path / "hf", tensors, _hf_config(mrt5=True)), tmp_path / "run") == 1
  assert f"has no tensor 'encoder.block.{GATE}.delete_gate.feed_forward.bias' (expected shape [1]" in \
      _one_error_line(capsys)


def test_pytorch_bin_needs_torch(tmp_path, capsys):
  if importlib.util.find_spec("torch") is not None:
    pytest.skip("torch is installed: pytorch_model.bin is readable here")
  hf_dir = tmp_path / "hf"
  os.makedirs(hf_dir)
  (hf_dir / "pytorch_model.bin").write_bytes(b"not read")
  (hf_dir / "config.json").write_text(json.dumps(_hf_config()))
  assert _main(str(hf_dir), tmp_path / "run") == 1
  assert "torch is not installed; convert it to safetensors" in _one_error_line(capsys)


def test_refuses_a_workdir_that_holds_a_run(tmp_path, capsys):
  hf_dir = _write_hf(tmp_path / "hf", _hf_tensors(), _hf_config())
  workdir = tmp_path / "run"
  os.makedirs(workdir)
  (workdir / "config.json").write_text("{}")
  assert _main(hf_dir, workdir) == 1
  assert "already holds a run (config.json)" in _one_error_line(capsys)
  assert (workdir / "config.json").read_text() == "{}"


@needs_byt5
def test_converted_tree_is_exactly_the_model_s_init_tree(tmp_path):
  for mrt5 in (False, True):
    hf_dir = _write_hf(tmp_path / f"hf{mrt5}", _hf_tensors(mrt5=mrt5), _hf_config(mrt5=mrt5))
    architecture, params = _convert_in_memory(hf_dir)
    config = cli.parse(["x", f"--config={REPO_ROOT}/configs/byt5.py"])[0]
    convert_hf.apply_architecture(config, architecture)
    family = models.get_family(runtime.resolve_config(config).model)
    abstract = runtime.strip_boxes(runtime.boxed_abstract_params(family, 16))
    assert _shapes(params) == _shapes(abstract)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(abstract))


@needs_byt5
def test_written_run_evaluates_fine_tunes_and_is_never_overwritten(tmp_path, capsys):
  tensors = _hf_tensors(seed=4, mrt5=True)
  hf_dir = _write_hf(tmp_path / "hf", tensors, _hf_config(mrt5=True))
  workdir = str(tmp_path / "run")
  assert _main(hf_dir, workdir, "--config.model.byt5.delete_gate.capacity_buckets=1") == 0, \
      capsys.readouterr().err  # one hard-deletion program to compile, not four
  out = capsys.readouterr().out
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  assert checkpointer.all_steps() == [0]
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["model"]["name"] == "byt5" and saved["model"]["byt5"]["delete_gate"]["layer"] == GATE
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), _expected(tensors, mrt5=True))
  _assert_same_tree(checkpointer.restore_params(0, abstract), _expected(tensors, mrt5=True))
  checkpointer.close()

  assert _load_script("evaluate").main(["evaluate.py", f"--workdir={workdir}", "--eval.max_batches=1"]) == 0
  with open(os.path.join(workdir, "eval", "bpb_step0.json")) as f:
    assert all(np.isfinite(e["metrics"]["bpb"]) for e in json.load(f)["entries"].values())
  capsys.readouterr()  # its table and progress line

  # Converting again into the same directory is refused and leaves it as it was.
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert _main(hf_dir, workdir) == 1
  assert "already holds a checkpoint (step 0" in _one_error_line(capsys)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before

  # The printed train.py command resumes from step 0 (the converted weights) and trains on.
  command = next(line for line in out.splitlines() if line.startswith("fine-tune: python train.py "))
  argv = [f"--config={REPO_ROOT}/{a.split('=', 1)[1]}" if a.startswith("--config=configs/") else a
          for a in shlex.split(command.removeprefix("fine-tune: python "))]  # run from the repo root
  assert _load_script("train").main(argv) == 0, capsys.readouterr().err
  assert ckpt_lib.Checkpointer(workdir, read_only=True).all_steps()[-1] == 2


def _bucket(relative, bidirectional, num_buckets, max_distance):
  """HF T5Attention._relative_position_bucket (relative = key position - query position)."""
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0) * num_buckets
    relative = np.abs(relative)
  else:
    relative = -np.minimum(relative, 0)
  exact = num_buckets // 2
  large = exact + (np.log(np.maximum(relative, 1) / exact) / np.log(max_distance / exact)
                   * (num_buckets - exact)).astype(int)  # used where relative >= exact only
  return buckets + np.where(relative < exact, relative, np.minimum(large, num_buckets - 1))


def _numpy_t5_logits(t, inputs, decoder_inputs, gate=None):
  """HF T5ForConditionalGeneration's forward (modeling_t5.py, gated-gelu, untied) in float64 numpy; with
  `gate` (MrT5 soft deletion, modeling_mrt5.py): G = k sigmoid(-feed_forward(layer_norm(h))) at the input of
  encoder block GATE (k at pads), added to the keys' logits of that block on and of every cross-attention,
  and softmax1 in every attention."""
  w = {k: v.astype(np.float64) for k, v in t.items()}
  norm = lambda x, name: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * w[name]
  gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    extra = np.exp(-s.max(-1, keepdims=True)) if gate else 0.0
    return e / (e.sum(-1, keepdims=True) + extra)

  def attend(p, x, kv, bias):
    heads = lambda y, name: (y @ w[f"{p}.{name}.weight"].T).reshape(*y.shape[:2], H, DH).transpose(0, 2, 1, 3)
    q, k, v = heads(x, "q"), heads(kv, "k"), heads(kv, "v")
    o = softmax(q @ k.transpose(0, 1, 3, 2) + bias) @ v
    return o.transpose(0, 2, 1, 3).reshape(*x.shape[:2], H * DH) @ w[f"{p}.o.weight"].T

  def ff(p, x):
    return (gelu(x @ w[f"{p}.wi_0.weight"].T) * (x @ w[f"{p}.wi_1.weight"].T)) @ w[f"{p}.wo.weight"].T

  def position_bias(stack, length, bidirectional):
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    table = w[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    return table[_bucket(relative, bidirectional, BUCKETS, MAX_DISTANCE)].transpose(2, 0, 1)[None]

  key_mask = np.where(inputs != 0, 0.0, -1e30)[:, None, None, :]
  h, bias, deleted = w["shared.weight"][inputs], position_bias("encoder", inputs.shape[1], True) + key_mask, 0.0
  for i in range(ENC):
    if gate and i == GATE:
      g = f"encoder.block.{GATE}.delete_gate"
      z = norm(h, f"{g}.layer_norm.weight") @ w[f"{g}.feed_forward.weight"].T + w[f"{g}.feed_forward.bias"]
      deleted = np.where(inputs == 0, gate, gate / (1 + np.exp(z[..., 0])))[:, None, None, :]
    h = h + attend(f"encoder.block.{i}.layer.0.SelfAttention", norm(h, f"encoder.block.{i}.layer.0.layer_norm.weight"),
                   norm(h, f"encoder.block.{i}.layer.0.layer_norm.weight"), bias + deleted)
    h = h + ff(f"encoder.block.{i}.layer.1.DenseReluDense", norm(h, f"encoder.block.{i}.layer.1.layer_norm.weight"))
  encoded = norm(h, "encoder.final_layer_norm.weight")
  u = decoder_inputs.shape[1]
  y, causal = w["shared.weight"][decoder_inputs], np.where(np.tril(np.ones((u, u))) > 0, 0.0, -1e30)
  for i in range(DEC):
    b = f"decoder.block.{i}.layer"
    x = norm(y, f"{b}.0.layer_norm.weight")
    y = y + attend(f"{b}.0.SelfAttention", x, x, position_bias("decoder", u, False) + causal)
    y = y + attend(f"{b}.1.EncDecAttention", norm(y, f"{b}.1.layer_norm.weight"), encoded, key_mask + deleted)
    y = y + ff(f"{b}.2.DenseReluDense", norm(y, f"{b}.2.layer_norm.weight"))
  return norm(y, "decoder.final_layer_norm.weight") @ w["lm_head.weight"].T


def _ids(seed, batch=2, length=11, targets=6):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(3, 259, (batch, length))
  inputs[1, length - 4:] = 0  # padding: masked in the encoder and in cross-attention
  decoder_inputs = rng.integers(3, 259, (batch, targets))
  decoder_inputs[:, 0] = 0  # the decoder start id
  return inputs, decoder_inputs


def _family_logits(hf_dir, inputs, decoder_inputs):
  architecture, params = _convert_in_memory(hf_dir)
  config = cli.parse(["x", f"--config={REPO_ROOT}/configs/byt5.py"])[0]
  convert_hf.apply_architecture(config, architecture)
  with config.unlocked():
    config.train.compute_dtype, config.model.attention_impl = "float32", "reference"
  family = models.get_family(runtime.resolve_config(config).model)
  logits, _ = family.module().apply({"params": params}, inputs.astype(np.int32), decoder_inputs.astype(np.int32))
  return np.asarray(logits)


@needs_byt5
@pytest.mark.parametrize("mrt5", [False, True], ids=["byt5", "mrt5_soft_deletion"])
def test_logits_match_a_numpy_port_of_hf_t5(tmp_path, mrt5):
  tensors = {k: 0.5 * v for k, v in _hf_tensors(seed=6, mrt5=mrt5).items()}
  hf_dir = _write_hf(tmp_path / "hf", tensors, _hf_config(mrt5=mrt5))
  inputs, decoder_inputs = _ids(0)
  expected = _numpy_t5_logits(tensors, inputs, decoder_inputs, gate=-30.0 if mrt5 else None)
  np.testing.assert_allclose(_family_logits(hf_dir, inputs, decoder_inputs), expected, rtol=1e-4, atol=1e-4)


@needs_byt5
def test_logits_match_transformers_t5(tmp_path):
  torch = pytest.importorskip("torch", reason="torch is not installed (the HF comparison needs it)")
  transformers = pytest.importorskip("transformers", reason="transformers is not installed")
  hf_config, tensors = _hf_config(dropout_rate=0.0), _hf_tensors(seed=5)
  hf_dir = _write_hf(tmp_path / "hf", tensors, hf_config)
  reference = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_config)).eval()
  missing, unexpected = reference.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()},
                                                 strict=False)
  assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
  inputs, decoder_inputs = _ids(1)
  with torch.no_grad():
    expected = reference(input_ids=torch.from_numpy(inputs), attention_mask=torch.from_numpy(inputs != 0),
                         decoder_input_ids=torch.from_numpy(decoder_inputs)).logits.numpy()
  np.testing.assert_allclose(_family_logits(hf_dir, inputs, decoder_inputs), expected, rtol=2e-4, atol=2e-4)
