"""Generation speed of the hierarchical configs: incremental decoding against recomputing the forward.

    python -m benchmarks.generation                                    # every hierarchical config + flat
    python -m benchmarks.generation --configs=dynamic_pooling,megabyte --max_new=256 --out=gen.md
    python -m benchmarks.generation --configs=toucan,dynamic_pooling

For each config (random weights at the config's own sizes; the flat byte Transformer of
benchmarks/hierarchical.py beside them) and one prompt of --prompt bytes from the bundled valid split,
in one run:
  * incremental: `family.generate`, the byte layers on KV caches and the global stack stepped once per
    completed patch (HierarchicalLM's decode step; the flat LM's KV-cache decoding);
  * recompute: `models.decoding.generate_by_recompute`, the whole parallel forward per new byte on a fixed
    buffer, which is how dynamic pooling's reference code generates (Toucan's end-of-token variant exists
    to avoid rerunning the shortened stack per character, which this path does). A Toucan row
    (end_of_token) has its incremental time only: its decoder's EOTs decide the boundaries, so no
    recompute path emits the same stream; compare it with the dynamic pooling row of the same sizes.
Both are greedy from the same prompt, so they emit the same bytes (checked: "same" column). Times are
compiled-step medians after a warm-up (benchmarks/timing.py); new bytes per second = max_new / time.
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import hierarchical as hierarchical_bench
from benchmarks import timing
from data import corpora
from models import decoding
from training import cli
from training import host_allocator
from training import runtime
from training import train_step as ts


def _define_flags(fv: flags.FlagValues) -> None:
  hierarchical_bench._define_flags(fv)  # noqa: SLF001  (the same row selection and timing flags)
  flags.DEFINE_integer("prompt", 64, "prompt bytes", flag_values=fv)
  flags.DEFINE_integer("max_new", 128, "bytes to generate", flag_values=fv)


def _prompt(config, length: int) -> jax.Array:
  ids = corpora.open_split(config.data, "valid").read(0, length)
  return jnp.asarray(np.asarray(ids, np.int32)[None])


def measure(name: str, config, fv) -> list[str]:
  family = runtime.family(config)
  tx, _ = ts.make_optimizer(config.optimizer, config.train.steps)
  state = jax.jit(lambda r: nn.unbox(ts.init_train_state(family, tx, r, config.train.seq_len)))(
      jax.random.key(0, impl="rbg"))
  prompt = _prompt(config, fv["prompt"].value)
  max_new = fv["max_new"].value
  rng = jax.random.key(0)
  incremental = lambda p, x: family.generate(p, x, rng, max_new=max_new)
  recompute = lambda p, x: decoding.generate_by_recompute(family.module(), p, x, rng, max_new=max_new)
  kw = dict(warmup=fv["warmup"].value, repeats=fv["repeats"].value)
  fast = timing.measure(incremental, (state.params, prompt), **kw)
  rate = lambda m: max_new / (m["ms"] * 1e-3)
  if config.model.get("hierarchical", {}).get("end_of_token"):
    # Toucan's boundaries come from its decoder's EOTs: no recompute path generates the same stream.
    return [name, f"{rate(fast):,.0f}", "—", "—", "—", f"{fast['compile_s']:.0f} s"]
  slow = timing.measure(recompute, (state.params, prompt), **kw)
  same = bool(jnp.all(incremental(state.params, prompt) == recompute(state.params, prompt)))
  return [name, f"{rate(fast):,.0f}", f"{rate(slow):,.0f}", f"{slow['ms'] / fast['ms']:.1f}x",
          "yes" if same else "no", f"{fast['compile_s']:.0f} / {slow['compile_s']:.0f} s"]


def main(argv: list[str] | None = None) -> int:
  return cli.run_main(lambda: _run(list(sys.argv if argv is None else argv)))


def _run(argv: list[str]) -> None:
  configs, fv = hierarchical_bench.load_configs(argv, define_flags=_define_flags)
  rows = [measure(name, config, fv) for name, config in configs.items()]
  header = ["config", "incremental new B/s", "recompute new B/s", "speed-up", "same bytes", "compile"]
  lines = [f"Greedy generation of {fv['max_new'].value} bytes after a {fv['prompt'].value}-byte prompt, batch 1, "
           f"{jax.devices()[0].platform}, jax {jax.__version__}.", "",
           "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  timing.emit("\n".join(lines) + "\n", fv["out"].value)


if __name__ == "__main__":
  host_allocator.reexec_if_needed()
  sys.exit(main())
