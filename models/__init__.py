"""Model registry: `get_model(config.model)` builds the Flax module named by `model.name`.

Importing a model file registers its mixers/models; a new variant adds one import line here.
"""

from typing import Any

import ml_collections

from models import attention  # noqa: F401  (registers the "softmax", "cog" and "ssa" mixers)
from models import gla  # noqa: F401  (registers the "gla" mixer)
from models import landmark  # noqa: F401  (registers the "landmark" mixer)
from models import selective  # noqa: F401  (registers the "selective" mixer)
from models import transformer  # noqa: F401  (registers the "transformer" model)
from models.registry import get_mixer, get_model_class, mixer_names


def freeze(model_config: Any) -> ml_collections.FrozenConfigDict:
  """Hashable model config (lists become tuples) so modules can be jit-static and nn.scan-friendly."""
  if isinstance(model_config, ml_collections.FrozenConfigDict):
    return model_config
  return ml_collections.FrozenConfigDict(model_config)


def get_model(model_config: Any, *, decode: bool = False):
  """The Flax module for `model_config` (the `config.model` sub-config, not the whole run config)."""
  model_config = freeze(model_config)
  return get_model_class(model_config.name)(config=model_config, decode=decode)


__all__ = ["get_model", "get_mixer", "mixer_names", "freeze"]
