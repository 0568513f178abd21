"""Reliability of train.py / evaluate.py runs (DESIGN.md section 7).

Exact resume, the NaN guard, one-line errors that delete nothing, and SIGTERM handling. One tiny run is
trained in-process per module (straight through 20 steps, logging every step); every other test copies its
run directory and runs train.py / evaluate.py in a fresh process, where exit codes and stderr are what a
user sees.
"""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

import models
from training import checkpoint as ckpt_lib
from training import loop
from training import runtime
from training import train_step as ts

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = "--config=configs/tiny.py"
STEPS = 20  # configs/tiny.py: train.steps, with checkpoint.every = 10
_ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _load_script(name):
  spec = importlib.util.spec_from_file_location(f"_{name}_script", os.path.join(REPO_ROOT, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(script, *args, timeout=300):
  return subprocess.run([sys.executable, script, *args], cwd=REPO_ROOT, env=_ENV, capture_output=True,
                        text=True, timeout=timeout)


def _train(workdir, *args, **kwargs):
  return _run("train.py", TINY, f"--workdir={workdir}", *args, **kwargs)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _train_records(workdir):
  return [r for r in _records(workdir) if "loss" in r]


def _steps(workdir):
  directory = ckpt_lib.checkpoint_dir(workdir)
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _snapshot(root):
  """{relative path: sha256} of every file under root."""
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _assert_untouched(before, root):
  after = _snapshot(root)
  assert sorted(set(before) - set(after)) == [], "files were deleted"
  assert sorted(p for p in before if after[p] != before[p]) == [], "files were overwritten"


def _error_line(stderr, *, only_line=True):
  """The single 'error: ' line of a failed run (and, with only_line, nothing else on stderr)."""
  assert "Traceback" not in stderr, stderr
  lines = [line for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1, stderr
  assert lines[-1] == errors[0], stderr
  if only_line:
    assert lines == errors, stderr
  return errors[0]


def _restore_state(workdir, step):
  """The full TrainState of a checkpoint, on the host, restored through training.checkpoint."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = runtime.resolve_config(ml_collections.ConfigDict(json.load(f)))
  model = models.get_family(config.model)
  tx, _ = ts.make_optimizer(config.optimizer, config.train.steps)
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    with runtime.mesh_context(config) as mesh:
      abstract, shardings = ts.state_shardings(model, tx, config, mesh)
      state = checkpointer.restore(step, ckpt_lib.abstract_like(abstract, shardings), None)
      return jax.device_get(state)
  finally:
    checkpointer.close()


def _bits(x):
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}")) if x.dtype.kind == "f" else x


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """configs/tiny.py trained 20 steps straight (checkpoints at 10 and 20), logging every step."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  train = _load_script("train")
  assert train.main(["train.py", f"--config={REPO_ROOT}/configs/tiny.py", f"--workdir={workdir}",
                     "--config.train.log_every=1"]) == 0
  assert _steps(workdir) == [10, STEPS]
  return workdir


def _interrupted_copy(straight_run, workdir):
  """The run directory as a run stopped right after its step-10 checkpoint would have left it."""
  shutil.copytree(straight_run, workdir)
  shutil.rmtree(os.path.join(ckpt_lib.checkpoint_dir(workdir), str(STEPS)))
  kept = [r for r in _records(workdir) if r["step"] <= 10]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  return workdir


def test_resume_is_bitwise_exact(straight_run, tmp_path):
  workdir = _interrupted_copy(straight_run, str(tmp_path / "resumed"))
  proc = _train(workdir, "--config.train.log_every=1")
  assert proc.returncode == 0, proc.stderr
  assert f"resumed from the checkpoint at step 10 in {ckpt_lib.checkpoint_dir(workdir)}" in proc.stdout

  def by_step(records):
    return {r["step"]: r for r in records if r["step"] > 10}

  straight, resumed = by_step(_train_records(straight_run)), by_step(_train_records(workdir))
  assert sorted(resumed) == list(range(11, STEPS + 1))
  for step in range(11, STEPS + 1):  # JSON floats round-trip exactly: == is bitwise on the fp32 values
    assert resumed[step]["loss"] == straight[step]["loss"], step
    assert resumed[step]["grad_norm"] == straight[step]["grad_norm"], step
    assert resumed[step]["lr"] == straight[step]["lr"], step
  final = [r for r in _records(workdir) if "eval/bpb" in r and r["step"] == STEPS]
  assert final and final[-1]["eval/bpb"] == [
      r for r in _records(straight_run) if "eval/bpb" in r and r["step"] == STEPS][-1]["eval/bpb"]

  a, b = _restore_state(straight_run, STEPS), _restore_state(workdir, STEPS)
  assert int(a.step) == int(b.step) == STEPS
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):  # params and optimizer state, bit for bit
    assert np.array_equal(_bits(x), _bits(y))


@pytest.mark.parametrize("lr, steps, message", [
    # A finite loss with a NaN gradient norm: caught before the poisoned update is ever saved.
    ("1e38", STEPS, r"the gradient norm became nan \(loss [0-9.]+\) at step (\d+);"),
    # lr overflows to inf in fp32: the params become non-finite, the next loss is NaN.
    ("1e39", STEPS, r"the training loss became nan at step (\d+);"),
    # ... and when that step is the last one, the state is checked before the final save.
    ("1e39", 11, r"the train state \(params or optimizer state\) became non-finite at step (\d+);"),
], ids=["nan_grad_norm", "nan_loss", "nonfinite_state_at_final_save"])
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(straight_run, tmp_path, lr, steps, message):
  workdir = _interrupted_copy(straight_run, str(tmp_path / "run"))
  before = _snapshot(ckpt_lib.checkpoint_dir(workdir))
  proc = _train(workdir, f"--config.train.steps={steps}", f"--config.optimizer.lr={lr}",
                "--config.train.log_every=1")
  assert proc.returncode != 0
  line = _error_line(proc.stderr, only_line=False)  # lr=1e39 also warns about the fp32 overflow
  match = re.search(message, line)
  assert match, line
  assert line.endswith("stopped without saving, the last good checkpoint (step 10) is intact."), line
  step = int(match.group(1))
  logged = max(r["step"] for r in _train_records(workdir))
  # The named step is the first one not logged (NaN loss / grad norm are caught before logging); a
  # non-finite state is found when saving, after that step's (finite) loss was logged.
  assert step == (logged if "train state" in line else logged + 1), (line, logged)
  assert 10 < step <= steps

  assert _steps(workdir) == [10]  # no checkpoint after the last good one
  _assert_untouched(before, ckpt_lib.checkpoint_dir(workdir))
  state = _restore_state(workdir, 10)
  assert int(state.step) == 10
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def _empty_file(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  return str(tmp_path / "empty.txt")


def _dir_with_empty_file(tmp_path):
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "a.txt").write_bytes(b"")
  return str(tmp_path / "corpus")


@pytest.mark.parametrize("args, expected", [
    ([TINY, "--config.train.foo=1"],
     "error: unknown config key 'train.foo' (no 'foo' under train;"),
    ([TINY, "--config.nosuch.x=1"],
     "error: unknown config key 'nosuch.x' (no 'nosuch' under the top level;"),
    (["--config=configs/nosuch.py"], "error: config file 'configs/nosuch.py' does not exist."),
    ([TINY, "--config.data.source=files", "--config.data.paths=/nonexistent.txt"],
     "error: data.paths entry '/nonexistent.txt' matches no file."),
    ([TINY, "--config.data.source=files", "--config.data.paths={empty_file}"],
     "error: the 'train' split of data source 'files' is empty (0 bytes); every file that data.paths "
     "names is empty"),
    ([TINY, "--config.data.source=files", "--config.data.paths={empty_dir}"],
     "error: the 'train' split of data source 'files' is empty (0 bytes); every file that data.paths "
     "names is empty"),
    ([TINY, "--config.model.attention_impl=pallas"],
     "error: model.attention_impl='pallas' needs a TPU or GPU (this backend is 'cpu'); add "
     "--config.model.interpret=true"),
], ids=["unknown_key", "unknown_section", "bad_config_path", "missing_data_path", "empty_file",
        "dir_with_empty_file", "pallas_on_cpu_without_interpret"])
def test_bad_input_is_one_error_line_and_deletes_nothing(straight_run, tmp_path, args, expected):
  paths = {"empty_file": _empty_file(tmp_path), "empty_dir": _dir_with_empty_file(tmp_path)}
  workdir = str(tmp_path / "run")
  shutil.copytree(straight_run, workdir)  # an existing run: nothing of it may be lost
  before = _snapshot(workdir)
  proc = _run("train.py", *[a.format(**paths) for a in args], f"--workdir={workdir}",
              "--config.train.steps=30")
  assert proc.returncode == 1, proc.stderr
  assert _error_line(proc.stderr).startswith(expected)
  _assert_untouched(before, workdir)
  assert _steps(workdir) == [10, STEPS]


def _state_files(workdir, step):
  root = os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step), "state")
  return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]


