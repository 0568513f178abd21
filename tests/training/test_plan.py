"""Tests for training/plan.py, the dry-run planner: every pod config (configs/pod/) on 8 fake CPU devices.

The planner needs its own process (the fake device count is fixed when JAX starts), so each case runs
`python -m training.plan` as a user would; the pod configs are scaled down (small widths, 2 layers) but keep
their mesh, micro-batching and remat.
"""

import concurrent.futures
import json
import math
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300
SMALL = ["--config.model.d_model=64", "--config.model.num_layers=2", "--config.model.num_heads=4",
         "--config.model.head_dim=16", "--config.model.mlp_dim=128", "--config.train.seq_len=64",
         "--config.train.batch_size=64"]
POD_CONFIGS = {  # config -> (extra overrides, the mesh it gets on 8 devices)
    "lm_1b_v5e64": ([], {"data": 1, "fsdp": 2, "tensor": 4}),
    "lm_1b_8xh100": ([], {"data": 1, "fsdp": 8, "tensor": 1}),
    "byt5_large_v5p128": (["--config.model.num_decoder_layers=1"], {"data": 1, "fsdp": 2, "tensor": 4}),
}


def _planner(*args: str) -> subprocess.CompletedProcess:
  """`python -m training.plan` on 8 fake devices (subprocess.run kills it if it outlives TIMEOUT_S)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return subprocess.run([sys.executable, "-m", "training.plan", "--num_devices=8", *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
  """Every pod config planned at once (their compiles overlap): name -> (stdout, the JSON plan)."""
  root = tmp_path_factory.mktemp("plans")
  with concurrent.futures.ThreadPoolExecutor(len(POD_CONFIGS)) as pool:
    procs = {name: pool.submit(_planner, f"--config=configs/pod/{name}.py", *SMALL, *extra,
                               f"--json={root / name}.json")
             for name, (extra, _) in POD_CONFIGS.items()}
  results = {}
  for name, future in procs.items():
    proc = future.result()
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}; stderr tail:\n{proc.stderr[-3000:]}"
    with open(root / f"{name}.json") as f:
      results[name] = (proc.stdout, json.load(f))
  return results


@pytest.mark.parametrize("name", sorted(POD_CONFIGS))
def test_per_device_param_bytes_are_total_over_sharding_factor(plans, name):
  _, plan = plans[name]
  mesh = plan["mesh"]
  assert mesh == POD_CONFIGS[name][1]
  assert plan["num_devices"] == 8
  per_device = 0
  for group, g in plan["groups"].items():
    axes = [a for entry in g["mesh"] if entry is not None for a in ([entry] if isinstance(entry, str) else entry)]
    factor = math.prod(mesh[a] for a in axes)
    assert g["bytes"] == g["count"] * math.prod(g["shape"]) * 4, group  # float32 params
    assert g["bytes_per_device"] * factor == g["bytes"], (group, g)
    per_device += g["bytes"] // factor
  assert plan["bytes_per_device"]["params"] == per_device
  assert plan["bytes_per_device"]["grads"] == per_device
  # Adam's two moments follow their parameter's sharding (plus a few replicated counters).
  assert 2 * per_device <= plan["bytes_per_device"]["opt_state"] <= 2 * per_device + 64
  # Every matrix is split over fsdp (and, where the mesh has one, tensor): most bytes are sharded.
  assert per_device < 1.1 * plan["bytes"]["params"] / (mesh["fsdp"] * mesh["tensor"])


@pytest.mark.parametrize("name", sorted(POD_CONFIGS))
def test_plan_prints_groups_memory_and_flops(plans, name):
  out, plan = plans[name]
  for group in plan["groups"]:
    assert group in out
  assert "per device: params " in out and "optimizer state" in out and "gradients" in out
  compiled = plan["compiled"]
  assert compiled["peak"] > compiled["argument"] > 0
  assert "XLA:CPU estimate of one compiled train step, per device" in out
  assert compiled["flops_per_device"] > 0
  if plan["model"] == "transformer":  # models/flops.py counts it; byt5 has no count
    assert plan["flops_per_step"] > 0 and "(models/flops.py)" in out
  else:
    assert plan["flops_per_step"] is None and "not counted for this family" in out


@pytest.mark.parametrize("args, expected", [
    (["--config.mesh.fsdp=4"],  # tensor 4 x fsdp 4 = 16 devices
     "error: mesh {'data': 1, 'fsdp': 4, 'tensor': 4} needs 16 devices but 8 are available."),
    (["--config.mesh.fsdp=3", "--config.mesh.data=-1"],
     "error: mesh {'data': -1, 'fsdp': 3, 'tensor': 4} does not divide the 8 devices."),
    (["--config.train.batch_size=4", "--config.train.grad_accum=1", "--config.mesh.tensor=1"],  # 8 shards
     "error: train.batch_size 4 does not split over data x fsdp = 8 batch shards of the mesh"),
], ids=["mesh_too_big", "mesh_does_not_divide", "batch_does_not_split"])
def test_bad_plan_input_is_one_error_line(args, expected):
  proc = _planner("--config=configs/pod/lm_1b_v5e64.py", *SMALL, "--nocompile", *args)
  assert proc.returncode == 1, (proc.stdout, proc.stderr)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
