"""The benchmark scripts run (CPU smoke: interpret-mode kernels, tiny shapes) and check correctness first."""

import re

from benchmarks import kernels
from benchmarks import train_loop


def test_kernels_benchmark_smoke_checks_every_kernel_against_its_baseline():
  report = kernels.run(kernels._parse_args(["--smoke", "--ts", "64", "--no_backward"]))
  assert "unavailable" not in report, report
  assert "INTERPRET mode" in report
  for op in kernels.OPS:
    assert f"## {op}" in report
  errors = [float(x) for x in re.findall(r"\| (\d\.\de[+-]\d\d) \|$", report, flags=re.M)]
  assert len(errors) == 5, report  # causal, cog, key_bias, gla, landmark: each checked before timing
  assert max(errors) < 1e-4, report


def test_train_loop_benchmark_reports_the_loop_s_step_time(repo_root):
  report = train_loop.run(train_loop._parse_args([f"--config={repo_root}/configs/tiny.py", "--steps=8",
                                                  "--log_every=2", "--runs=1"]))
  rows = re.findall(r"^\| (\d) \| ([\d.]+) \| ([\d,]+) \| (\d+) \|", report, flags=re.M)
  assert [r[0] for r in rows] == ["1"] and int(rows[0][3]) == 3, report  # 4 log windows, the first dropped
  assert all(float(r[1]) > 0 for r in rows) and "median over runs:" in report
