"""`--config.model.attention_impl=pallas --config.model.interpret=true` trains like the XLA path on CPU.

The Pallas kernels run in interpret mode (the TPU kernel under `pltpu.InterpretParams()`), so this is the
CPU stand-in for "the model layers pick the Pallas path on TPU/GPU": same config, same data, same init, and
the per-step losses and gradient norms must agree within f32 kernel tolerance.
"""

import json
import os

import pytest

from tests.test_entrypoints import REPO_ROOT, _load_script

STEPS = 3


def _train(tmp_path, mixer: str, impl: str) -> list[dict]:
  workdir = str(tmp_path / f"{mixer}_{impl}")
  flags = [f"--config={REPO_ROOT}/configs/tiny.py", f"--workdir={workdir}",
           f"--config.model.mixer={mixer}", f"--config.model.attention_impl={impl}",
           f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.train.eval_every=0",
           "--config.checkpoint.every=100", "--config.eval.max_batches=1"]
  if impl == "pallas":
    flags.append("--config.model.interpret=true")
  assert _load_script("train").main(["train.py", *flags]) == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("mixer", ["softmax", pytest.param("cog", marks=pytest.mark.slow)])
def test_pallas_interpret_training_matches_xla(tmp_path, mixer):
  xla = _train(tmp_path, mixer, "xla")
  pallas = _train(tmp_path, mixer, "pallas")
  assert [r["step"] for r in pallas] == [r["step"] for r in xla] == list(range(1, STEPS + 1))
  for a, b in zip(xla, pallas):
    for key in ("loss", "grad_norm"):
      assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key, a[key], b[key])
