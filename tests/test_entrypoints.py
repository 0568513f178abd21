"""train.py and evaluate.py end to end, in-process: the run directory layout and evaluate.py's tasks.

One tiny run (configs/tiny.py: 20 steps, log every 5, eval every 10, checkpoints at 10 and 20) is trained
per module; the evaluate.py tests read it.
"""

import glob
import importlib.util
import json
import math
import os

import ml_collections
import pytest

from configs import base
from training import cli
from training import evaluation

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20


def _load_script(name):
  spec = importlib.util.spec_from_file_location(f"_{name}_script", os.path.join(REPO_ROOT, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def evaluate():
  return _load_script("evaluate")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("entrypoints") / "run")
  train = _load_script("train")
  assert train.main(["train.py", f"--config={REPO_ROOT}/configs/tiny.py", f"--workdir={path}"]) == 0
  return path


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _eval_bpb_logged(workdir, step):
  return [r["eval/bpb"] for r in _records(workdir) if r["step"] == step and "eval/bpb" in r][-1]


def _result(workdir, name):
  with open(os.path.join(workdir, "eval", name)) as f:
    return json.load(f)


def test_train_writes_the_run_directory(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  assert config["train"]["steps"] == STEPS and config["train"]["log_every"] == 5
  assert config["model"]["d_model"] == 32 and config["model"]["dtype"] == "float32"  # resolved

  records = _records(workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [5, 10, 15, 20]
  for r in train:
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(r)
    assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in ("loss", "lr", "tokens_per_s"))
    assert r["tokens_per_s"] > 0
  evals = [r for r in records if "eval/bpb" in r]
  assert [r["step"] for r in evals] == [10, STEPS]  # periodic at eval_every=10, plus the final one
  assert all(0 < r["eval/bpb"] < 16 for r in evals)
  assert all(r["eval/bytes"] == 2 * 4 * 32 for r in evals)  # eval.max_batches * eval.batch_size * seq_len

  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
  for step in ("10", "20"):
    assert {"state", "data", "config"} <= set(os.listdir(os.path.join(workdir, "checkpoints", step)))


def test_evaluate_bpb_on_the_latest_checkpoint(workdir, evaluate, capsys):
  # The training run's own evals read eval.max_batches=2 batches of the valid split: the same numbers.
  assert evaluate.main(["evaluate.py", f"--workdir={workdir}", "--tasks=bpb", "--eval.max_batches=2"]) == 0
  out = capsys.readouterr().out
  path = os.path.join(workdir, "eval", f"bpb_step{STEPS}.json")
  assert f"== bpb (step {STEPS}) ==" in out and f"wrote {path}" in out
  header = out.splitlines()[1].split()
  assert header == ["split", "source", "bpb", "loss_nats", "bytes"]
  result = _result(workdir, f"bpb_step{STEPS}.json")
  assert result["task"] == "bpb" and result["step"] == STEPS
  metrics = result["metrics"]
  assert metrics["split"] == "valid" and metrics["source"] == "bundled"
  assert metrics["bytes"] == 2 * 4 * 32
  assert metrics["bpb"] == pytest.approx(_eval_bpb_logged(workdir, STEPS), rel=1e-5)


def test_evaluate_step_picks_that_checkpoint(workdir, evaluate, capsys):
  assert evaluate.main(["evaluate.py", f"--workdir={workdir}", "--step=10", "--eval.max_batches=2"]) == 0
  assert "== bpb (step 10) ==" in capsys.readouterr().out
  result = _result(workdir, "bpb_step10.json")
  assert result["step"] == 10
  # The step-10 params, not the latest: matches the eval the run logged at step 10 (and not step 20's).
  assert result["metrics"]["bpb"] == pytest.approx(_eval_bpb_logged(workdir, 10), rel=1e-5)
  assert _eval_bpb_logged(workdir, 10) != pytest.approx(_eval_bpb_logged(workdir, STEPS), rel=1e-5)


def test_evaluate_text_file_scores_every_byte_after_the_first(workdir, evaluate, tmp_path, capsys):
  # eval_batches: the stream is the file's bytes then EOS; every id after the first is a target once and
  # only real bytes count, so a file of n bytes scores n - 1 (here over several windows, the last padded).
  text = ("def f(x):\n  return x + 1  # héllo, wörld\n" * 5).encode("utf-8")
  assert len(text) % 32 and len(text) > 4 * 32  # more than one eval batch (4 x 32); the last window padded
  path = tmp_path / "notes.txt"
  path.write_bytes(text)
  assert evaluate.main(["evaluate.py", f"--workdir={workdir}", f"--text_file={path}"]) == 0
  assert f"== bpb (step {STEPS}) ==" in capsys.readouterr().out
  metrics = _result(workdir, f"bpb_step{STEPS}.json")["metrics"]
  assert metrics["split"] == "all" and metrics["source"] == "files"
  assert metrics["bytes"] == len(text) - 1
  assert 0 < metrics["bpb"] < 16


def test_evaluate_generate_writes_a_completion(workdir, evaluate, capsys):
  assert evaluate.main(["evaluate.py", f"--workdir={workdir}", "--tasks=generate", "--prompt=def main(",
                        "--generate.max_new_bytes=12"]) == 0
  out = capsys.readouterr().out
  assert f"== generate (step {STEPS}) ==" in out and "completion" in out
  result = _result(workdir, f"generate_step{STEPS}.json")
  assert result["task"] == "generate" and result["step"] == STEPS
  metrics = result["metrics"]
  assert metrics["prompt"] == "def main(" and metrics["max_new_bytes"] == 12
  assert isinstance(metrics["completion"], str) and len(metrics["completion"]) <= 12  # <= 1 char per byte


def test_evaluate_passkey_and_mqar_write_tables(workdir, evaluate, capsys):
  # Lengths are multiples of train.seq_len (32): the prompt's fixed text alone is 247 bytes.
  assert evaluate.main(["evaluate.py", f"--workdir={workdir}", "--tasks=passkey,mqar", "--passkey.lengths=8,9",
                        "--passkey.trials=3", "--passkey.batch_size=2", "--mqar.num_pairs=2,4",
                        "--mqar.num_examples=6", "--mqar.batch_size=4"]) == 0
  out = capsys.readouterr().out
  for name, header in (("passkey", ["length_bytes", "length_x_train", "trials", "accuracy"]),
                       ("mqar", ["num_pairs", "seq_len", "examples", "accuracy", "loss_nats"])):
    path = os.path.join(workdir, "eval", f"{name}_step{STEPS}.json")
    assert f"== {name} (step {STEPS}) ==" in out and f"wrote {path}" in out
    lines = out.splitlines()
    assert lines[lines.index(f"== {name} (step {STEPS}) ==") + 1].split() == header
  passkey = _result(workdir, f"passkey_step{STEPS}.json")
  assert passkey["task"] == "passkey" and passkey["step"] == STEPS
  assert [(r["length_bytes"], r["length_x_train"], r["trials"]) for r in passkey["rows"]] == [
      (256, 8, 3), (288, 9, 3)]
  assert all(0 <= r["accuracy"] <= 1 for r in passkey["rows"])
  mqar = _result(workdir, f"mqar_step{STEPS}.json")
  assert [(r["num_pairs"], r["seq_len"], r["examples"]) for r in mqar["rows"]] == [(2, 32, 6), (4, 32, 6)]
  assert all(0 <= r["accuracy"] <= 1 for r in mqar["rows"])


def test_evaluate_unknown_task_is_a_clear_error(workdir, evaluate, capsys):
  before = sorted(os.listdir(os.path.join(workdir, "eval"))) if os.path.isdir(
      os.path.join(workdir, "eval")) else []
  assert evaluate.main(["evaluate.py", f"--workdir={workdir}", "--tasks=nosuch"]) == 1
  captured = capsys.readouterr()
  assert captured.err.strip() == ("error: unknown evaluation task 'nosuch'; available: bpb, generate, mqar, "
                                  "passkey.")
  assert "Traceback" not in captured.err
  after = sorted(os.listdir(os.path.join(workdir, "eval"))) if os.path.isdir(
      os.path.join(workdir, "eval")) else []
  assert after == before


def test_runs_saved_before_an_eval_section_existed_get_its_defaults():
  saved = base.get_config().to_dict()
  del saved["passkey"], saved["mqar"]
  config = evaluation.fill_eval_sections(ml_collections.ConfigDict(saved))
  cli.apply_overrides(config, ["--passkey.trials=3"])
  assert config.passkey.trials == 3 and config.mqar == base.get_config().mqar
