"""Memory stays flat in the corpus size: a 2 GB corpus trains configs/tiny.py, and evaluate.py --text_file
reads it, under a fixed RSS bound.

Before the byte store every split was an in-memory int32 stream (4 bytes of RAM per byte of text): this
corpus would have needed more than 8 GB. The run happens in a subprocess (train.py, a cold cache
directory), and its peak RSS is its own VmHWM, printed at exit by a wrapper (ru_maxrss would include
the forking pytest process's peak, which Linux carries across exec). Generating
the corpus and building its cache take about a minute, so the test is slow:

    pytest --runslow tests/data/test_scale.py
"""

import os
import re
import subprocess
import sys

import pytest

from benchmarks import data as data_bench

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS_BYTES = 2_000_000_000
RSS_BOUND_MB = 1536
# Runs train.py as __main__ and prints the process's peak RSS (kB) on stderr at exit.
_WRAPPER = """
import atexit, runpy, sys
from benchmarks import data
atexit.register(lambda: print(f"peak-rss-mb {data.peak_rss_mb():.0f}", file=sys.stderr, flush=True))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def _run_measured(*args: str) -> tuple[str, str, float]:
  """(stdout, stderr, peak RSS MB) of `python <args>` in the repository, which must succeed."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _WRAPPER, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, proc.stderr, float(re.search(r"peak-rss-mb (\d+)", proc.stderr).group(1))


@pytest.mark.slow
def test_two_gigabytes_build_train_and_evaluate_under_a_fixed_rss_bound(tmp_path):
  corpus = data_bench.write_text_corpus(str(tmp_path / "corpus.txt"), CORPUS_BYTES)
  workdir, cache = f"--workdir={tmp_path / 'run'}", f"--config.data.cache_dir={tmp_path / 'cache'}"
  stdout, stderr, peak_mb = _run_measured(
      "train.py", "--config=configs/tiny.py", workdir, "--config.data.source=single_file",
      f"--config.data.paths={corpus}", "--config.data.max_corpus_bytes=0", cache, "--config.train.steps=20")
  assert "built the byte cache" in stderr  # a cold cache: this run built it
  assert "train 1,800,000,000 bytes" in stderr
  assert "final valid bits-per-byte" in stdout
  print(f"train.py: peak RSS {peak_mb:.0f} MB for a {CORPUS_BYTES / 1e9:.0f} GB corpus")
  assert peak_mb < RSS_BOUND_MB, f"peak RSS {peak_mb:.0f} MB"
  # evaluate.py --text_file builds the file's own entry (split "all") and streams windows from it.
  stdout, stderr, peak_mb = _run_measured("evaluate.py", workdir, f"--text_file={corpus}", "--eval.max_batches=4",
                                          f"--data.cache_dir={tmp_path / 'cache'}")
  assert "all 2,000,000,000 bytes" in stderr and "even sample of 16 of the split's" in stdout, stdout
  print(f"evaluate.py --text_file: peak RSS {peak_mb:.0f} MB")
  assert peak_mb < RSS_BOUND_MB, f"peak RSS {peak_mb:.0f} MB"
