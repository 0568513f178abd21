"""training/cli.py in-process: --config files and typed --config.a.b overrides (train.py), overrides of a
run's saved config (evaluate.py, `apply_overrides`), and every bad input as one ConfigError line."""

import importlib.util
import json
import os

from absl import flags
import ml_collections
import pytest

from configs import base
from training import cli
from training.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _workdir_flag(flag_values):
  flags.DEFINE_string("workdir", "runs/default", "", flag_values=flag_values)


def _parse(*args):
  return cli.parse(["train.py", *args], _workdir_flag)


def _error(fn, *args) -> str:
  with pytest.raises(ConfigError) as info:
    fn(*args)
  message = str(info.value)
  assert "\n" not in message, message
  return message


def _parse_error(*args) -> str:
  return _error(_parse, *args)


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


# --- train.py: cli.parse ---------------------------------------------------------------------------------


def test_default_config_is_base_and_extra_flags_parse():
  config, flag_values = _parse("--workdir=runs/x")
  assert config.to_dict() == base.get_config().to_dict()
  assert flag_values["workdir"].value == "runs/x"


@pytest.mark.parametrize("spelling", [["--config=configs/tiny.py"], ["--config", "configs/tiny.py"],
                                      ["-config=configs/tiny.py"]])
def test_config_file_in_any_absl_spelling(spelling):
  config, _ = _parse(*spelling)
  assert config.to_dict() == cli._load_config_file("configs/tiny.py").to_dict()


def test_typed_overrides():
  config, _ = _parse("--config=configs/tiny.py", "--config.train.steps=7", "--config.optimizer.lr=1",
                     "--config.model.qk_norm=true", "--config.data.shuffle=False", "--config.eval.split=test")
  assert config.train.steps == 7
  assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
  assert config.model.qk_norm is True and config.data.shuffle is False
  assert config.eval.split == "test"


def test_bare_bool_override_sets_true():
  config, _ = _parse("--config.model.qk_norm")
  assert config.model.qk_norm is True


@pytest.mark.parametrize("text, expected", [
    ("a.txt,b.txt", ("a.txt", "b.txt")),
    ("/abs/a.txt,/abs/b.txt", ("/abs/a.txt", "/abs/b.txt")),
    ("a.txt", ("a.txt",)),
    ("docs/", ("docs/",)),
    ("'a.txt', 'b.txt'", ("a.txt", "b.txt")),
    ("('a.txt',)", ("a.txt",)),
    ("", ()),
])
def test_tuple_of_paths(text, expected):
  config, _ = _parse(f"--config.data.paths={text}")
  assert config.data.paths == expected


@pytest.mark.parametrize("text, expected", [("1,2,4", (1, 2, 4)), ("(1, 2, 4)", (1, 2, 4)), ("8", (8,)),
                                            ("[3,5]", (3, 5))])
def test_tuple_of_ints(text, expected):
  config, _ = _parse(f"--config.passkey.lengths={text}")
  assert config.passkey.lengths == expected


def test_repeated_tuple_flag_appends():
  config, _ = _parse("--config.data.paths=a.txt", "--config.data.paths=b.txt")
  assert config.data.paths == ("a.txt", "b.txt")


def test_override_applies_to_the_chosen_file_wherever_it_stands():
  config, _ = _parse("--config.train.steps=3", "--config=configs/tiny.py")
  assert config.train.steps == 3 and config.to_dict() != base.get_config().to_dict()


def test_lazy_references_follow_overrides():
  config, _ = _parse("--config=configs/cog.py", "--config.model.num_layers=6")
  assert list(config.model.mixer) == ["softmax"] + ["cog"] * 4 + ["softmax"]


def test_config_is_locked():
  config, _ = _parse()
  with pytest.raises(AttributeError):
    config.train.new_key = 1


