"""The impl tables of the op packages and the one jit at each op's public entry.

Every op lists its implementations in a literal `IMPLEMENTATIONS` dict; its public entry validates the
arguments in Python and then calls exactly one jitted function, `_call`, which canonicalises them and runs
the implementation traced inline (no jit of its own), so an op compiles once per configuration.
"""

import collections

import jax
import jax.numpy as jnp
import pytest

from ops import attention as attention_ops
from ops import dispatch
from ops import gla as gla_ops
from ops import landmark as landmark_ops
from ops import selective as selective_ops

KERNEL_IMPLS = ("reference", "xla", "pallas", "pallas_tpu", "pallas_gpu")
# Names of the op packages' own functions that could carry a jit on the path of a call.
OWN_FUNCTIONS = {"_call", "attention", "landmark_attention", "weights", "gla", "selective_attention"}


def _jit_names(jaxpr, counts):
  """Counter of the names of the jit equations in a jaxpr, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("pjit", "jit"):
      counts[eqn.params["name"]] += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          _jit_names(getattr(inner, "jaxpr", inner), counts)
  return counts


def test_implementation_tables():
  for ops in (attention_ops, gla_ops, landmark_ops):
    assert tuple(ops.IMPLEMENTATIONS) == KERNEL_IMPLS
    assert all(callable(fn) for fn in ops.IMPLEMENTATIONS.values())
  assert tuple(selective_ops.IMPLEMENTATIONS) == ("reference", "xla", "pallas")
  assert attention_ops.IMPLEMENTATIONS["xla"] is attention_ops.xla.attention
  assert gla_ops.IMPLEMENTATIONS["pallas_tpu"] is gla_ops.pallas_tpu.gla


def test_impl_options():
  blocks = object()
  assert dispatch.impl_options("reference", blocks, True) == {}
  assert dispatch.impl_options("xla", blocks, True) == dict(block_sizes=blocks)
  for impl in ("pallas", "pallas_tpu", "pallas_gpu"):
    assert dispatch.impl_options(impl, blocks, True) == dict(block_sizes=blocks, interpret=True)


def _calls(impl):
  x = jnp.ones((1, 16, 2, 8), jnp.float32)
  gate = jnp.full((1, 16, 2, 8), -0.1, jnp.float32)
  calls = {
      "attention": lambda: attention_ops.attention(x, x, x, impl=impl, interpret=True),
      "landmark": lambda: landmark_ops.landmark_attention(x, x, x, block_size=4, impl=impl,
                                                          interpret=True),
      "gla": lambda: gla_ops.gla(x, x, x, gate, impl=impl, interpret=True),
  }
  if impl in ("reference", "xla"):
    calls["selective"] = lambda: selective_ops.selective_attention(x, x, x, impl=impl)
  return calls


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_one_jit_per_call(impl):
  for name, call in _calls(impl).items():
    counts = _jit_names(jax.make_jaxpr(call)().jaxpr, collections.Counter())
    own = {fn: n for fn, n in counts.items() if fn in OWN_FUNCTIONS}
    assert own == {"_call": 1}, f"{name} impl={impl!r}: {own}"
