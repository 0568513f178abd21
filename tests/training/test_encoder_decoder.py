"""ByT5 / MrT5 through the unchanged train.py / evaluate.py: span corruption, exact resume with the PI
controller's state, deletion-rate control, bits per target byte, the blank-input encoder ablation and
encoder-decoder generation."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.head_dim=16",
        "--config.model.mlp_dim=64", "--config.model.num_layers=4", "--config.model.num_decoder_layers=1",
        "--config.train.seq_len=64", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.eval.max_batches=2", "--config.eval.final_max_batches=2",
        "--config.eval.batch_size=8", "--config.data.max_corpus_bytes=200000",
        "--config.data.span_corruption.mean_noise_span_length=4", "--config.train.progress_bar=False",
        "--config.optimizer.warmup_steps=5"]


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _run(script, *args, timeout=600):
  """A fresh process per run: the in-process compiles of a long suite stay out of these programs' way."""
  proc = subprocess.run([sys.executable, f"{script}.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _train(config, workdir, *extra):
  return _run("train", f"--config=configs/{config}.py", f"--workdir={workdir}", *TINY, *extra)


@pytest.fixture(scope="module")
def mrt5_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mrt5") / "run")
  _train("mrt5", workdir, "--config.train.steps=12", "--config.checkpoint.every=6",
         "--config.model.byt5.delete_gate.kp=20.0", "--config.model.byt5.delete_gate.ki=0.5")
  return workdir


def test_mrt5_resume_is_exact_with_controller_state(mrt5_run, tmp_path):
  workdir = str(tmp_path / "resumed")
  shutil.copytree(mrt5_run, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in _records(mrt5_run) if r["step"] <= 6)
  _train("mrt5", workdir, "--config.train.steps=12", "--config.checkpoint.every=6",
         "--config.model.byt5.delete_gate.kp=20.0", "--config.model.byt5.delete_gate.ki=0.5")
  straight = {r["step"]: r for r in _records(mrt5_run) if "loss" in r}
  resumed = {r["step"]: r for r in _records(workdir) if "loss" in r and r["step"] > 6}
  assert sorted(resumed) == list(range(7, 13))
  for step, r in resumed.items():
    for key in ("loss", "grad_norm", "deletion_rate", "aux/alpha", "aux/p", "aux/i"):
      assert r[key] == straight[step][key], (step, key)


def test_train_logs_deletion_rate_and_controller(mrt5_run):
  records = [r for r in _records(mrt5_run) if "loss" in r]
  assert all(0.0 <= r["deletion_rate"] <= 1.0 for r in records)
  # alpha follows the PI law on the logged rates: positive while the rate is below the 0.5 target.
  first = records[0]
  assert (first["aux/alpha"] > 0) == (first["deletion_rate"] < 0.5)
  final = [r for r in _records(mrt5_run) if "eval/bpb" in r][-1]
  for key in ("eval/deletion_rate", "eval/soft_bpb", "eval/special_bits"):
    assert np.isfinite(final[key]), key


def test_controller_moves_the_deletion_rate_toward_the_target(tmp_path):
  """From a gate that keeps everything (b = 4: G ~ -0.5), the PI controller raises alpha while the rate is
  below the 0.5 target, which drives the rate up to it; above the target alpha returns to 0 (the
  controller is one-sided, alpha >= 0, as in MrT5)."""
  workdir = str(tmp_path / "target")
  _train("mrt5", workdir, "--config.train.steps=16", "--config.checkpoint.every=16",
         "--config.model.byt5.delete_gate.target=0.5", "--config.model.byt5.delete_gate.bias_init=4.0",
         "--config.model.byt5.delete_gate.kp=2.0", "--config.model.byt5.delete_gate.ki=0.01")
  records = [r for r in _records(workdir) if "loss" in r]
  rates = [r["deletion_rate"] for r in records]
  alphas = [r["aux/alpha"] for r in records]
  assert rates[0] < 0.1, rates
  reached = next(i for i, rate in enumerate(rates) if rate >= 0.3)  # StopIteration: never moved
  assert all(a > 0 for a, rate in zip(alphas, rates) if rate < 0.5), (rates, alphas)
  assert all(a < alphas[reached - 1] for a, rate in zip(alphas[reached:], rates[reached:]) if rate > 0.5)


@pytest.fixture(scope="module")
def byt5_run(tmp_path_factory):
  """A 4-step ByT5 (checkpoint at step 4): evaluated below and the start of an MrT5 continuation."""
  workdir = str(tmp_path_factory.mktemp("byt5") / "run")
  _train("byt5", workdir, "--config.train.steps=4", "--config.checkpoint.every=4")
  return workdir


def test_byt5_trains_and_evaluates_bits_per_target_byte_and_generates(byt5_run):
  _run("evaluate", f"--workdir={byt5_run}", "--tasks=bpb,generate", "--prompt=def main(",
       "--generate.max_new_bytes=6")
  bpb = _eval_metrics(byt5_run, "bpb", 4)
  assert bpb["bpb"] > 0 and bpb["bytes"] > 0 and bpb["special_targets"] > 0
  gen = _eval_metrics(byt5_run, "generate", 4)
  assert gen["prompt"] == "def main(" and isinstance(gen["completion"], str)


def _eval_metrics(workdir, task, step):
  with open(os.path.join(workdir, "eval", f"{task}_step{step}.json")) as f:
    return next(iter(json.load(f)["entries"].values()))["metrics"]


def test_encoder_ablation_scores_the_same_bytes_with_blank_inputs(mrt5_run):
  """--tasks=encoder_ablation: bpb as given (the bpb task's, on the same whole split) and with every input
  byte blanked; encoder_bits is their difference."""
  _run("evaluate", f"--workdir={mrt5_run}", "--tasks=bpb,encoder_ablation", "--eval.max_batches=3")
  given, ablation = _eval_metrics(mrt5_run, "bpb", 12), _eval_metrics(mrt5_run, "encoder_ablation", 12)
  assert ablation["bpb"] == pytest.approx(given["bpb"], rel=1e-6) and ablation["bytes"] == given["bytes"]
  assert np.isfinite(ablation["blank_inputs_bpb"]) and ablation["blank_inputs_bpb"] != ablation["bpb"]
  assert ablation["encoder_bits"] == pytest.approx(ablation["blank_inputs_bpb"] - ablation["bpb"])


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/mrt5.py", "--config.model.byt5.delete_gate.layer=9"],
     "error: model.byt5.delete_gate.layer (9) must be between 1 and model.num_layers - 1"),
    (["--config=configs/byt5.py", "--config.train.seq_len=2"], "error: a span-corrupted input of 2 ids cannot"),
])
def test_bad_encoder_decoder_config_is_one_error_line_and_writes_nothing(tmp_path, args, expected):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "train.py", *args, f"--workdir={workdir}"], cwd=REPO_ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
  assert not workdir.exists() or not any(workdir.iterdir())