def test_unknown_key_names_it_and_the_valid_keys_there():
  message = _parse_error("--config.train.stepz=3")
  valid = ", ".join(sorted(base.get_config().train.keys()))
  assert message == f"unknown config key 'train.stepz' (no 'stepz' under train; valid there: {valid})."


def test_unknown_section_lists_the_top_level():
  message = _parse_error("--config.train.steps=3", "--config.nosuch.x=1")
  valid = ", ".join(sorted(base.get_config().keys()))
  assert message == f"unknown config key 'nosuch.x' (no 'nosuch' under the top level; valid there: {valid})."


def test_key_below_a_value():
  assert _parse_error("--config.train.steps.x=1") == (
      "unknown config key 'train.steps.x' (train.steps is a int, not a section).")


@pytest.mark.parametrize("arg, expected", [
    ("--config.train.steps=abc", "invalid command line: flag --config.train.steps=abc: invalid literal for int"),
    ("--config.optimizer.lr=fast", "invalid command line: flag --config.optimizer.lr=fast: could not convert"),
    ("--config.model.qk_norm=yes", "invalid command line: flag --config.model.qk_norm=yes: ('Non-boolean"),
    ("--config.train=3", "invalid command line: flag --config.train=3: Failed to parse '3' as a ConfigDict"),
    ("--wrokdir=x", "invalid command line: Unknown command line flag 'wrokdir'"),
    ("--config", "invalid command line: Missing value for flag --config"),
])
def test_bad_value_or_flag_is_one_line(arg, expected):
  assert _parse_error(arg).startswith(expected)


def test_positional_argument():
  assert _parse_error("extra") == "unexpected positional arguments: extra."


def test_missing_config_file():
  assert _parse_error("--config=configs/nosuch.py") == "config file 'configs/nosuch.py' does not exist."
  assert _parse_error("--config=configs/nosuch.py", "--config.train.steps=3") == (
      "config file 'configs/nosuch.py' does not exist.")


@pytest.mark.parametrize("body, expected", [
    ("def get_config():\n  return 1 / 0\n", "ZeroDivisionError: division by zero."),
    ("def get_config(:\n", "SyntaxError: invalid syntax"),
    ("def get_config():\n  raise ValueError('bad thing')\n", "ValueError: bad thing."),  # config_flags wraps it
    ("import no_such_module\n", "ModuleNotFoundError: No module named 'no_such_module'."),
])
def test_broken_config_file(tmp_path, body, expected):
  path = _write(tmp_path, "broken.py", body)
  assert _parse_error(f"--config={path}").startswith(f"config file '{path}' failed to load: {expected}")


def test_config_file_arg_is_passed_to_get_config(tmp_path):
  path = _write(tmp_path, "param.py", "from configs import base\n\ndef get_config(steps):\n"
                "  config = base.get_config()\n  config.train.steps = int(steps)\n  return config\n")
  config, _ = _parse(f"--config={path}:12")
  assert config.train.steps == 12
  assert _parse_error(f"--config={path}").startswith(f"config file '{path}' failed to load: TypeError: ")


def test_get_config_must_return_a_config_dict(tmp_path):
  path = _write(tmp_path, "none.py", "def get_config():\n  return None\n")
  assert _parse_error(f"--config={path}") == (
      f"config file '{path}' failed to load: TypeError: get_config() returned NoneType, not a ConfigDict.")


def test_directory_as_config_file(tmp_path):
  assert _parse_error(f"--config={tmp_path}").startswith(
      f"config file '{tmp_path}' failed to load: IsADirectoryError: ")


# --- evaluate.py: cli.apply_overrides on a run's saved config -------------------------------------------


