"""Kernel benchmark: our Pallas kernels against a baseline measured in the same run, one table per op.

  attention  `ops.attention` impl="pallas": causal softmax, Cog (signed=True) and key-bias variants.
             Baseline: `jax.nn.dot_product_attention` (cuDNN on GPU when it supports the call, XLA
             elsewhere); Cog has no library equivalent, so its rows also give the ratio to our plain kernel
             (target: within 10%).
  gla        `ops.gla` impl="pallas" against our XLA chunked form (impl="xla"), K = V = head_dim.
  landmark   `ops.landmark` impl="pallas" against our blockwise XLA form, block = --landmark_block.

Per shape and implementation: forward and forward+backward median time (see benchmarks/timing.py:
compiled ahead of time, warmed up, median of repeats, each ended by block_until_ready), achieved TFLOP/s,
the roofline floor (specs/performance.md §7: max(FLOPs / peak, minimal bytes / bandwidth), for devices in
`PEAKS`), and the max relative error of the forward against the baseline, checked BEFORE timing (a wrong
kernel is reported, not timed as fast).

FLOP conventions (FlashAttention / performance.md): attention forward 4*B*H*T^2*D, halved when causal;
landmark counted as causal attention (its grouped softmax adds only elementwise work); GLA forward
(4*C*K*V + 2*C^2*(K + V)) per chunk and head; forward+backward = 3.5 x forward for all three. Minimal bytes:
read q, k, v (+ log gate for GLA) and write o once, in the input dtype.

Usage:
  python -m benchmarks.kernels                                    # on a GPU/TPU: the issue's shapes
  python -m benchmarks.kernels --out benchmarks/results/kernels_h100.md
  python -m benchmarks.kernels --smoke                            # CPU: interpret mode, tiny shapes
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
from ops.landmark import landmark_attention
from training import host_allocator

OPS = ("attention", "gla", "landmark")
DEFAULT_TS = "1024,2048,4096,8192,16384"
# device_kind substring -> (dense bf16 TFLOP/s, HBM TB/s) used for the floors. H100: performance.md §1
# measured values; H200: same compute, 4.8 TB/s spec bandwidth scaled by the H100 measured/spec ratio.
PEAKS = {"H100": (790.0, 3.0), "H200": (790.0, 4.3)}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ops", default=",".join(OPS))
  p.add_argument("--ts", default=DEFAULT_TS)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--chunk_size", type=int, default=64, help="GLA chunk")
  p.add_argument("--landmark_block", type=int, default=64, help="landmark block (63 regular + 1)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--cell_seconds", type=float, default=20.0)
  p.add_argument("--no_backward", action="store_true")
  p.add_argument("--smoke", action="store_true",
                 help="CPU smoke check: interpret mode, B=1, H=2, D=64, T=64,128, one repeat")
  p.add_argument("--out", default=None, help="also write the markdown report here")
  args = p.parse_args(argv)
  if args.smoke:
    args.batch, args.heads, args.head_dim = 1, 2, 64
    args.ts = args.ts if args.ts != DEFAULT_TS else "64,128"
    args.warmup, args.repeats, args.dtype = 0, 1, "float32"
    args.chunk_size, args.landmark_block = 16, 16
  args.ts = [int(t) for t in args.ts.split(",") if t]
  args.ops = [o for o in args.ops.split(",") if o]
  unknown = sorted(set(args.ops) - set(OPS))
  if unknown:
    p.error(f"unknown --ops {unknown}; choose from {OPS}")
  args.interpret = jax.default_backend() == "cpu"
  return args


class Case:
  """One timed function pair (forward, forward+backward) with its operands and cost model."""

  def __init__(self, label: str, fwd: Callable[..., Any], operands: tuple, num_diff: int,
               flops: float, bytes_moved: float, oracle: Callable[..., Any] | None = None):
    self.label, self.fwd, self.operands, self.num_diff = label, fwd, operands, num_diff
    self.flops, self.bytes_moved = flops, bytes_moved
    # What the forward is checked against when the speed baseline computes something else (Cog).
    self.oracle = oracle

  def fwd_bwd(self) -> Callable[..., Any]:
    fwd, n = self.fwd, self.num_diff

    def run(*operands):
      def loss(*diff):
        return jnp.sum(fwd(*diff, *operands[n:]).astype(jnp.float32))
      return jax.value_and_grad(loss, argnums=tuple(range(n)))(*operands[:n])
    return run


def _randn(gen, shape, dtype):
  return jnp.asarray(gen.standard_normal(shape).astype(np.float32), dtype)


def attention_cases(args, t: int) -> list[tuple[Case, Case]]:
  """(candidate, baseline) pairs for the plain causal, Cog and key-bias variants."""
  gen = np.random.default_rng(t)
  dtype = jnp.dtype(args.dtype)
  b, h, d = args.batch, args.heads, args.head_dim
  q, k, v = (_randn(gen, (b, t, h, d), dtype) for _ in range(3))
  bias = _randn(gen, (b, t), jnp.float32)
  flops = 2.0 * b * h * t * t * d  # causal: half of 4 B H T^2 D
  nbytes = 4.0 * b * h * t * d * dtype.itemsize
  interpret = args.interpret

  def ours(signed=False, with_bias=False, impl="pallas"):
    def fwd(q, k, v, bias):
      return attention(q, k, v, causal=True, signed=signed, key_bias=bias if with_bias else None,
                       impl=impl, interpret=interpret)
    return fwd

  def library(with_bias=False):
    def fwd(q, k, v, bias):
      full_bias = jnp.broadcast_to(bias[:, None, None, :], (b, h, t, t)).astype(q.dtype) if with_bias else None
      return jax.nn.dot_product_attention(q, k, v, bias=full_bias, is_causal=True)
    return fwd

  operands = (q, k, v, bias)
  plain = Case("pallas causal", ours(), operands, 3, flops, nbytes)
  return [
      (plain, Case("jax.nn.dot_product_attention", library(), operands, 3, flops, nbytes)),
      (Case("pallas cog (signed)", ours(signed=True), operands, 3, flops, nbytes,
            oracle=ours(signed=True, impl="xla")), plain),
      (Case("pallas key_bias", ours(with_bias=True), operands, 4, flops, nbytes),
       Case("jax.nn.dot_product_attention + bias", library(with_bias=True), operands, 3, flops, nbytes)),
  ]


def gla_cases(args, t: int) -> list[tuple[Case, Case]]:
  gen = np.random.default_rng(t)
  dtype = jnp.dtype(args.dtype)
  b, h, d, c = args.batch, args.heads, args.head_dim, args.chunk_size
  q, k, v = (_randn(gen, (b, t, h, d), dtype) for _ in range(3))
  log_gate = jnp.asarray(-np.logaddexp(0.0, -gen.random((b, t, h, d), dtype=np.float32)) / 16.0, dtype)
  chunks = -(-t // c)
  flops = b * h * chunks * (4.0 * c * d * d + 2.0 * c * c * 2 * d)
  nbytes = 5.0 * b * h * t * d * dtype.itemsize

  def make(impl):
    def fwd(q, k, v, log_gate):
      return gla(q, k, v, log_gate, chunk_size=c, impl=impl, interpret=args.interpret)[0]
    return fwd
  operands = (q, k, v, log_gate)
  return [(Case("pallas chunked", make("pallas"), operands, 4, flops, nbytes),
           Case("xla chunked", make("xla"), operands, 4, flops, nbytes))]


def landmark_cases(args, t: int) -> list[tuple[Case, Case]]:
  gen = np.random.default_rng(t)
  dtype = jnp.dtype(args.dtype)
  b, h, d = args.batch, args.heads, args.head_dim
  q, k, v = (_randn(gen, (b, t, h, d), dtype) for _ in range(3))
  flops = 2.0 * b * h * t * t * d
  nbytes = 4.0 * b * h * t * d * dtype.itemsize

  def make(impl):
    def fwd(q, k, v):
      return landmark_attention(q, k, v, block_size=args.landmark_block, impl=impl,
                                interpret=args.interpret)
    return fwd
  operands = (q, k, v)
  return [(Case("pallas grouped softmax", make("pallas"), operands, 3, flops, nbytes),
           Case("xla blockwise", make("xla"), operands, 3, flops, nbytes))]


CASE_BUILDERS = {"attention": attention_cases, "gla": gla_cases, "landmark": landmark_cases}


def _peaks() -> tuple[float, float] | None:
  kind = jax.devices()[0].device_kind
  for name, peaks in PEAKS.items():
    if name in kind:
      return peaks
  return None


def _floor_ms(flops: float, nbytes: float, peaks) -> float | None:
  if peaks is None:
    return None
  tflops, tbs = peaks
  return 1e3 * max(flops / (tflops * 1e12), nbytes / (tbs * 1e12))


def _max_rel_error(a: jax.Array, b: jax.Array) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-8))


def _time(case: Case, args) -> dict[str, Any]:
  kw = dict(warmup=args.warmup, repeats=args.repeats, cell_seconds=args.cell_seconds)
  result = {"fwd": timing.measure(case.fwd, case.operands, **kw)}
  if not args.no_backward:
    result["fwd_bwd"] = timing.measure(case.fwd_bwd(), case.operands, **kw)
  return result


def _row(t: int, case: Case, timed: dict, peaks, error: str, ratio_to: dict | None) -> str:
  fwd_ms = timed["fwd"]["ms"]
  cells = [str(t), case.label, timing.fmt(fwd_ms, 3), timing.fmt(case.flops / fwd_ms / 1e9, 1),
           timing.fmt(_floor_ms(case.flops, case.bytes_moved, peaks), 3)]
  if "fwd_bwd" in timed:
    fb_ms = timed["fwd_bwd"]["ms"]
    cells += [timing.fmt(fb_ms, 3), timing.fmt(3.5 * case.flops / fb_ms / 1e9, 1),
              timing.fmt(_floor_ms(3.5 * case.flops, 2 * case.bytes_moved, peaks), 3)]
  speed = "" if ratio_to is None else f"{ratio_to['fwd']['ms'] / fwd_ms:.2f}x"
  if ratio_to is not None and "fwd_bwd" in timed:
    speed += f" / {ratio_to['fwd_bwd']['ms'] / timed['fwd_bwd']['ms']:.2f}x"
  return "| " + " | ".join(cells + [speed, error]) + " |"


def run(args) -> str:
  device = jax.devices()[0]
  peaks = _peaks()
  lines = [
      "# Kernel benchmark: Pallas kernels vs baselines measured in the same run", "",
      f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
      f"- jax {jax.__version__}, backend `{jax.default_backend()}`, device `{device.device_kind}`, "
      f"host `{platform.machine()}`, {os.cpu_count()} CPUs" + (", Pallas in INTERPRET mode (smoke check "
                                                               "only, times are meaningless)"
                                                               if args.interpret else ""),
      f"- B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}; GLA chunk {args.chunk_size}; "
      f"landmark block {args.landmark_block}",
      f"- median of up to {args.repeats} runs after {args.warmup} warm-up(s); floors use "
      f"{peaks or 'no peak table for this device'} (TFLOP/s, TB/s)",
      "- speedup column: baseline time / this row's time (fwd / fwd+bwd); err: max |x - ref| / max |ref| "
      "of the forward, checked before timing (ref: the baseline; for Cog, whose speed baseline is our plain "
      "kernel, our XLA signed attention)", "",
  ]
  columns = ["T", "impl", "fwd ms", "fwd TFLOP/s", "fwd floor ms"]
  if not args.no_backward:
    columns += ["fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd floor ms"]
  columns += ["speedup vs baseline", "fwd err"]
  for op in args.ops:
    lines += [f"## {op}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for t in args.ts:
      timed_cache: dict[int, dict] = {}
      for candidate, baseline in CASE_BUILDERS[op](args, t):
        try:
          want = np.asarray(jax.jit(candidate.oracle or baseline.fwd)(*candidate.operands))
          got = np.asarray(jax.jit(candidate.fwd)(*candidate.operands))
        except Exception as e:  # noqa: BLE001 - report an unavailable kernel as a row, keep going
          lines.append(f"| {t} | {candidate.label} | unavailable: {type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120]} |")
          print(lines[-1], file=sys.stderr, flush=True)
          continue
        error = _max_rel_error(got, want)
        for case in (baseline, candidate):
          if id(case) not in timed_cache:
            timed_cache[id(case)] = _time(case, args)
        lines.append(_row(t, candidate, timed_cache[id(candidate)], peaks, f"{error:.1e}",
                          timed_cache[id(baseline)]))
        lines.append(_row(t, baseline, timed_cache[id(baseline)], peaks, "", None))
        print("\n".join(lines[-2:]), file=sys.stderr, flush=True)
    lines.append("")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  args = _parse_args(argv)
  timing.emit(run(args), args.out)


if __name__ == "__main__":
  host_allocator.reexec_if_needed()
  main()
