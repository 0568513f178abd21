"""A host allocator that keeps freed memory, chosen before the entry scripts start JAX.

XLA:CPU allocates each execution's temporaries as one buffer (307 MB for the default train step) with
posix_memalign and frees it when the step ends; glibc hands a chunk that large straight back to the
kernel (munmap, or a brk trim that `mallopt` does not prevent here), so every step page-faults and zeroes
all of it again: 75k minor faults and about a fifth of the default step's wall time on 2 cores.

    auto       tcmalloc if the dynamic linker finds it (Debian: libtcmalloc-minimal4), else `hugepages`
    tcmalloc   LD_PRELOAD tcmalloc, which keeps freed spans for reuse: no faults at all
    hugepages  glibc's `glibc.malloc.hugetlb=1` tunable: large chunks are madvised as transparent huge
               pages, 512x fewer faults (the kernel still zeroes the memory each step)
    system     leave the process as it is

Both take effect only when a process starts, so `reexec_if_needed` re-executes the entry script once
with the environment set (the same command line, the same pid). Set BYTELAB_HOST_ALLOCATOR to choose.
Measured on the default step: benchmarks/results/train_step_cpu_2core.md.
"""

import ctypes.util
import os
import sys
from typing import Callable, Mapping

ENV = "BYTELAB_HOST_ALLOCATOR"
ACTIVE_ENV = "_BYTELAB_HOST_ALLOCATOR_ACTIVE"  # set in the re-executed process: no second exec, and a name to log
CHOICES = ("auto", "tcmalloc", "hugepages", "system")
_HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def find_tcmalloc() -> str | None:
  """The soname of an installed tcmalloc (the minimal build first), or None."""
  for name in ("tcmalloc_minimal", "tcmalloc"):
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def exec_environment(environ: Mapping[str, str], locate_tcmalloc: Callable[[], str | None] = find_tcmalloc,
                     platform: str = sys.platform) -> dict[str, str] | None:
  """The environment to re-execute under, or None to keep this process as it is.

  `locate_tcmalloc` (a linker lookup) runs only when the choice needs it, not in the re-executed process.

  Raises ValueError (one sentence) for an unknown BYTELAB_HOST_ALLOCATOR, or `tcmalloc` asked for but absent.
  """
  choice = environ.get(ENV, "auto")
  if choice not in CHOICES:
    raise ValueError(f"{ENV}={choice!r} is not one of {', '.join(CHOICES)}.")
  if platform != "linux" or choice == "system" or ACTIVE_ENV in environ:
    return None
  preload = environ.get("LD_PRELOAD", "")
  if "tcmalloc" in preload:  # the user preloaded it already
    return None
  env = dict(environ)
  tcmalloc = locate_tcmalloc() if choice in ("auto", "tcmalloc") else None
  if choice == "tcmalloc" and not tcmalloc:
    raise ValueError(f"{ENV}=tcmalloc, but no libtcmalloc is installed (Debian: apt install "
                     "libtcmalloc-minimal4).")
  if tcmalloc:
    env["LD_PRELOAD"] = " ".join(part for part in (tcmalloc, preload) if part)
    env[ACTIVE_ENV] = f"tcmalloc ({tcmalloc})"
    return env
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:  # the user's own setting stands
    return None
  env["GLIBC_TUNABLES"] = ":".join(part for part in (tunables, _HUGEPAGES_TUNABLE) if part)
  env[ACTIVE_ENV] = "glibc malloc, transparent huge pages"
  return env


def active() -> str:
  """What this process runs with, for the start line."""
  if ACTIVE_ENV in os.environ:
    return os.environ[ACTIVE_ENV]
  if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
    return "tcmalloc (LD_PRELOAD)"
  return "system malloc"


def reexec_if_needed() -> None:
  """Re-executes this command line under `exec_environment`, if it asks for one; call it first in `__main__`.

  A bad BYTELAB_HOST_ALLOCATOR exits with one line on stderr, before any work is done.
  """
  try:
    env = exec_environment(os.environ)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv keeps the interpreter's own options (`-m benchmarks.train_step`, `-u`), which sys.argv drops.
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
