"""Run directories through training/paths.py (etils.epath): local paths, and gs:// through epath's own
test backend (etils.epath.testing.mock_epath, every operation on gs://bucket/... mapped to a local
directory), so the remote code paths run here: metrics.jsonl without append, eval results, config.json,
checkpoint discovery. A workdir that cannot be created is one error line."""

import json
import os
import subprocess
import sys

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from training import checkpoint as ckpt_lib
from training import evaluation
from training import metrics
from training import paths
from training.errors import ConfigError


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://bucket/<rest> is tmp_path/bucket/<rest> for every epath operation (and for tensorboardX,
  which writes GCS itself)."""
  root = tmp_path / "gcs"

  def local(path):
    text = os.fspath(path)
    return os.fspath(root / text[len("gs://"):]) if text.startswith("gs://") else text

  def mapped(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def mapped2(original, path, dst, *args, **kwargs):
    return original(local(path), local(dst), *args, **kwargs)

  real_writer = metrics.tensorboardX.SummaryWriter
  monkeypatch.setattr(metrics.tensorboardX, "SummaryWriter", lambda logdir, **kw: real_writer(local(logdir), **kw))
  fns = {name: mapped for name in ("exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open",
                                     "remove", "rmtree", "stat", "walk")}
  fns.update(copy=mapped2, rename=mapped2, replace=mapped2)
  with epath_testing.mock_epath(**fns):
    yield root


def test_local_paths_are_absolute_and_urls_are_kept(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.run_path("runs/a")) == os.path.join(str(tmp_path), "runs", "a")
  assert os.fspath(paths.run_path("gs://bucket/run")) == "gs://bucket/run"
  assert paths.is_local("runs/a") and not paths.is_local("gs://bucket/run")


def test_whole_file_writes_leave_no_temporary_behind(tmp_path):
  path = epath.Path(tmp_path) / "config.json"
  paths.write_json(path, {"a": 1})
  paths.write_json(path, {"a": 2})
  assert paths.read_json(path) == {"a": 2}
  assert sorted(os.listdir(tmp_path)) == ["config.json"]
  assert paths.read_json(epath.Path(tmp_path) / "missing.json") is None
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
    paths.read_json(epath.Path(tmp_path) / "bad.json")


def test_metrics_on_an_object_store_append_and_resume_without_duplicates(fake_gcs):
  with metrics.MetricsLogger("gs://bucket/run") as logger:
    logger.write(1, {"loss": 2.0})
    logger.write(2, {"loss": 1.5, "note": "x"})
  stored = fake_gcs / "bucket" / "run" / metrics.METRICS_FILENAME
  with open(stored, "a") as f:
    f.write('{"step": 3, "loss"')  # a line a crash cut short
  with metrics.MetricsLogger("gs://bucket/run") as logger:  # a resumed run
    logger.write(2, {"loss": 9.0, "lr": 0.1})  # loss at step 2 is already logged: only lr is new
    logger.write(3, {"loss": 1.0})
  lines = stored.read_text().splitlines()
  assert lines[2] == '{"step": 3, "loss"'  # kept as it was, and the next record on its own line
  records = [json.loads(line) for i, line in enumerate(lines) if i != 2]
  assert records == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "note": "x"}, {"step": 2, "lr": 0.1},
                     {"step": 3, "loss": 1.0}]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(stored.parent))


def test_eval_results_config_and_checkpoint_discovery_on_an_object_store(fake_gcs):
  run = "gs://bucket/run"
  paths.make_dir(paths.run_path(run) / "eval")  # as evaluate() does
  evaluation.record_result(f"{run}/eval/bpb_step5.json", "bpb", 5, {"data": "valid", "bpb": 1.5})
  evaluation.record_result(f"{run}/eval/bpb_step5.json", "bpb", 5, {"data": "test", "bpb": 1.6})
  record = json.loads((fake_gcs / "bucket" / "run" / "eval" / "bpb_step5.json").read_text())
  assert sorted(record["entries"]) == ["test", "valid"]  # no evaluation replaces another
  paths.write_json(paths.run_path(run) / "config.json", {"train": {"steps": 3}, "compute": {"total": 1}})
  reader = ckpt_lib.Checkpointer(run, read_only=True)
  assert reader.all_steps() == [] and reader.latest_step() is None  # no checkpoints/ yet: nothing to find
  assert evaluation.load_run_config(run, reader, 0).to_dict() == {"train": {"steps": 3}}
  assert os.fspath(ckpt_lib.checkpoint_dir(run)) == "gs://bucket/run/checkpoints"


def test_a_workdir_that_cannot_be_created_is_one_error_line(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ConfigError, match="cannot create the run directory"):
    paths.make_dir(paths.run_path(blocker / "run"))
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, os.path.join(repo, "train.py"), f"--config={repo}/configs/tiny.py",
                         f"--workdir={blocker}/run"], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f"error: cannot create the run directory {blocker}/run: Not a directory."], proc.stderr