def _saved(config_module="base"):
  """A config as evaluate.py loads it: config.json round-trips tuples as lists."""
  path = os.path.join(REPO_ROOT, "configs", f"{config_module}.py")
  spec = importlib.util.spec_from_file_location("_cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return ml_collections.ConfigDict(json.loads(json.dumps(module.get_config().to_dict())))


def test_saved_config_has_list_fields():
  assert isinstance(_saved().passkey.lengths, list) and isinstance(_saved().data.paths, list)


def test_overrides_of_a_saved_config():
  config = _saved()
  cli.apply_overrides(config, ["--data.source=files", "--data.paths=a.txt,b.txt", "--config.eval.split=test",
                               "--passkey.lengths=1,2,4", "--optimizer.lr=1", "--mqar.num_pairs=8",
                               "--train.steps=9"])
  assert config.data.source == "files" and list(config.data.paths) == ["a.txt", "b.txt"]
  assert config.eval.split == "test" and list(config.passkey.lengths) == [1, 2, 4]
  assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
  assert list(config.mqar.num_pairs) == [8] and config.train.steps == 9


@pytest.mark.parametrize("text, expected", [("a.txt", ["a.txt"]), ("docs/", ["docs/"]),
                                            ("('x.txt', 'y.txt')", ["x.txt", "y.txt"]), ("", [])])
def test_list_field_accepts_one_path_or_tuple_syntax(text, expected):
  config = _saved()
  cli.apply_overrides(config, [f"--data.paths={text}"])
  assert list(config.data.paths) == expected


@pytest.mark.parametrize("text, expected", [("True", True), ("true", True), ("false", False), ("False", False)])
def test_bool_override(text, expected):
  config = _saved("landmark")
  cli.apply_overrides(config, [f"--model.landmark.stingy={text}"])
  assert config.model.landmark.stingy is expected


def test_overrides_leave_the_config_unlocked_and_work_on_an_empty_list():
  config = _saved()
  cli.apply_overrides(config, [])
  cli.apply_overrides(config, ["--eval.split=test"])
  assert not config.is_locked
  config.extra = 1  # the caller may still add keys


@pytest.mark.parametrize("override, expected", [
    ("--optimizer.lr=x", "invalid command line: flag --config.optimizer.lr=x: could not convert string"),
    ("--train.steps=1.5", "invalid command line: flag --config.train.steps=1.5: invalid literal for int()"),
    ("--model.qk_norm=maybe", "invalid command line: flag --config.model.qk_norm=maybe: ('Non-boolean"),
    ("--eval.split", "override --eval.split needs a value (--key=value)."),
])
def test_bad_override_is_one_line(override, expected):
  assert _error(cli.apply_overrides, _saved(), [override]).startswith(expected)


def test_unknown_override_key():
  valid = ", ".join(sorted(base.get_config().eval.keys()))
  assert _error(cli.apply_overrides, _saved(), ["--eval.splitt=test"]) == (
      f"unknown config key 'eval.splitt' (no 'splitt' under eval; valid there: {valid}).")
  assert _error(cli.apply_overrides, _saved(), ["--config.nosuch.x=1"]).startswith(
      "unknown config key 'nosuch.x' (no 'nosuch' under the top level; valid there: checkpoint, copy, data, ")


def test_evaluate_routes_dotted_flags_to_overrides():
  spec = importlib.util.spec_from_file_location("_evaluate_script", os.path.join(REPO_ROOT, "evaluate.py"))
  evaluate = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(evaluate)
  ours, overrides = evaluate._split_argv(["evaluate.py", "--workdir=runs/x", "--text_file=notes.txt",
                                          "--data.paths=a.txt,b.txt", "--config.eval.split=test",
                                          "--optimizer.lr=1", "--tasks=bpb"])
  assert ours == ["evaluate.py", "--workdir=runs/x", "--text_file=notes.txt", "--tasks=bpb"]
  assert overrides == ["--data.paths=a.txt,b.txt", "--config.eval.split=test", "--optimizer.lr=1"]


# --- run_main ----------------------------------------------------------------------------------------------


def test_run_main_prints_one_line_and_returns_1(capsys):
  def body():
    _parse("--config.train.stepz=3")

  assert cli.run_main(body) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: unknown config key 'train.stepz'") and err.count("\n") == 1
  assert cli.run_main(lambda: None) == 0
