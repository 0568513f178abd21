"""Model families and token mixers: `get_family(config.model)` is what training/ and evaluate.py use.

Importing a model file registers its mixers and families; a new variant adds one import line here.
"""

from typing import Any

from models import attention  # noqa: F401  (registers the "softmax", "cog" and "ssa" mixers)
from models import byt5  # noqa: F401  (registers the "byt5" encoder-decoder family, MrT5 included)
from models import gla  # noqa: F401  (registers the "gla" mixer)
from models import hierarchical  # noqa: F401  (registers the "hierarchical" byte-LM family)
from models import landmark  # noqa: F401  (registers the "landmark" mixer and the "landmark_lm" family)
from models import selective  # noqa: F401  (registers the "selective" mixer)
from models import transformer  # noqa: F401  (registers the "transformer" family)
from models.family import ModelFamily, family_names, freeze, get_family
from models.registry import get_mixer, mixer_config, mixer_names


def get_model(model_config: Any, *, decode: bool = False):
  """The Flax module of `model_config`'s family (`config.model`, not the whole run config)."""
  return get_family(model_config).module(decode=decode)


__all__ = ["ModelFamily", "get_family", "get_model", "get_mixer", "mixer_config", "mixer_names",
           "family_names", "freeze"]
