"""Command-line parsing shared by train.py and evaluate.py (ml_collections config files + absl flags).

    --config=configs/<name>.py        a Python file whose get_config() returns a ConfigDict
    --config.a.b=value                override one key; an unknown key is an error, not a new key

Every failure becomes a `ConfigError` with one sentence naming the flag, key or file.
"""

import ast
import importlib.util
import os
import sys
from typing import Callable, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

from training.errors import ConfigError, RunError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "base.py")


def _config_path(argv: Sequence[str]) -> str:
  path = DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return path.split(":", 1)[0]  # config_flags allows "file.py:arg"


def _check_override_keys(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(walked) or "the top level"
        options = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"unknown config key '{key}' (no '{part}' under {where}; valid there: "
                          f"{', '.join(options)}).")
      node = node[part]
      walked.append(part)


def _load_config_file(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("_config_under_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def parse(argv: Sequence[str], define_extra: Callable[[flags.FlagValues], None] | None = None
          ) -> tuple[ml_collections.ConfigDict, flags.FlagValues]:
  """Parses argv (argv[0] is the program) into (config, flag values) on a private FlagValues."""
  argv = list(argv)
  path = _config_path(argv[1:])
  if not os.path.isfile(path):
    raise ConfigError(f"config file '{path}' does not exist.")
  try:
    base = _load_config_file(path)
  except Exception as e:  # a broken config file
    raise ConfigError(f"config file '{path}' failed to load: {type(e).__name__}: {e}.") from None
  _check_override_keys(base, argv[1:])
  flag_values = flags.FlagValues()
  try:
    # sys_argv: config_flags reads the overrides from it lazily, at parse time (sys.argv by default,
    # which is not `argv` when train.main/evaluate.main are called in-process).
    config_flags.DEFINE_config_file("config", path, "Experiment config file.", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
  except Exception as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"invalid config override: {message}") from None
  if define_extra:
    define_extra(flag_values)
  try:
    rest = flag_values(argv)
  except (flags.Error, ValueError, TypeError, KeyError, AttributeError, OSError) as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"invalid command line: {message}") from None
  if len(rest) > 1:
    raise ConfigError(f"unexpected positional arguments: {' '.join(rest[1:])}.")
  return flag_values["config"].value, flag_values


def _convert(text: str, current: object, key: str) -> object:
  """Parses an override to the type of the value it replaces."""
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)) and not text.lstrip().startswith(("(", "[")):
    return tuple(p for p in text.split(",") if p)  # --data.paths=a.txt,b.txt
  try:
    value = ast.literal_eval(text) if not isinstance(current, bool) else {"true": True, "false": False}[
        text.strip().lower()]
  except (ValueError, SyntaxError, KeyError):
    raise ConfigError(f"cannot parse --{key}={text} as {type(current).__name__}.") from None
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if current is not None and not isinstance(value, type(current)) and not (
      isinstance(current, (tuple, list)) and isinstance(value, (tuple, list))):
    raise ConfigError(f"--{key}={text} must be a {type(current).__name__}.")
  return tuple(value) if isinstance(value, list) else value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies ["--data.source=files", "--config.eval.split=test", ...] to a loaded config, in place."""
  for arg in overrides:
    if "=" not in arg:
      raise ConfigError(f"override {arg} needs a value (--key=value).")
    key, text = arg.lstrip("-").split("=", 1)
    key = key[len("config."):] if key.startswith("config.") else key
    _check_override_keys(config, [f"--config.{key}"])
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    value = _convert(text, node[leaf], key)
    with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
      node[leaf] = value


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def run_main(body: Callable[[], None]) -> int:
  """Runs body; user errors print one line on stderr and give exit code 1 (no traceback)."""
  from data.corpora import DataError  # local: keeps `--help` fast
  try:
    body()
  except (RunError, DataError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  return 0
