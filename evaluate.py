"""Evaluate a checkpoint: restore params only -> run tasks -> table on stdout + eval/<task>_step<N>.json.

    python evaluate.py --workdir=runs/x                                  # bpb on the valid split, latest step
    python evaluate.py --workdir=runs/x --step=400 --tasks=bpb --split=test
    python evaluate.py --workdir=runs/x --text_file=notes.txt             # bpb of any text file, whole file
    python evaluate.py --workdir=runs/x --data.source=files --data.paths=docs/ --split=all
    python evaluate.py --workdir=runs/x --tasks=generate --prompt="def main(" --generate.temperature=0.8
    python evaluate.py --workdir=runs/x --tasks=passkey,mqar --passkey.lengths=1,2,4 --mqar.num_pairs=8

Overrides of the run's saved config use its key paths: --data.*, --eval.*, --generate.*, --passkey.*,
--mqar.*, --model.*, ... (or the same with a --config. prefix): every flag with a dot in its name.
"""

import sys

from absl import flags

from training import cli
from training import host_allocator
from training.errors import ConfigError


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Run directory written by train.py.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
  flags.DEFINE_list("tasks", ["bpb"], "Comma-separated evaluation tasks.", flag_values=fv)
  flags.DEFINE_string("split", None, "Data split: train | valid | test | all (default eval.split).",
                      flag_values=fv)
  flags.DEFINE_string("text_file", None, "Evaluate on this text file (all of it).", flag_values=fv)
  flags.DEFINE_string("prompt", None, "Prompt for --tasks=generate.", flag_values=fv)


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
  """evaluate.py's own flags vs config overrides: a dotted flag name (`--data.paths=...`) is a config key,
  whatever its section; an unknown section is then an unknown-key error listing the valid ones."""
  ours, overrides = [], []
  for arg in argv[1:]:
    is_override = arg.startswith("-") and "." in arg.lstrip("-").split("=", 1)[0]
    (overrides if is_override else ours).append(arg)
  return [argv[0], *ours], overrides


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv

  def body():
    flag_argv, overrides = _split_argv(list(argv))
    fv = flags.FlagValues()
    _define_flags(fv)
    try:
      rest = fv(flag_argv)
    except flags.Error as e:
      raise ConfigError(f"invalid command line: {e}") from None
    if len(rest) > 1:
      raise ConfigError(f"unexpected positional arguments: {' '.join(rest[1:])}.")
    if not fv["workdir"].value:
      raise ConfigError("--workdir is required (the run directory written by train.py).")
    from training import evaluation  # after parsing, so flag errors are instant
    options = {"split": fv["split"].value, "prompt": fv["prompt"].value, "text_file": fv["text_file"].value}
    results = evaluation.evaluate(fv["workdir"].value, step=fv["step"].value, tasks=fv["tasks"].value,
                                  overrides=overrides, options=options)
    for name, (result, path) in results.items():
      print(evaluation.format_result(name, result))
      print(f"wrote {path}")

  return cli.run_main(body)


if __name__ == "__main__":
  host_allocator.reexec_if_needed()
  sys.exit(main())
