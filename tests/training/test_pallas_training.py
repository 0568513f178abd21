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


# configs/tiny.py sizes, as overrides of a variant's own config.
TINY = ["--config.train.batch_size=4", "--config.train.seq_len=32", "--config.model.num_layers=2",
        "--config.model.d_model=32", "--config.model.num_heads=2", "--config.eval.batch_size=4",
        "--config.data.max_corpus_bytes=200000"]


def _train(tmp_path, mixer: str, impl: str) -> list[dict]:
  workdir = str(tmp_path / f"{mixer}_{impl}")
  if mixer == "landmark":
    # Window-aligned blocks (the config default) so packed training reaches the kernel, 8-byte blocks.
    config = [f"--config={REPO_ROOT}/configs/landmark.py", *TINY, "--config.model.landmark.block_size=8"]
  else:
    config = [f"--config={REPO_ROOT}/configs/tiny.py", f"--config.model.mixer={mixer}"]
  flags = [*config, f"--workdir={workdir}", f"--config.model.attention_impl={impl}",
           f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.train.eval_every=0",
           "--config.checkpoint.every=100", "--config.eval.max_batches=1"]
  if impl == "pallas":
    flags.append("--config.model.interpret=true")
  assert _load_script("train").main(["train.py", *flags]) == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("mixer", ["softmax", pytest.param("gla", marks=pytest.mark.slow),
                                   pytest.param("cog", marks=pytest.mark.slow),
                                   pytest.param("landmark", marks=pytest.mark.slow)])
def test_pallas_interpret_training_matches_xla(tmp_path, mixer):
  xla = _train(tmp_path, mixer, "xla")
  pallas = _train(tmp_path, mixer, "pallas")
  assert [r["step"] for r in pallas] == [r["step"] for r in xla] == list(range(1, STEPS + 1))
  for a, b in zip(xla, pallas):
    for key in ("loss", "grad_norm"):
      assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key, a[key], b[key])