def _mrt5_from(byt5_dir, tmp_path) -> tuple[str, str]:
  """A 1-step MrT5 continued from the ByT5 run: (mrt5 dir, its train.py stdout)."""
  mrt5_dir = str(tmp_path / "mrt5")
  out = _train("mrt5", mrt5_dir, "--config.train.steps=1", "--config.checkpoint.every=1",
               f"--config.train.init_from={byt5_dir}")
  return mrt5_dir, out


def test_mrt5_initialised_from_a_trained_byt5(byt5_run, tmp_path):
  """train.init_from: MrT5 continues from ByT5 (spec §3.1, §3.6); only the gate is new."""
  _, out = _mrt5_from(byt5_run, tmp_path)
  line = next(line for line in out.splitlines() if line.startswith("initialised "))
  assert f"from {byt5_run} (step 4)" in line
  assert all("delete_gate" in name for name in line.split("new: ")[1].split(", "))


@pytest.mark.slow
def test_trained_runtime_times_byt5_and_mrt5_checkpoints_on_the_same_batch(byt5_run, tmp_path):
  """The mrt5-deletion experiment's runtime of trained runs: both checkpoints on the same valid batch."""
  from benchmarks import mrt5
  mrt5_dir, _ = _mrt5_from(byt5_run, tmp_path)
  timed = mrt5.trained_runtime([byt5_run, mrt5_dir], num_batches=1, rounds=1, warmup=0, repeats=1)
  byt5, gated = timed[byt5_run], timed[mrt5_dir]
  assert byt5["measured_deletion"] == 0 and byt5["capacity"] == 64 and byt5["encoder_decrease"] == 0
  assert 0 <= gated["measured_deletion"] <= 1 and gated["capacity"] in (16, 32, 48, 64)
  assert gated["forward_decrease"] == pytest.approx(1 - gated["forward_ms"] / byt5["forward_ms"])
  assert all(t[k] > 0 for t in timed.values() for k in ("forward_ms", "encoder_ms"))
