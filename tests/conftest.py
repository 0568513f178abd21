"""Test-wide setup: CPU-only by default; gpu/tpu tests skip elsewhere; slow tests need --runslow."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", ""))
# Byte-store caches (data/corpora.py) of this test run go to a fresh directory, not ~/.cache.
os.environ.setdefault("BYTELAB_DATA_CACHE", tempfile.mkdtemp(prefix="bytelab-test-data-cache-"))
# One persistent XLA compilation cache for this test run, shared by the xdist workers and the train.py /
# evaluate.py subprocesses (they inherit the environment): a run that resumes, continues or evaluates
# another's config loads its compiled programs instead of compiling them again (a tiny MrT5 run: 73 s ->
# 17 s on 2 cores). Fresh per test run, so nothing outlives it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="bytelab-test-jax-cache-"))

import jax  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False, help="also run @pytest.mark.slow tests")


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords and not config.getoption("--runslow"):
      item.add_marker(skip_slow)
    for device in ("gpu", "tpu"):
      if device in item.keywords and backend != device:
        item.add_marker(pytest.mark.skip(reason=f"needs a {device.upper()} (backend is {backend})"))


@pytest.fixture(scope="session")
def repo_root() -> str:
  return REPO_ROOT


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drop JAX's compiled programs after each test module.

  Every XLA:CPU executable keeps memory mappings, and one pytest process compiles thousands of programs
  over the suite. Past the kernel's map limit (vm.max_map_count, 65530 here) the next compile segfaults
  (seen late in clean-checkout runs). Modules rarely share programs, so clearing costs little.
  """
  yield
  jax.clear_caches()
