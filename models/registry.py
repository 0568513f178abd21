"""Name -> class registries for token mixers and whole models.

A mixer file registers itself with `@register_mixer("name")`; `models/__init__.py` imports every model file
once so the registrations happen. Adding a variant is: one op package, one model file with a registered
mixer, one config, one test file.

Mixer interface (every mixer implements it, so `models/transformer.py` and the shared tests need no
per-variant code):

    mixer = MixerClass(config=model_config, layer_index=i, decode=False, name="mixer")
    y = mixer(x, segment_ids, positions)        # x [B, T, D] -> y [B, T, D]

- `config` is the (frozen) `config.model` sub-config; mixer-specific options live under
  `config.model.<mixer name>`.
- `segment_ids` [B, T] int: tokens attend only within their segment (packed documents); may be None.
- `positions` [B, T] int: positions within the segment (for RoPE etc.); may be None.
- `decode=True`: autoregressive mode. State lives in the `cache` collection and is created by calling
  the model once with a full-length dummy input (`models.transformer.init_cache`); later calls take
  T >= 1 new tokens and must reproduce the parallel forward's outputs for those tokens.

Every registered mixer runs the shared suite tests/models/test_mixers.py (causality, segment isolation,
decode == forward, training, checkpointing) without test edits. A mixer that needs small test-time options
may define a classmethod `test_config_overrides() -> dict` of config.model keys (dotted for sub-configs,
e.g. {"gla.chunk_size": 8}) that the suite applies to its tiny model.
"""

from typing import Any, Callable

_MIXERS: dict[str, type] = {}
_MODELS: dict[str, type] = {}


def register_mixer(name: str) -> Callable[[type], type]:
  def wrap(cls: type) -> type:
    if name in _MIXERS:
      raise ValueError(f"mixer {name!r} is registered twice.")
    _MIXERS[name] = cls
    return cls
  return wrap


def register_model(name: str) -> Callable[[type], type]:
  def wrap(cls: type) -> type:
    if name in _MODELS:
      raise ValueError(f"model {name!r} is registered twice.")
    _MODELS[name] = cls
    return cls
  return wrap


def get_mixer(name: str) -> type:
  if name not in _MIXERS:
    raise ValueError(f"unknown model.mixer {name!r}; registered mixers: {', '.join(sorted(_MIXERS))}.")
  return _MIXERS[name]


def get_model_class(name: str) -> type:
  if name not in _MODELS:
    raise ValueError(f"unknown model.name {name!r}; registered models: {', '.join(sorted(_MODELS))}.")
  return _MODELS[name]


def mixer_names() -> list[str]:
  return sorted(_MIXERS)


def mixer_options(config: Any, section: str, defaults: dict[str, Any]) -> dict[str, Any]:
  """`defaults` updated by `config.<section>` (the model config's optional sub-config of a mixer).

  Raises ValueError naming any unknown key, so a typo in `--config.model.<section>.*` cannot be ignored.
  """
  options = dict(defaults)
  if section in config and config[section] is not None:
    given = dict(config[section].items())
    unknown = sorted(set(given) - set(defaults))
    if unknown:
      raise ValueError(f"unknown model.{section} option(s) {unknown}; valid: {sorted(defaults)}.")
    options.update(given)
  return options
