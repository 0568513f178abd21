"""Tests for training/sharding.py and the sharded training path of training/loop.py.

Multi-device checks run in subprocesses: the fake CPU device count (XLA_FLAGS) must be set before jax
starts, and this pytest process has already started it. The three subprocesses (a 1-device run, an
8-device run on a data=2 x fsdp=2 x tensor=2 mesh, and tests/training/_sharding_worker.py) start together
once per module so that their compile times overlap.
"""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import models
from configs import tiny
from training import loop
from training import runtime
from training import sharding
from training import train_step as ts
from training.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300
STEPS = 5
MESH_8 = {"data": 2, "fsdp": 2, "tensor": 2}

# Tiny dims that divide every mesh axis: batch 8 over data*fsdp = 4, d_model 32 over fsdp, 2 heads / mlp 64 /
# padded vocab 384 over tensor.
_TRAIN_ARGS = [
    "--config=configs/tiny.py", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
    "--config.train.eval_every=0", "--config.train.batch_size=8", "--config.train.seq_len=32",
    "--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
    "--config.checkpoint.every=0", "--config.eval.batch_size=8", "--config.eval.max_batches=1",
]


def _env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


class _Runs:
  """Subprocesses started together; `result(name)` waits for one and returns (returncode, stdout, stderr)."""

  def __init__(self):
    self.workdirs: dict[str, str] = {}
    self._procs = {}
    self._results = {}

  def start(self, name: str, argv: list[str], num_devices: int) -> None:
    self._procs[name] = subprocess.Popen(argv, cwd=REPO_ROOT, env=_env(num_devices), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)

  def result(self, name: str) -> tuple[int, str, str]:
    if name not in self._results:
      proc = self._procs[name]
      try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
      except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"subprocess {name} timed out after {TIMEOUT_S}s; stderr tail:\n{err[-3000:]}")
      self._results[name] = (proc.returncode, out, err)
    return self._results[name]

  def close(self) -> None:
    for proc in self._procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("sharding")
  handle = _Runs()
  handle.workdirs.update({"1dev": str(root / "1dev"), "8dev": str(root / "8dev")})
  handle.start("1dev", [sys.executable, "train.py", *_TRAIN_ARGS, f"--workdir={handle.workdirs['1dev']}"], 1)
  handle.start("8dev", [sys.executable, "train.py", *_TRAIN_ARGS, f"--workdir={handle.workdirs['8dev']}",
                        *(f"--config.mesh.{k}={v}" for k, v in MESH_8.items())], 8)
  handle.start("worker", [sys.executable, "-m", "tests.training._sharding_worker",
                          *(str(MESH_8[a]) for a in sharding.MESH_AXES)], 8)
  yield handle
  handle.close()


