"""Name -> class registry of token mixers, and each mixer's option defaults.

A mixer file registers itself with `@register_mixer("name", defaults=DEFAULTS)`; `models/__init__.py`
imports every model file once so the registrations happen. Adding a variant is: one op package, one model
file with a registered mixer, one config, one test file. (Model families: models/family.py.)

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

Options: a mixer's options live under `config.model.<mixer name>`; their defaults are the `defaults` dict
given at registration, the one place they are written. Config files take them with `mixer_config(name)`,
so every key is there to override from the command line; a model config without the section gets the
defaults. A default of None is written as `ml_collections.FieldReference(None, field_type=float)` (or
another type) so that a command-line override knows the type to parse.

Every registered mixer runs the shared suite tests/models/test_mixers.py (causality, segment isolation,
decode == forward, training, checkpointing); small test-time options live in that suite's table.
"""

from typing import Any, Callable

import ml_collections

_MIXERS: dict[str, type] = {}
_MIXER_DEFAULTS: dict[str, dict[str, Any]] = {}


def register_mixer(name: str, defaults: dict[str, Any] | None = None) -> Callable[[type], type]:
  def wrap(cls: type) -> type:
    if name in _MIXERS:
      raise ValueError(f"mixer {name!r} is registered twice.")
    _MIXERS[name] = cls
    if defaults is not None:
      _MIXER_DEFAULTS[name] = defaults
    return cls
  return wrap


def mixer_config(name: str) -> ml_collections.ConfigDict:
  """The registered defaults of mixer `name` as a config section (`config.model.<name>`)."""
  get_mixer(name)
  if name not in _MIXER_DEFAULTS:
    raise ValueError(f"mixer {name!r} has no options.")
  # Fresh typed references: the section must not share (and so mutate) the defaults' own.
  return ml_collections.ConfigDict({
      k: ml_collections.FieldReference(v.get(), field_type=v.get_type())
      if isinstance(v, ml_collections.FieldReference) else v
      for k, v in _MIXER_DEFAULTS[name].items()})


def plain_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
  """`defaults` with typed FieldReferences replaced by their values (None)."""
  return {k: v.get() if isinstance(v, ml_collections.FieldReference) else v for k, v in defaults.items()}


def get_mixer(name: str) -> type:
  if name not in _MIXERS:
    raise ValueError(f"unknown model.mixer {name!r}; registered mixers: {', '.join(sorted(_MIXERS))}.")
  return _MIXERS[name]


def mixer_names() -> list[str]:
  return sorted(_MIXERS)


def mixer_options(config: Any, section: str, defaults: dict[str, Any]) -> dict[str, Any]:
  """`defaults` updated by `config.<section>` (the model config's optional sub-config of a mixer).

  Raises ValueError naming any unknown key, so a typo in `--config.model.<section>.*` cannot be ignored.
  """
  options = plain_defaults(defaults)
  if section in config and config[section] is not None:
    given = dict(config[section].items())
    unknown = sorted(set(given) - set(defaults))
    if unknown:
      raise ValueError(f"unknown model.{section} option(s) {unknown}; valid: {sorted(defaults)}.")
    options.update(given)
  return options
