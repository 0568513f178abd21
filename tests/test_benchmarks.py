"""The benchmark scripts run (CPU smoke: interpret-mode kernels, tiny shapes) and check correctness first."""

import re

from benchmarks import kernels


def test_kernels_benchmark_smoke_checks_every_kernel_against_its_baseline():
  report = kernels.run(kernels._parse_args(["--smoke", "--ts", "64", "--no_backward"]))
  assert "unavailable" not in report, report
  assert "INTERPRET mode" in report
  for op in kernels.OPS:
    assert f"## {op}" in report
  errors = [float(x) for x in re.findall(r"\| (\d\.\de[+-]\d\d) \|$", report, flags=re.M)]
  assert len(errors) == 5, report  # causal, cog, key_bias, gla, landmark: each checked before timing
  assert max(errors) < 1e-4, report
