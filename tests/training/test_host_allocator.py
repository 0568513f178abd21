"""training/host_allocator.py: which environment the entry scripts re-execute under, and that the re-executed
process really stops re-faulting a large XLA:CPU temporary on every call."""

import json
import os
import subprocess
import sys

import pytest

from training import host_allocator as ha

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TCMALLOC = "libtcmalloc_minimal.so.4"


def test_auto_preloads_tcmalloc_when_installed_keeping_the_users_preload():
  env = ha.exec_environment({"LD_PRELOAD": "libfoo.so", "PATH": "/bin"}, locate_tcmalloc=lambda: TCMALLOC,
                            platform="linux")
  assert env["LD_PRELOAD"] == f"{TCMALLOC} libfoo.so" and env["PATH"] == "/bin"
  assert env[ha.ACTIVE_ENV] == f"tcmalloc ({TCMALLOC})" and "GLIBC_TUNABLES" not in env


def test_auto_falls_back_to_glibc_huge_pages_keeping_the_users_tunables():
  env = ha.exec_environment({}, locate_tcmalloc=lambda: None, platform="linux")
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and "LD_PRELOAD" not in env
  env = ha.exec_environment({ha.ENV: "hugepages", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                            locate_tcmalloc=lambda: TCMALLOC, platform="linux")
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert env[ha.ACTIVE_ENV] == "glibc malloc, transparent huge pages"


@pytest.mark.parametrize("environ, platform", [
    ({ha.ENV: "system"}, "linux"),  # asked for nothing
    ({ha.ACTIVE_ENV: "tcmalloc (x)"}, "linux"),  # already re-executed: never a second time
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, "linux"),  # the user preloaded it
    ({ha.ENV: "hugepages", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux"),  # the user's own choice
    ({}, "darwin"),  # neither mechanism exists there
])
def test_keeps_the_process_as_it_is(environ, platform):
  assert ha.exec_environment(environ, locate_tcmalloc=lambda: TCMALLOC, platform=platform) is None


def test_bad_settings_are_one_sentence():
  with pytest.raises(ValueError, match=r"BYTELAB_HOST_ALLOCATOR='fast' is not one of auto, tcmalloc, hugepages, "
                                       r"system\."):
    ha.exec_environment({ha.ENV: "fast"}, locate_tcmalloc=lambda: TCMALLOC, platform="linux")
  with pytest.raises(ValueError, match="no libtcmalloc is installed"):
    ha.exec_environment({ha.ENV: "tcmalloc"}, locate_tcmalloc=lambda: None, platform="linux")


# A 64 MB temporary (above glibc's largest mmap threshold, like the train step's 307 MB): the script
# re-executes itself (`python -c` included), then counts the minor page faults of each call.
_PROBE = """
import json, resource, sys
from training import host_allocator
host_allocator.reexec_if_needed()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jax.lax.optimization_barrier(x * 2.0) + 1.0).sum())
x = jnp.ones((1 << 24,), jnp.float32)
faults = []
for _ in range(6):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"active": host_allocator.active(), "faults": sorted(faults[2:])[1]}))
"""


def _probe(choice: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in (ha.ACTIVE_ENV, "LD_PRELOAD", "GLIBC_TUNABLES")}
  proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO_ROOT, capture_output=True, text=True,
                        env={**env, ha.ENV: choice, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _transparent_huge_pages_off() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[never]" in f.read()
  except OSError:
    return True


@pytest.mark.skipif(sys.platform != "linux", reason="both mechanisms are Linux (glibc / ld.so) ones")
@pytest.mark.parametrize("choice", ["auto", "hugepages"])
def test_reexecuted_process_stops_refaulting_a_large_temporary(choice):
  chosen = _probe(choice)
  if chosen["active"].startswith("glibc") and _transparent_huge_pages_off():
    pytest.skip("this kernel has transparent huge pages off, so the glibc tunable cannot act")
  system = _probe("system")
  assert system["active"] == "system malloc" and system["faults"] > 8000, system  # 64 MB / 4 KB = 16k pages
  assert chosen["active"] != "system malloc" and chosen["faults"] < system["faults"] / 10, (system, chosen)


def test_a_bad_setting_stops_the_entry_script_with_one_line():
  proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                        env={**os.environ, ha.ENV: "fast"}, timeout=60)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
      "error: BYTELAB_HOST_ALLOCATOR='fast' is not one of auto, tcmalloc, hugepages, system."]
