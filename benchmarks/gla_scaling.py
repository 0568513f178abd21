"""GLA scaling benchmark: chunked GLA vs the recurrent reference vs softmax attention, over T.

Times, in one process and on the same inputs:
  chunked:   `ops.gla.gla(..., impl="xla")`, the chunkwise-parallel form (spec §1.1), O(T) work;
  recurrent: `ops.gla.gla(..., impl="reference")`, the f32 `lax.scan` over time, O(T) sequential steps;
  softmax:   `ops.attention.attention(..., causal=True, impl="xla")`, flash-style, O(T^2) work;
for the forward and the forward+backward (gradients w.r.t. every input of a sum(o * cotangent) loss).
Each cell is compiled once (ahead of time), run `--warmup` times, then timed as the median of up to
`--repeats` runs (each ended by block_until_ready); a cell stops repeating once it has spent
`--cell_seconds`. Memory is XLA's compile-time buffer estimate from
`jit(...).lower(...).compile().memory_analysis()`: arguments + outputs + temporaries - aliased, in MiB.

Usage:
  python -m benchmarks.gla_scaling --max_t 2048                # quick
  python -m benchmarks.gla_scaling --out benchmarks/results/gla_scaling_cpu.md
  python -m benchmarks.gla_scaling --ts 1024,4096 --heads 8 --key_dim 128 --value_dim 128 --ops chunked
"""

import argparse
import datetime
import os
import platform
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from ops.attention import attention
from ops.gla import gla
from training import host_allocator

OPS = ("chunked", "recurrent", "softmax")
DEFAULT_TS = (512, 1024, 2048, 4096, 8192)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ts", default=",".join(map(str, DEFAULT_TS)),
                 help="comma-separated sequence lengths")
  p.add_argument("--max_t", type=int, default=None, help="drop lengths above this")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--key_dim", type=int, default=64, help="K (also the softmax head dim)")
  p.add_argument("--value_dim", type=int, default=64, help="V (softmax uses K for q, k and v)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--chunk_size", type=int, default=64)
  p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
  p.add_argument("--no_backward", action="store_true", help="time the forward only")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--cell_seconds", type=float, default=30.0,
                 help="stop repeating a cell after this much timed wall time (at least one run)")
  p.add_argument("--out", default=None, help="also write the markdown report to this path")
  args = p.parse_args(argv)
  args.ts = [int(t) for t in args.ts.split(",") if t]
  if args.max_t is not None:
    args.ts = [t for t in args.ts if t <= args.max_t]
  args.ops = [name for name in args.ops.split(",") if name]
  unknown = sorted(set(args.ops) - set(OPS))
  if unknown:
    p.error(f"unknown --ops {unknown}; choose from {OPS}")
  if not args.ts:
    p.error("no sequence length left (check --ts / --max_t)")
  return args


def _inputs(args: argparse.Namespace, t: int, seed: int = 0) -> dict[str, jax.Array]:
  """fla-style inputs (spec §1.4): q, k, v ~ U[0, 1), log_gate = logsigmoid(U[0, 1)) / 16."""
  gen = np.random.default_rng(seed)
  dtype = jnp.dtype(args.dtype)
  b, h, dk, dv = args.batch, args.heads, args.key_dim, args.value_dim
  u = lambda *shape: gen.random(shape, dtype=np.float32)
  return {
      "q": jnp.asarray(u(b, t, h, dk), dtype),
      "k": jnp.asarray(u(b, t, h, dk), dtype),
      "v": jnp.asarray(u(b, t, h, dv), dtype),
      "v_softmax": jnp.asarray(u(b, t, h, dk), dtype),
      "log_gate": jnp.asarray(-np.logaddexp(0.0, -u(b, t, h, dk)) / 16.0, dtype),
      "do": jnp.asarray(gen.standard_normal((b, t, h, dv)).astype(np.float32), dtype),
      "do_softmax": jnp.asarray(gen.standard_normal((b, t, h, dk)).astype(np.float32), dtype),
  }


