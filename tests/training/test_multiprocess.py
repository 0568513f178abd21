"""A real multi-process run: 2 processes of train.py on 127.0.0.1, each with 2 fake CPU devices (issue 12).

JAX's multi-controller runtime is the engine: every process runs the same command with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (training/distributed.py), CPU collectives
are gloo (jax's default on CPU), and the data=2 x fsdp=2 mesh spans both processes. The reference is one
process on 4 fake devices with the same mesh. The module fixture plays the whole scenario once, starting
independent runs together so that their compile times overlap:

  ref    1 process x 4 devices, configs/tiny.py for 10 steps (checkpoints at 5 and 10)
  mp     2 processes x 2 devices, the same command; stopped by SIGTERM sent to process 1 only, then
         resumed by the same command to step 10
  eval   evaluate.py in 1 process on 1 device restores mp's step-10 checkpoint (another topology)
  ref>mp ref's step-5 checkpoint resumed in 2 processes

Bad input (a mesh that does not fit, a batch that does not split, tensor across processes) is one error line
on every process. Every wait is bounded (TIMEOUT_S per run); on a timeout or a failure all processes of the
run are killed. The subprocess tests take 1 to 2 minutes on 2 busy cores, so they need --runslow:

    pytest --runslow -m multiprocess tests/training/test_multiprocess.py
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.multiprocess
# 1 to 2 minutes on 2 busy cores (8 JAX processes start and compile), more than the default suite's budget
slow = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300
STEPS = 10
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1"]
TRAIN_ARGS = ["train.py", "--config=configs/tiny.py", f"--config.train.steps={STEPS}",
              "--config.train.log_every=1", "--config.train.eval_every=0", "--config.checkpoint.every=5",
              *MESH]
REL = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(num_devices: int, **distributed: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""), **distributed)
  return env


class _Run:
  """One command in `processes` JAX processes (stdout/stderr to files, so nothing blocks on a pipe)."""

  def __init__(self, logs: str, name: str, argv: list[str], *, processes: int, devices: int):
    self.name, self.outputs, self.procs = name, [], []
    port = _free_port()
    for i in range(processes):
      distributed = {} if processes == 1 else dict(
          JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
      out, err = (os.path.join(logs, f"{name}.{i}.{kind}") for kind in ("out", "err"))
      self.outputs.append((out, err))
      with open(out, "w") as o, open(err, "w") as e:
        self.procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, env=_env(devices, **distributed),
                                           stdout=o, stderr=e))

  def text(self, i: int, kind: str = "out") -> str:
    with open(self.outputs[i][kind == "err"]) as f:
      return f.read()

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)

  def wait(self) -> list[int]:
    """Exit codes of every process; kills them all when one fails or TIMEOUT_S passes."""
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in self.procs):
      if any(p.poll() not in (None, 0) for p in self.procs):  # the others get 5 s to stop by themselves
        deadline = min(deadline, time.monotonic() + 5)
      if time.monotonic() > deadline:
        self.kill()
        break
      time.sleep(0.1)
    return [p.returncode for p in self.procs]

  def check(self) -> None:
    codes = self.wait()
    if codes != [0] * len(codes):
      tails = "\n".join(f"--- process {i} (exit {c}) stderr tail:\n{self.text(i, 'err')[-3000:]}"
                        for i, c in enumerate(codes))
      pytest.fail(f"{self.name}: exit codes {codes} (a timeout shows as -9)\n{tails}")


def _records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip().endswith("}")]


def _train_records(workdir: str) -> dict[int, dict]:
  records = [r for r in _records(workdir) if "loss" in r]
  steps = [r["step"] for r in records]
  assert len(steps) == len(set(steps)), f"a step was logged twice (two writers?): {steps}"
  return {r["step"]: r for r in records}


def _steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _stop_one_process(run: _Run, workdir: str) -> None:
  """SIGTERM to process 1 once step 2 was logged, while process 0 is frozen (SIGSTOP) until JAX's notifier
  on process 1 has caught it (it polls for about a second): both processes wait at the next collective
  meanwhile, so the stop step does not depend on how fast this machine is."""
  deadline = time.monotonic() + TIMEOUT_S
  while max(_train_records(workdir), default=0) < 2:
    if any(p.poll() is not None for p in run.procs) or time.monotonic() > deadline:
      run.check()
      pytest.fail(f"{run.name} ended or timed out before step 2 was logged")
    time.sleep(0.05)
  run.procs[0].send_signal(signal.SIGSTOP)
  try:
    run.procs[1].send_signal(signal.SIGTERM)
    caught = time.monotonic() + 10  # then go on anyway: the stop step may just come later
    while "SIGTERM caught" not in run.text(1, "err") and time.monotonic() < caught:
      time.sleep(0.05)
  finally:
    run.procs[0].send_signal(signal.SIGCONT)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  logs = str(root / "logs")
  os.makedirs(logs)
  dirs = {name: str(root / name) for name in ("ref", "mp", "ref_to_mp")}
  runs = {}
  try:
    runs["ref"] = _Run(logs, "ref", [*TRAIN_ARGS, f"--workdir={dirs['ref']}"], processes=1, devices=4)
    runs["mp"] = _Run(logs, "mp", [*TRAIN_ARGS, f"--workdir={dirs['mp']}"], processes=2, devices=2)
    _stop_one_process(runs["mp"], dirs["mp"])
    runs["mp"].check()
    stopped = {"steps": _steps(dirs["mp"]), "metrics": _train_records(dirs["mp"])}
    runs["mp_resume"] = _Run(logs, "mp_resume", [*TRAIN_ARGS, f"--workdir={dirs['mp']}"], processes=2,
                             devices=2)

    runs["ref"].check()
    shutil.copytree(dirs["ref"], dirs["ref_to_mp"])  # as if the 1-process run had stopped at step 5
    shutil.rmtree(os.path.join(dirs["ref_to_mp"], "checkpoints", str(STEPS)))
    with open(os.path.join(dirs["ref_to_mp"], "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in _records(dirs["ref"]) if r["step"] <= 5)
    runs["ref_to_mp"] = _Run(logs, "ref_to_mp", [*TRAIN_ARGS, f"--workdir={dirs['ref_to_mp']}"],
                             processes=2, devices=2)

    runs["mp_resume"].check()
    runs["eval"] = _Run(logs, "eval", ["evaluate.py", f"--workdir={dirs['mp']}", "--eval.max_batches=2",
                                       "--mesh.data=-1", "--mesh.fsdp=1"], processes=1, devices=1)
    runs["ref_to_mp"].wait()
    runs["eval"].wait()
    yield {"runs": runs, "dirs": dirs, "stopped": stopped}
  finally:
    for run in runs.values():
      run.kill()


def _assert_matches_ref(records: dict[int, dict], ref: dict[int, dict], steps) -> None:
  for step in steps:
    for key in ("loss", "grad_norm"):
      a, b = ref[step][key], records[step][key]
      assert np.isfinite(a) and abs(a - b) <= REL * abs(a), f"step {step} {key}: 1 process {a} vs 2 processes {b}"
    assert records[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-7)


@slow
def test_two_processes_match_one_process_at_every_step(scenario):
  """Steps 1..S before the SIGTERM and S+1..10 after the resume: each loss and grad norm equals 1 process."""
  ref = _train_records(scenario["dirs"]["ref"])
  mp = _train_records(scenario["dirs"]["mp"])
  assert sorted(ref) == sorted(mp) == list(range(1, STEPS + 1))
  _assert_matches_ref(mp, ref, range(1, STEPS + 1))


@slow
def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(scenario):
  run, stopped = scenario["runs"]["mp"], scenario["stopped"]
  match = re.search(r"stopped by preemption at step (\d+); checkpoint saved in", run.text(0))
  assert match, run.text(0)
  step = int(match.group(1))
  assert 2 < step < STEPS, step
  assert max(stopped["metrics"]) == step and stopped["steps"][-1] == step
  for i in range(2):  # orbax's log line on each process: both reached the sync point at the same step
    assert f"Reached preemption sync point, step={step}" in run.text(i, "err"), i
  data = os.path.join(scenario["dirs"]["mp"], "checkpoints", str(step), "data")
  assert sorted(os.listdir(data)) == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  resumed = scenario["runs"]["mp_resume"].text(0)
  assert f"resumed from the checkpoint at step {step} in " in resumed
  assert "final valid bits-per-byte" in resumed


@slow
def test_only_process_0_writes_the_run_files_and_prints(scenario):
  workdir, runs = scenario["dirs"]["mp"], scenario["runs"]
  writers = {str(runs[name].procs[0].pid) for name in ("mp", "mp_resume")}
  events = [n for n in os.listdir(workdir) if n.startswith("events.")]
  assert len(events) == 2 and {re.search(r"\.(\d+)\.\d+$", n).group(1) for n in events} == writers, events
  assert os.path.isfile(os.path.join(workdir, "config.json"))
  assert sorted(os.listdir(workdir)) == sorted(["checkpoints", "config.json", "eval", "metrics.jsonl", *events])
  for name in ("mp", "mp_resume"):
    printed = [line for line in runs[name].text(1).splitlines() if not line.startswith("[Gloo]")]
    assert printed == [], printed  # no start line, progress, resume or final line on process 1


@slow
def test_evaluate_restores_the_2_process_checkpoint_in_one_process(scenario):
  run = scenario["runs"]["eval"]
  assert run.wait() == [0], run.text(0, "err")[-3000:]
  with open(os.path.join(scenario["dirs"]["mp"], "eval", f"bpb_step{STEPS}.json")) as f:
    (entry,) = json.load(f)["entries"].values()
  final = [r["eval/bpb"] for r in _records(scenario["dirs"]["mp"]) if "eval/bpb" in r]
  ref = [r["eval/bpb"] for r in _records(scenario["dirs"]["ref"]) if "eval/bpb" in r]
  assert entry["metrics"]["bpb"] == pytest.approx(final[-1], rel=REL)
  assert entry["metrics"]["bpb"] == pytest.approx(ref[-1], rel=REL)


@slow
def test_1_process_checkpoint_resumes_in_2_processes(scenario):
  run = scenario["runs"]["ref_to_mp"]
  run.check()
  assert "resumed from the checkpoint at step 5 in " in run.text(0)
  ref = _train_records(scenario["dirs"]["ref"])
  resumed = _train_records(scenario["dirs"]["ref_to_mp"])
  assert sorted(resumed) == list(range(1, STEPS + 1))
  _assert_matches_ref(resumed, ref, range(6, STEPS + 1))


@slow
@pytest.mark.parametrize("args, expected", [
    (["--config.mesh.fsdp=3"], "error: mesh {'data': 2, 'fsdp': 3, 'tensor': 1} needs 6 devices but 4 are "
     "available."),
    (["--config.train.batch_size=6"], "error: train.batch_size 6 does not split over data x fsdp = 4 batch "
     "shards of the mesh {'data': 2, 'fsdp': 2, 'tensor': 1}."),
    (["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=4", "--config.model.num_heads=4"],
     "error: the mesh {'data': 1, 'fsdp': 1, 'tensor': 4} puts 1 of its 1 batch shard(s) on process {i}, "
     "not 1/2 of them"),
], ids=["mesh_does_not_fit", "batch_does_not_split", "tensor_across_processes"])
def test_bad_input_is_one_error_line_on_every_process(tmp_path, args, expected):
  workdir = str(tmp_path / "run")
  run = _Run(str(tmp_path), "bad", [*TRAIN_ARGS, f"--workdir={workdir}", *args], processes=2, devices=2)
  try:
    assert run.wait() == [1, 1]
    for i in range(2):
      lines = [line for line in run.text(i, "err").splitlines() if line.strip()]
      assert len(lines) == 1 and lines[0].startswith(expected.replace("{i}", str(i))), (i, lines)
    assert not os.path.exists(workdir)  # nothing written
  finally:
    run.kill()

def test_different_commands_on_the_processes_are_one_error_line_on_each(tmp_path):
  """Process 1 gets another learning rate: the config hashes exchanged at the start differ."""
  workdir = str(tmp_path / "run")
  port = _free_port()
  procs, errs = [], []
  for i in range(2):
    extra = ["--config.optimizer.lr=0.5"] if i == 1 else []
    errs.append(str(tmp_path / f"p{i}.err"))
    with open(errs[-1], "w") as e:
      procs.append(subprocess.Popen(
          [sys.executable, *TRAIN_ARGS, f"--workdir={workdir}", *extra], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
          stderr=e, env=_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                             JAX_PROCESS_ID=str(i))))
  try:
    assert [p.wait(timeout=TIMEOUT_S) for p in procs] == [1, 1]
    for err in errs:
      with open(err) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
      assert len(lines) == 1 and lines[0].startswith("error: the run config differs between processes "
                                                      "(process 0: "), lines
  finally:
    for p in procs:
      p.kill()


@slow
def test_a_nan_stops_every_process_with_one_error_line(tmp_path):
  """A diverging run (learning rate 1e6): every process stops at the same step with the same line."""
  run = _Run(str(tmp_path), "nan", [*TRAIN_ARGS, f"--workdir={tmp_path / 'run'}", "--config.optimizer.lr=1e6",
                                    "--config.optimizer.warmup_steps=0", "--config.optimizer.grad_clip=0"],
             processes=2, devices=2)
  try:
    assert run.wait() == [1, 1]
    lines = [[line for line in run.text(i, "err").splitlines() if line.startswith("error:")] for i in range(2)]
    assert len(lines[0]) == 1 and lines[0] == lines[1], lines
    assert re.match(r"error: the (training loss|gradient norm) became (nan|inf)", lines[0][0]), lines
  finally:
    run.kill()


def test_an_unreachable_coordinator_is_one_error_line_naming_it(tmp_path):
  """Process 1 of 2 with nobody at the address: it gives up after JAX_COORDINATOR_TIMEOUT seconds."""
  port = _free_port()
  env = _env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1",
             JAX_COORDINATOR_TIMEOUT="3")
  start = time.monotonic()
  proc = subprocess.run([sys.executable, *TRAIN_ARGS, f"--workdir={tmp_path / 'run'}"], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip() and line.startswith("error:")]
  assert len(lines) == 1 and lines[0].startswith(
      f"error: could not start jax.distributed with the coordinator at 127.0.0.1:{port} (process 1 of 2) "
      "within 3 s (JAX_COORDINATOR_TIMEOUT): the other processes did not all connect."), proc.stderr[-2000:]
  assert time.monotonic() - start < 60
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------
# In-process: the data iterator state of a checkpoint saved by another number of processes.
# ----------------------------------------------------------------------------


def _iterator():
  from configs import tiny
  from data import pipeline
  config = tiny.get_config()
  return pipeline.make_train_iterator(config.data, seq_len=32, global_batch_size=4, seed=0)


def test_data_state_saved_by_other_process_counts_is_restored(tmp_path):
  from etils import epath
  from training import checkpoint as ckpt_lib
  for i in range(2):  # what 2 processes at global batch 7 leave
    (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": 7}))
  expected = _iterator()
  for _ in range(7):
    next(expected)
  restored = ckpt_lib._DataHandler().restore(epath.Path(tmp_path), _iterator())
  np.testing.assert_array_equal(next(restored)["inputs"], next(expected)["inputs"])

  (tmp_path / "process_1-of-2.json").write_text(json.dumps({"next_index": 8}))
  with pytest.raises(ValueError, match="differ between the processes that saved them"):
    ckpt_lib._DataHandler().restore(epath.Path(tmp_path), _iterator())
