"""Train a model: parse flags, then `training.loop.run(config, workdir)`.

    python train.py                                            # configs/base.py into runs/default
    python train.py --config=configs/base.py --workdir=runs/x --config.train.steps=2000

Re-running the same command resumes from the latest checkpoint in --workdir with the same data order.
On SIGTERM/SIGINT the run saves a checkpoint and exits cleanly. Errors are one line on stderr, exit 1.
"""

import sys

from absl import flags

from training import cli
from training import host_allocator


def _define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", "runs/default", "Run directory (checkpoints, metrics, config).",
                      flag_values=flag_values)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv

  def body():
    config, flag_values = cli.parse(argv, _define_flags)
    from training import distributed, loop  # after parsing, so --help and flag errors are instant
    distributed.initialize()
    loop.run(config, flag_values["workdir"].value)

  return cli.run_main(body)


if __name__ == "__main__":
  host_allocator.reexec_if_needed()
  sys.exit(main())
