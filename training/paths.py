"""Run-directory paths on any filesystem orbax supports, through etils.epath (orbax's own path type).

    paths.run_path("runs/x")            -> epath.Path("/abs/runs/x")     (local: made absolute)
    paths.run_path("gs://bucket/run")   -> epath.Path("gs://bucket/run") (kept; GCS through fsspec/gcsfs)

Everything training/ and evaluate.py read or write under a workdir (config.json, metrics.jsonl, eval
results, checkpoint discovery, the profile directory) goes through here, so `--workdir=gs://...` works as
a local path does. Whole-file writes go to a temporary sibling and are renamed into place, so a crash
never leaves half a file where an earlier one was.
"""

import json
import os
from typing import Any

from etils import epath

from training.errors import ConfigError

URL_PREFIXES = ("gs://", "s3://", "az://", "hf://")  # epath's remote schemes


def is_local(path: Any) -> bool:
  return not os.fspath(path).startswith(URL_PREFIXES)


def run_path(workdir: Any) -> epath.Path:
  """The workdir as an epath.Path: local paths absolute (with ~ expanded), URLs as given."""
  text = os.fspath(workdir)
  if is_local(text):
    text = os.path.abspath(os.path.expanduser(text))
  return epath.Path(text)


def make_dir(path: epath.Path) -> None:
  """Creates `path` (and its parents), or says in one sentence why it cannot be written."""
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"cannot create the run directory {path}: {e.strerror or e}.") from None


def write_text(path: epath.Path, text: str) -> None:
  """Writes the whole file through a temporary sibling and a rename (atomic on a local filesystem)."""
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
  try:
    tmp.write_text(text)
    tmp.replace(path)
  except OSError as e:
    raise ConfigError(f"cannot write {path}: {e.strerror or e}.") from None


def write_json(path: epath.Path, value: Any) -> None:
  write_text(path, json.dumps(value, indent=2, default=list))


def read_json(path: epath.Path, what: str = "") -> Any | None:
  """The JSON at `path`, None if there is no such file; invalid JSON is one ConfigError sentence."""
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON ({e}){what}.") from None