def _largest(files):
  return max(files, key=os.path.getsize)


def _overwrite_with_garbage(path):
  size = os.path.getsize(path)
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def _truncate_to_half(path):
  os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["garbage_largest_file", "garbage_METADATA", "garbage_manifest",
                                    "truncated_largest_file"])
def test_damaged_latest_checkpoint_is_one_error_line_and_left_untouched(straight_run, tmp_path, damage):
  workdir = str(tmp_path / "run")
  shutil.copytree(straight_run, workdir)
  files = _state_files(workdir, STEPS)
  state_dir = os.path.join(ckpt_lib.checkpoint_dir(workdir), str(STEPS), "state")
  if damage == "garbage_largest_file":
    _overwrite_with_garbage(_largest(files))
  elif damage == "garbage_METADATA":
    _overwrite_with_garbage(os.path.join(state_dir, "_METADATA"))
  elif damage == "garbage_manifest":  # a failed restore with reads in flight: no asyncio tracebacks
    _overwrite_with_garbage(os.path.join(state_dir, "manifest.ocdbt"))
  else:
    _truncate_to_half(_largest(files))
  before = _snapshot(workdir)
  proc = _train(workdir, "--config.train.steps=30")
  assert proc.returncode == 1, proc.stderr
  line = _error_line(proc.stderr)
  where = os.path.join(ckpt_lib.checkpoint_dir(workdir), str(STEPS))
  assert line.startswith(f"error: the checkpoint at {where} is unreadable"), line
  assert line.endswith("it was left untouched."), line
  _assert_untouched(before, workdir)
  assert _steps(workdir) == [10, STEPS]


