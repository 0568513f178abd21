"""Command-line parsing shared by train.py and evaluate.py (ml_collections config files + absl flags).

    --config=configs/<name>.py        a Python file whose get_config() returns a ConfigDict
    --config.a.b=value                override one key; an unknown key is an error, not a new key
    --config.data.paths=a.txt,b.txt   a tuple (or list) key takes comma-separated items, or `(1, 2)` syntax

config_flags loads the file (DEFINE_config_file) and parses the overrides (DEFINE_config_dict), for train.py
and for evaluate.py's overrides of a run's saved config alike. Every failure becomes a `ConfigError` with
one sentence naming the flag, key or file.
"""

import ast
import os
import sys
from typing import Callable, Sequence

from absl import flags
from etils import epath
import ml_collections
from ml_collections import config_flags
from ml_collections.config_flags import tuple_parser

from training.errors import ConfigError, RunError

REPO_ROOT = os.fspath(epath.Path(__file__).resolve().parent.parent)
DEFAULT_CONFIG = os.fspath(epath.Path(REPO_ROOT) / "configs" / "base.py")


def _is_literal(text: str) -> bool:
  try:
    ast.literal_eval(text)
    return True
  except (ValueError, SyntaxError):
    return False


class _CommaTupleParser(tuple_parser.TupleParser):
  """config_flags' tuple parser, also for list fields (config.json gives lists), plus `a.txt,b.txt`."""

  def parse(self, argument):
    if isinstance(argument, list):
      argument = tuple(argument)
    # TupleParser reads `a.txt,b.txt` as the one string 'a.txt,b.txt' and `/a,/b` as an error: quote each
    # comma-separated part that is not a Python literal (so `1,2,4` stays ints; `a.txt` is ('a.txt',)).
    if isinstance(argument, str) and not argument.lstrip().startswith(("(", "[")):
      parts = [p.strip() for p in argument.split(",") if p.strip()]
      argument = "(" + "".join(f"{p if _is_literal(p) else repr(p)}," for p in parts) + ")"
    return super().parse(argument)


# config_flags has no parser for list fields (UnsupportedOperationError); the tuple one fits both.
config_flags.register_flag_parser_for_type(tuple, _CommaTupleParser())
config_flags.register_flag_parser_for_type(list, _CommaTupleParser())


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _root_cause(e: BaseException) -> BaseException:
  while e.__cause__ or e.__context__:  # config_flags re-raises a config file's errors wrapped
    e = e.__cause__ or e.__context__
  return e


def _load_config_file(path: str) -> ml_collections.ConfigDict:
  """config_flags loads `path` ("file.py" or "file.py:arg"); any failure is one line naming the file."""
  file = path.split(":", 1)[0]
  scratch = flags.FlagValues()
  try:
    # sys_argv without --config: config_flags loads the default (`path`) right here, with no overrides.
    config_flags.DEFINE_config_file("config", path, flag_values=scratch, lock_config=False,
                                    sys_argv=["load"])
    config = scratch["config"].value
    if not isinstance(config, ml_collections.ConfigDict):
      getattr(config, "keys", None)  # config_flags defers an unreadable file's IOError to first use
      raise TypeError(f"get_config() returned {type(config).__name__}, not a ConfigDict")
  except Exception as e:  # a missing or broken config file
    if not epath.Path(file).exists():
      raise ConfigError(f"config file '{file}' does not exist.") from None
    root = _root_cause(e)
    raise ConfigError(f"config file '{file}' failed to load: {type(root).__name__}: "
                      f"{_first_line(root)}.") from None
  return config


def _unknown_key_error(config: ml_collections.ConfigDict, argv: Sequence[str]) -> ConfigError | None:
  # Hand-written: config_flags' KeyError names only the missing part ("'stepz' Did you mean ..."), not
  # the full key nor the valid keys at that level, so find the first override that does not resolve.
  for arg in argv:
    name = arg.lstrip("-").split("=", 1)[0]
    if not name.startswith(("config.", "noconfig.")):
      continue
    key = name.split(".", 1)[1]
    node, walked = config, []
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict):
        return ConfigError(f"unknown config key '{key}' ({'.'.join(walked)} is a {type(node).__name__}, "
                           f"not a section).")
      if part not in node:
        where = ".".join(walked) or "the top level"
        return ConfigError(f"unknown config key '{key}' (no '{part}' under {where}; valid there: "
                           f"{', '.join(sorted(node.keys()))}).")
      node, walked = node[part], walked + [part]
  return None


def _parse_overrides(config: ml_collections.ConfigDict, argv: Sequence[str],
                     flag_values: flags.FlagValues) -> list[str]:
  """Parses argv (its `--config.a.b=v` into `config`, in place) on flag_values; returns the positionals."""
  try:
    # sys_argv: config_flags reads the overrides from it (sys.argv by default, which is not `argv` when
    # train.main/evaluate.main are called in-process). It defines one flag per override right here.
    config_flags.DEFINE_config_dict("config", config, "Experiment config.", flag_values=flag_values,
                                    lock_config=True, sys_argv=list(argv))
    return flag_values(list(argv))
  except (KeyError, AttributeError) as e:  # an override names no key of the config
    error = _unknown_key_error(config, argv)
    raise error or ConfigError(f"invalid config override: {_first_line(e)}") from None
  except (flags.Error, ValueError, TypeError) as e:  # a bad value, an unknown flag, a missing value
    raise ConfigError(f"invalid command line: {_first_line(e)}") from None


def _split_config_file(argv: Sequence[str]) -> tuple[str, list[str]]:
  """(the --config file, the rest of argv); absl reads --config in any spelling."""
  scratch = flags.FlagValues()
  flags.DEFINE_string("config", DEFAULT_CONFIG, "Experiment config file.", flag_values=scratch)
  try:
    rest = scratch(list(argv), known_only=True)
  except flags.Error as e:
    raise ConfigError(f"invalid command line: {_first_line(e)}") from None
  return scratch["config"].value, rest


def config_file(argv: Sequence[str]) -> str:
  """The config file argv names with --config (configs/base.py when none), e.g. for a report's title."""
  return _split_config_file(argv)[0]


def parse(argv: Sequence[str], define_extra: Callable[[flags.FlagValues], None] | None = None
          ) -> tuple[ml_collections.ConfigDict, flags.FlagValues]:
  """Parses argv (argv[0] is the program) into (config, flag values) on a private FlagValues."""
  path, argv = _split_config_file(argv)
  config = _load_config_file(path)
  flag_values = flags.FlagValues()
  if define_extra:
    define_extra(flag_values)
  rest = _parse_overrides(config, argv, flag_values)
  if len(rest) > 1:
    raise ConfigError(f"unexpected positional arguments: {' '.join(rest[1:])}.")
  return config, flag_values


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies ["--data.source=files", "--config.eval.split=test", ...] to a loaded config, in place."""
  argv = ["overrides"]
  for arg in overrides:
    if "=" not in arg:  # as a list item, `--key value` would take the next override as its value
      raise ConfigError(f"override {arg} needs a value (--key=value).")
    name = arg.lstrip("-")
    argv.append("--" + (name if name.startswith("config.") else f"config.{name}"))
  was_locked = config.is_locked
  _parse_overrides(config, argv, flags.FlagValues())
  if not was_locked:
    config.unlock()  # config_flags locked it; the caller still owns an unlocked config


def run_main(body: Callable[[], None]) -> int:
  """Runs body; user errors print one line on stderr and give exit code 1 (no traceback)."""
  from data.corpora import DataError  # local: keeps `--help` fast
  try:
    body()
  except (RunError, DataError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  return 0
