"""train.compilation_cache_dir: where XLA's persistent compilation cache goes, for train.py and evaluate.py."""

import os

import jax
import ml_collections
import pytest

from training import runtime


@pytest.fixture
def restored_jax_cache_settings():
  before = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
  yield
  jax.config.update("jax_compilation_cache_dir", before[0])
  jax.config.update("jax_enable_compilation_cache", before[1])


def _config(setting):
  return ml_collections.ConfigDict({"train": {"compilation_cache_dir": setting}})


def test_setting_environment_default_and_off(tmp_path, monkeypatch, restored_jax_cache_settings):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "from_env"))
  assert runtime.use_compilation_cache(_config("")) == str(tmp_path / "from_env")  # JAX's own variable wins
  assert runtime.use_compilation_cache(_config(str(tmp_path / "mine"))) == str(tmp_path / "mine")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  default = os.path.join(str(tmp_path / "home"), ".cache", "bytelab", "jax")
  assert runtime.use_compilation_cache(_config("")) == default == jax.config.jax_compilation_cache_dir
  assert runtime.use_compilation_cache(_config("off")) == "" and not jax.config.jax_enable_compilation_cache
  # a run directory written before the option existed
  assert runtime.use_compilation_cache(ml_collections.ConfigDict({"train": {}})) == default


def test_the_base_config_has_the_option():
  from configs import base
  assert base.get_config().train.compilation_cache_dir == ""