def _train_metrics(runs: _Runs, name: str) -> list[dict]:
  returncode, _, err = runs.result(name)
  assert returncode == 0, f"train.py ({name}) exited {returncode}; stderr tail:\n{err[-3000:]}"
  with open(os.path.join(runs.workdirs[name], "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _worker_report(runs: _Runs) -> dict:
  returncode, out, err = runs.result("worker")
  assert returncode == 0, f"_sharding_worker exited {returncode}; stderr tail:\n{err[-3000:]}"
  return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# 8 devices (data=2, fsdp=2, tensor=2) vs 1 device.
# ----------------------------------------------------------------------------


def test_8_device_mesh_matches_1_device_losses(runs):
  one = _train_metrics(runs, "1dev")
  eight = _train_metrics(runs, "8dev")
  train_one = [m for m in one if "loss" in m]
  train_eight = [m for m in eight if "loss" in m]
  assert [m["step"] for m in train_one] == list(range(1, STEPS + 1))
  assert [m["step"] for m in train_eight] == list(range(1, STEPS + 1))  # every step ran on the mesh
  for a, b in zip(train_one, train_eight):
    for key in ("loss", "grad_norm"):
      assert np.isfinite(a[key])
      rel = abs(a[key] - b[key]) / abs(a[key])
      assert rel < 1e-4, f"step {a['step']} {key}: 1 device {a[key]} vs 8 devices {b[key]} (rel {rel:.2e})"
    assert a["lr"] == pytest.approx(b["lr"], rel=1e-6)
  eval_one = [m["eval/bpb"] for m in one if "eval/bpb" in m]
  eval_eight = [m["eval/bpb"] for m in eight if "eval/bpb" in m]
  assert len(eval_one) == len(eval_eight) == 1
  assert eval_eight[0] == pytest.approx(eval_one[0], rel=1e-4)


def test_8_device_run_records_its_mesh(runs):
  _train_metrics(runs, "8dev")
  with open(os.path.join(runs.workdirs["8dev"], "config.json")) as f:
    config = json.load(f)
  assert {k: config["mesh"][k] for k in MESH_8} == MESH_8


def test_params_are_sharded_on_the_mesh(runs):
  report = _worker_report(runs)
  assert report["num_devices"] == 8
  assert report["mesh"] == MESH_8
  d_model = report["dims"]["d_model"]
  # Embedding [vocab=384, embed=d_model]: vocab over tensor, embed over fsdp.
  assert report["embedding_spec"] == ["tensor", "fsdp"]
  assert report["embedding_shard_shape"] == [384 // MESH_8["tensor"], d_model // MESH_8["fsdp"]]
  assert report["embedding_mu_spec"] == report["embedding_spec"]  # Adam moments follow their parameter
  assert report["mlp_wi_spec"] == ["fsdp", "tensor"]
  assert report["query_spec"] == ["fsdp", "tensor", None]
  # MaxText's assert_params_sufficiently_sharded: nearly all parameter bytes are split, and one device
  # holds little more than 1 / (fsdp * tensor) of them (the batch axis "data" replicates parameters).
  leaves = report["params"].values()
  total = sum(p["total"] for p in leaves)
  sharded = sum(p["total"] for p in leaves if not p["replicated"])
  per_device = sum(p["per_device"] for p in leaves)
  assert sharded / total > 0.95, report["params"]
  ideal = total / (MESH_8["fsdp"] * MESH_8["tensor"])
  assert per_device <= 1.05 * ideal, (per_device, ideal)
  for name, p in report["params"].items():
    if p["total"] >= 4 * d_model * d_model:  # every matrix, not just most bytes
      assert not p["replicated"], f"{name} is replicated on every device"


def test_train_step_keeps_state_shardings(runs):
  report = _worker_report(runs)
  assert report["stepped_shardings_equal"]


@pytest.mark.parametrize("variant", ["mesh", "mesh_accum2"])
def test_mesh_train_step_matches_one_device(runs, variant):
  """One step on the 2x2x2 mesh (optionally with 2 micro-batches) == the same step on 1 device.

  Guards the XLA miscompile that configs/base.py works around ("activation_embed" -> None).
  """
  report = _worker_report(runs)
  ref_loss, ref_norm = report["losses"]["one_device"], report["grad_norms"]["one_device"]
  assert np.isfinite(ref_loss) and np.isfinite(ref_norm)
  assert report["losses"][variant] == pytest.approx(ref_loss, rel=1e-5)
  assert report["grad_norms"][variant] == pytest.approx(ref_norm, rel=1e-5)
  # Adam's first step moves every param by about +-lr; a wrong gradient sign shows up as ~2 lr.
  assert report["param_diff_vs_one_device"][variant] < 0.1 * report["lr"]


def test_global_batch_is_split_over_data_and_fsdp(runs):
  report = _worker_report(runs)
  assert report["batch_spec"] == [["data", "fsdp"]]
  # 8 rows over data * fsdp = 4 shards: 2 rows each, at rows 0, 2, 4, 6 (tensor holds replicas).
  assert report["batch_shard_shapes"] == [[2, 16]]
  assert report["batch_row_blocks"] == [0, 2, 4, 6]
  assert report["batch_roundtrip"]


# ----------------------------------------------------------------------------
# In-process: mesh sizes and logical partition specs (no devices needed).
# ----------------------------------------------------------------------------


def _mesh(data, fsdp, tensor):
  return {"data": data, "fsdp": fsdp, "tensor": tensor}


@pytest.mark.parametrize("sizes,devices,expected", [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((1, 2, -1), 8, (1, 2, 4)),
    ((2, 2, 2), 8, (2, 2, 2)),
    ((-1, 1, 1), 1, (1, 1, 1)),
])
def test_mesh_shape_fills_one_minus_one(sizes, devices, expected):
  assert sharding.mesh_shape(_mesh(*sizes), devices) == expected


def test_mesh_shape_reads_a_config_dict():
  config = ml_collections.ConfigDict(_mesh(-1, 2, 1))
  assert sharding.mesh_shape(config, 4) == (2, 2, 1)


def test_mesh_shape_rejects_two_minus_ones():
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape(_mesh(-1, -1, 1), 8)


@pytest.mark.parametrize("sizes,devices", [
    ((-1, 3, 1), 8),  # 3 does not divide 8
    ((2, 2, 1), 8),  # product 4 != 8
    ((2, 2, 4), 8),  # product 16 > 8
    ((1, 1, 1), 2),
])
def test_mesh_shape_rejects_sizes_that_do_not_fit(sizes, devices):
  with pytest.raises(ValueError, match="devices"):
    sharding.mesh_shape(_mesh(*sizes), devices)


@pytest.mark.parametrize("sizes", [(0, 1, 1), (1, -2, 1)])
def test_mesh_shape_rejects_non_positive_sizes(sizes):
  with pytest.raises(ValueError, match="positive"):
    sharding.mesh_shape(_mesh(*sizes), 8)


def test_mesh_context_reports_a_bad_mesh_as_config_error():
  config = tiny.get_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 7, 1
  with pytest.raises(ConfigError, match="mesh"):
    with runtime.mesh_context(config):
      pass


def test_make_mesh_uses_auto_axes():
  mesh = sharding.make_mesh(_mesh(-1, 1, 1), devices=jax.devices()[:1])
  assert mesh.axis_names == sharding.MESH_AXES
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_matrix_has_a_sharded_logical_axis(scan_layers):
  """Each >= 2-D parameter (and its Adam moments) names a logical axis that the rules map to a mesh axis."""
  config = tiny.get_config()
  config.model.scan_layers = scan_layers
  config = runtime.resolve_config(config)
  family = models.get_family(config.model)
  tx, _ = ts.make_optimizer(config.optimizer, config.train.steps)
  boxed = jax.eval_shape(lambda r: ts.init_train_state(family, tx, r, config.train.seq_len), jax.random.key(0))
  specs = ts.state_partition_specs(boxed, tx)
  rules = dict(sharding.axis_rules(config.mesh))
  shapes = runtime.strip_boxes(boxed.params)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  flat_specs = jax.tree_util.tree_flatten_with_path(specs.params, is_leaf=is_spec)[0]
  flat_shapes = jax.tree.leaves(shapes)
  assert len(flat_specs) == len(flat_shapes)
  for (path, spec), shape in zip(flat_specs, flat_shapes):
    assert len(spec) == len(shape.shape), (jax.tree_util.keystr(path), spec, shape.shape)
    for name in spec:
      assert name in rules, f"{jax.tree_util.keystr(path)}: logical axis {name!r} has no rule"
    if shape.ndim - (1 if scan_layers and "layers" in spec else 0) >= 2:
      assert any(rules[n] is not None for n in spec), f"{jax.tree_util.keystr(path)} {spec} is replicated"
  mu = specs.opt_state[-1][0].mu
  assert jax.tree.leaves(mu, is_leaf=is_spec) == jax.tree.leaves(specs.params, is_leaf=is_spec)
