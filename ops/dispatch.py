"""Implementation dispatch shared by every op package: `impl` name -> function, best default per backend.

Each op keeps a dict {"reference": ..., "xla": ..., "pallas": ...} (built by `implementations` from its
modules); `impl=None` (or "", the config spelling) picks the best one for `jax.default_backend()`; an
explicit name that cannot run here raises.
"""

from typing import Any, Callable, Mapping

import jax

# Best available implementation per backend, for ops that do not override it. Pallas joins per op as its
# kernels land.
DEFAULT_IMPL: Mapping[str, str] = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}
# For ops whose Pallas kernels exist on both accelerators.
PALLAS_ON_ACCELERATORS: Mapping[str, str] = {"cpu": "xla", "gpu": "pallas", "tpu": "pallas"}


def pallas_kernel(op_name: str, kernels: Mapping[str, Any], interpret: bool) -> Any:
  """The kernel module for impl="pallas": the backend's own, or the TPU kernel interpreted on CPU."""
  backend = jax.default_backend()
  if backend in kernels:
    return kernels[backend]
  if interpret:
    return kernels["tpu"]
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


def resolve_impl(op_name: str, impl: str | None, implementations: Mapping[str, Callable],
                 defaults: Mapping[str, str] = DEFAULT_IMPL) -> str:
  """The implementation name to run: `impl` itself, or the backend default when it is None or ""."""
  if impl is None or impl == "":
    return defaults.get(jax.default_backend(), "xla")
  if impl not in implementations:
    raise ValueError(f"Unknown {op_name} impl {impl!r}; valid values are None, "
                     f"{', '.join(repr(name) for name in implementations)}.")
  return impl


def implementations(op_name: str, fn_name: str, reference: Any, xla: Any, pallas_tpu: Any = None,
                    pallas_gpu: Any = None) -> dict[str, Callable[..., Any]]:
  """The impl table {name: callable taking the op's canonical arguments} of an op package.

  Every module implements the op as `module.<fn_name>(*arrays, **options)`. The canonical call passes
  `block_sizes` and `interpret` to every impl: "reference" drops both (the oracle has no tiling), "xla"
  drops `interpret` (only meaningful for Pallas kernels). With kernel modules, "pallas" runs the
  backend's own kernel (`pallas_kernel`) and "pallas_tpu" / "pallas_gpu" force one.
  """
  def run_reference(*args, block_sizes, interpret, **kwargs):
    del block_sizes, interpret  # The oracle has no tiling.
    return getattr(reference, fn_name)(*args, **kwargs)

  def run_xla(*args, interpret, **kwargs):
    del interpret  # Only meaningful for Pallas kernels.
    return getattr(xla, fn_name)(*args, **kwargs)

  table = {"reference": run_reference, "xla": run_xla}
  if pallas_tpu is None and pallas_gpu is None:
    return table

  def run_pallas(*args, interpret, **kwargs):
    kernel = pallas_kernel(op_name, {"tpu": pallas_tpu, "gpu": pallas_gpu}, interpret)
    return getattr(kernel, fn_name)(*args, interpret=interpret, **kwargs)

  def run_pallas_tpu(*args, **kwargs):
    return getattr(pallas_tpu, fn_name)(*args, **kwargs)

  def run_pallas_gpu(*args, **kwargs):
    return getattr(pallas_gpu, fn_name)(*args, **kwargs)

  table.update(pallas=run_pallas, pallas_tpu=run_pallas_tpu, pallas_gpu=run_pallas_gpu)
  return table
