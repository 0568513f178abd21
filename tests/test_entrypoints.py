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
from configs import tiny
from data import scoring
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


def _entries(workdir, name):
  """eval/<name>: {data key: result} (evaluate.py keeps one entry per scored data)."""
  with open(os.path.join(workdir, "eval", name)) as f:
    record = json.load(f)
  assert record["task"] == name.split("_step")[0] and f"_step{record['step']}.json" in name
  return record["entries"]


def _result(workdir, name, where=""):
  """The one entry of eval/<name> whose data key contains `where`."""
  matches = [r for key, r in _entries(workdir, name).items() if where in key]
  assert len(matches) == 1, list(_entries(workdir, name))
  return matches[0]


def _valid_sample_bytes(max_batches=2):
  """The bytes the tiny run's capped eval scores: windows spread over the valid split."""
  config = tiny.get_config()
  return len(scoring.eval_scored_bytes(config.data, "valid", seq_len=config.train.seq_len,
                                        batch_size=config.eval.batch_size, max_batches=max_batches))


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
  # eval.max_batches * eval.batch_size windows of seq_len spread over the split, EOS targets not counted
  assert all(r["eval/bytes"] == _valid_sample_bytes() for r in evals)
  assert all(0 < r["eval/gzip_bpb"] < 9 and 0 < r["eval/xz_bpb"] < 9 for r in evals)  # same bytes

  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
  for step in ("10", "20"):
    assert {"state", "data", "config"} <= set(os.listdir(os.path.join(workdir, "checkpoints", step)))


def test_rerun_of_a_finished_run_adds_no_metrics_and_says_what_it_runs(workdir, capsys):
  records = _records(workdir)
  events = sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
  train = _load_script("train")
  assert train.main(["train.py", f"--config={REPO_ROOT}/configs/tiny.py", f"--workdir={workdir}"]) == 0
  out = capsys.readouterr().out
  start = out.splitlines()[0]  # printed before anything compiles
  assert start.startswith(f"run {workdir}: transformer (") and start.endswith("compiling...")
  for part in (" params, float32)", "cpu device(s) in 1 process(es) (", "), mesh data ", "data bundled: train "):
    assert part in start, start
  assert f"resumed from the checkpoint at step {STEPS}" in out
  final = out.strip().splitlines()[-1]
  assert final.startswith("final valid bits-per-byte: ") and "gzip -9" in final and "xz -9e" in final
  assert f"{_valid_sample_bytes():,} bytes: even sample of 8 of the split's" in final
  assert _records(workdir) == records  # the re-run's final eval is already logged: nothing appended
  assert sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == events


def test_evaluate_bpb_on_the_latest_checkpoint(workdir, evaluate, capsys):
  # The training run's own evals read eval.max_batches=2 batches of the valid split: the same numbers.
  assert evaluate.main(["evaluate.py", f"--workdir={workdir}", "--tasks=bpb", "--eval.max_batches=2"]) == 0
  out = capsys.readouterr().out
  path = os.path.join(workdir, "eval", f"bpb_step{STEPS}.json")
  assert f"== bpb (step {STEPS}) ==" in out and f"wrote {path}" in out
  assert "scored: even sample of 8 of the split's" in out
  header = out.splitlines()[1].split()
  assert header == ["split", "source", "bpb", "gzip_bpb", "xz_bpb", "loss_nats", "bytes"]
  result = _result(workdir, f"bpb_step{STEPS}.json", "bundled:valid@2x4x32")
  assert result["task"] == "bpb" and result["step"] == STEPS
  metrics = result["metrics"]
  assert metrics["split"] == "valid" and metrics["source"] == "bundled"
  assert metrics["bytes"] == _valid_sample_bytes()
  assert metrics["bpb"] == pytest.approx(_eval_bpb_logged(workdir, STEPS), rel=1e-5)


def test_evaluate_step_picks_that_checkpoint(workdir, evaluate, capsys):
  assert evaluate.main(["evaluate.py", f"--workdir={workdir}", "--step=10", "--eval.max_batches=2"]) == 0
  assert "== bpb (step 10) ==" in capsys.readouterr().out
  result = _result(workdir, "bpb_step10.json", "bundled:valid@2x4x32")
  assert result["step"] == 10
  # The step-10 params, not the latest: matches the eval the run logged at step 10 (and not step 20's).
  assert result["metrics"]["bpb"] == pytest.approx(_eval_bpb_logged(workdir, 10), rel=1e-5)
  assert _eval_bpb_logged(workdir, 10) != pytest.approx(_eval_bpb_logged(workdir, STEPS), rel=1e-5)


def test_evaluate_text_file_scores_every_byte_and_keeps_every_result(workdir, evaluate, tmp_path, capsys):
  # eval_batches: the stream is EOS, the file's bytes, EOS; every byte is a target once (the first after
  # the EOS context) and only real bytes count, so a file of n bytes scores n (over several windows here).
  text = ("def f(x):\n  return x + 1  # héllo, wörld\n" * 5).encode("utf-8")
  assert len(text) % 32 and len(text) > 4 * 32  # more than one eval batch (4 x 32); the last window padded
  other = b"The quick brown fox jumps over the lazy dog.\n" * 3
  paths = [tmp_path / "notes.txt", tmp_path / "other.txt"]
  for path, data in zip(paths, (text, other)):
    path.write_bytes(data)
    assert evaluate.main(["evaluate.py", f"--workdir={workdir}", f"--text_file={path}"]) == 0
    assert f"== bpb (step {STEPS}) ==" in (out := capsys.readouterr().out) and "scored: whole split" in out
  for path, data in zip(paths, (text, other)):  # the second evaluation did not replace the first
    metrics = _result(workdir, f"bpb_step{STEPS}.json", f"files:{path}:all")["metrics"]
    assert metrics["split"] == "all" and metrics["source"] == "files"
    assert metrics["bytes"] == len(data)
    assert 0 < metrics["bpb"] < 16 and metrics["xz_bpb"] > 0


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
  assert captured.err.strip() == ("error: unknown evaluation task 'nosuch'; available: bpb, copy, encoder_ablation, "
                                  "generate, mqar, passkey.")
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


def test_profile_steps_write_a_trace(tmp_path):
  train = _load_script("train")
  workdir = str(tmp_path / "profiled")
  assert train.main(["train.py", f"--config={REPO_ROOT}/configs/tiny.py", f"--workdir={workdir}",
                     "--config.train.steps=4", "--config.train.profile_steps=2,3"]) == 0
  assert glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
  assert glob.glob(os.path.join(workdir, "profile", "**", "*.trace.json.gz"), recursive=True)
  bad = str(tmp_path / "bad")
  assert train.main(["train.py", f"--config={REPO_ROOT}/configs/tiny.py", f"--workdir={bad}",
                     "--config.train.profile_steps=3,2"]) == 1
  assert not os.path.exists(os.path.join(bad, "checkpoints"))
