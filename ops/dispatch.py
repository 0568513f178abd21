"""What the op packages' public entries share about `impl`: the default per backend, the errors for an
unknown name or a kernel that cannot run here, and the options each kind of implementation takes.

Each op lists its implementations in a literal `IMPLEMENTATIONS` dict in its `__init__.py`.
"""

from typing import Any, Callable, Mapping

import jax

# Default implementation per backend, for ops without Pallas kernels.
DEFAULT_IMPL: Mapping[str, str] = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}
# For ops whose Pallas kernels exist on both accelerators.
PALLAS_ON_ACCELERATORS: Mapping[str, str] = {"cpu": "xla", "gpu": "pallas", "tpu": "pallas"}


def resolve_impl(op_name: str, impl: str | None, implementations: Mapping[str, Callable],
                 defaults: Mapping[str, str] = DEFAULT_IMPL) -> str:
  """The implementation name to run: `impl` itself, or the backend default when it is None or ""."""
  if impl is None or impl == "":
    return defaults.get(jax.default_backend(), "xla")
  if impl not in implementations:
    raise ValueError(f"Unknown {op_name} impl {impl!r}; valid values are None, "
                     f"{', '.join(repr(name) for name in implementations)}.")
  return impl


def impl_options(impl: str, block_sizes: Any, interpret: bool) -> dict[str, Any]:
  """The tuning keywords implementation `impl` takes: none for the "reference" oracle (no tiling),
  `block_sizes` for "xla", and `interpret` as well for the Pallas kernels."""
  if impl == "reference":
    return {}
  if impl == "xla":
    return dict(block_sizes=block_sizes)
  return dict(block_sizes=block_sizes, interpret=interpret)


def pallas_backend(op_name: str, interpret: bool) -> str:
  """Whose kernel impl="pallas" runs, "tpu" or "gpu": the backend's own, or the TPU kernel interpreted
  on CPU."""
  backend = jax.default_backend()
  if backend in ("tpu", "gpu"):
    return backend
  if interpret:
    return "tpu"
  raise ValueError(f"{op_name} impl='pallas' needs a TPU or GPU (the backend is {backend!r}); pass "
                   f"interpret=True to run the kernel in interpret mode, or use impl='xla'.")


def not_implemented(op_name: str, impl: str, *alternatives: str) -> Callable[..., None]:
  """A placeholder implementation that raises one clear sentence naming the working alternatives."""
  def fail(*args, **kwargs):
    del args, kwargs
    first, *rest = alternatives
    raise NotImplementedError(f"{op_name} impl={impl!r} is not implemented yet; use impl={first!r}"
                              + "".join(f" or {a!r}" for a in rest) + ".")
  return fail