def _op_functions(name: str, args: argparse.Namespace,
                  x: dict[str, jax.Array]) -> tuple[Callable[..., Any], Callable[..., Any], tuple]:
  """(forward, forward+backward, arguments) of one op; both functions are pure in the arguments."""
  if name == "softmax":
    def fwd(q, k, v, do):
      del do
      return attention(q, k, v, causal=True, impl="xla")
    operands = (x["q"], x["k"], x["v_softmax"], x["do_softmax"])
    num_diff = 3
  else:
    impl = "xla" if name == "chunked" else "reference"

    def fwd(q, k, v, log_gate, do):
      del do
      return gla(q, k, v, log_gate, chunk_size=args.chunk_size, impl=impl)
    operands = (x["q"], x["k"], x["v"], x["log_gate"], x["do"])
    num_diff = 4

  def fwd_bwd(*operands):
    def loss(*diff):
      out = fwd(*diff, operands[-1])
      o = out[0] if isinstance(out, tuple) else out
      return jnp.sum(o.astype(jnp.float32) * operands[-1].astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=tuple(range(num_diff)))(*operands[:num_diff])

  return fwd, fwd_bwd, operands


def _measure(fn: Callable[..., Any], operands: tuple, args: argparse.Namespace) -> dict[str, Any]:
  return timing.measure(fn, operands, warmup=args.warmup, repeats=args.repeats,
                        cell_seconds=args.cell_seconds)


_fmt = timing.fmt


def run(args: argparse.Namespace) -> str:
  """Runs the sweep and returns the markdown report (also printed row by row to stderr)."""
  device = jax.devices()[0]
  header = [
      "# GLA scaling: chunked vs recurrent vs softmax attention",
      "",
      f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
      f"- jax {jax.__version__}, backend `{jax.default_backend()}`, device `{device.device_kind}`, "
      f"{os.cpu_count()} CPUs visible, host `{platform.machine()}`",
      f"- B={args.batch}, H={args.heads}, K={args.key_dim}, V={args.value_dim} (softmax: head dim "
      f"{args.key_dim}), dtype {args.dtype}, GLA chunk_size {args.chunk_size}",
      f"- median of up to {args.repeats} runs after {args.warmup} warm-up run(s), at most "
      f"~{args.cell_seconds:g} s of timed runs per cell (runs column); memory = XLA buffer "
      "estimate (arguments + outputs + temporaries) from `compile().memory_analysis()`",
      "",
  ]
  columns = ["T", "op", "fwd ms", "fwd+bwd ms", "runs", "fwd MiB", "fwd+bwd MiB",
             "compile s (fwd / fwd+bwd)"]
  if args.no_backward:
    columns = ["T", "op", "fwd ms", "runs", "fwd MiB", "compile s"]
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for t in args.ts:
    x = _inputs(args, t)
    for name in args.ops:
      fwd, fwd_bwd, operands = _op_functions(name, args, x)
      f = _measure(fwd, operands, args)
      if args.no_backward:
        row = [str(t), name, _fmt(f["ms"], 2), str(f["runs"]), _fmt(f["mib"]),
               _fmt(f["compile_s"])]
      else:
        g = _measure(fwd_bwd, operands, args)
        row = [str(t), name, _fmt(f["ms"], 2), _fmt(g["ms"], 2), f"{f['runs']}/{g['runs']}",
               _fmt(f["mib"]), _fmt(g["mib"]), f"{f['compile_s']:.1f} / {g['compile_s']:.1f}"]
      lines.append("| " + " | ".join(row) + " |")
      print(lines[-1], file=sys.stderr, flush=True)
  return "\n".join(header + lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  args = _parse_args(argv)
  timing.emit(run(args), args.out)


if __name__ == "__main__":
  host_allocator.reexec_if_needed()
  main()