@pytest.mark.parametrize("layout", ["empty_workdir", "empty_checkpoints_dir", "missing_workdir"])
def test_evaluate_without_checkpoint_is_one_error_line(tmp_path, layout):
  workdir = tmp_path / "run"
  if layout != "missing_workdir":
    workdir.mkdir()
  if layout == "empty_checkpoints_dir":  # what a run that failed before its first save leaves
    (workdir / "checkpoints").mkdir()
  proc = _run("evaluate.py", f"--workdir={workdir}")
  assert proc.returncode == 1, proc.stderr
  line = _error_line(proc.stderr)
  if layout == "missing_workdir":
    assert line == f"error: workdir {workdir} does not exist."
    assert not workdir.exists()
  else:
    assert line.startswith(f"error: no checkpoint found in {workdir / 'checkpoints'};"), line


def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  args = [sys.executable, "train.py", TINY, f"--workdir={workdir}", "--config.train.steps=100000",
          "--config.checkpoint.every=1000000", "--config.train.log_every=1", "--config.train.eval_every=0"]
  proc = subprocess.Popen(args, cwd=REPO_ROOT, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    deadline = time.monotonic() + 120
    metrics = os.path.join(workdir, "metrics.jsonl")  # written line by line, flushed each time
    while not (os.path.exists(metrics) and len(_records(workdir)) >= 3):
      assert proc.poll() is None, proc.communicate()
      assert time.monotonic() < deadline, "no training progress within 120 s"
      time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 0, err
  assert "Traceback" not in err, err
  match = re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved in (\S+)\.", out)
  assert match, out
  step = int(match.group(1))
  assert match.group(2) == os.fspath(ckpt_lib.checkpoint_dir(workdir))
  assert step >= 3 and step == max(r["step"] for r in _train_records(workdir))
  assert _steps(workdir) == [step]

  # Same checkpoint cadence as the interrupted run: the tiny config's every=10 would add one at a multiple of 10.
  resumed = _train(workdir, f"--config.train.steps={step + 2}", "--config.train.log_every=1",
                   "--config.checkpoint.every=1000000")
  assert resumed.returncode == 0, resumed.stderr
  assert f"resumed from the checkpoint at step {step} in " in resumed.stdout
  assert [r["step"] for r in _train_records(workdir)][-2:] == [step + 1, step + 2]
  assert _steps(workdir) == [step, step + 2]
