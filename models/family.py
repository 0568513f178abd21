"""Model families: the one interface through which training/ and evaluate.py drive every kind of model.

A family is registered under `config.model.name` with `@register_family("name")`. The loop never branches
on the name; it only calls the methods below. A family declares:

  batch_format   which batches the data pipeline builds for it (a key of `data.pipeline.BATCH_FORMATS`,
                 e.g. "causal_lm": packed byte windows {inputs, targets, segment_ids, positions, weights}).
  eval_tasks     the evaluate.py tasks it supports (training/tasks); others are refused in one sentence.
  init           parameters (logically partitioned boxes) from an example batch.
  loss           (objective_sum, metric sums) for a batch; everything is a *sum* over the batch's weighted
                 targets, so gradient accumulation, multi-batch evaluation and micro-batching add them up and
                 the caller divides by the summed "weight". Required sums: "weight" (target count) and "nll"
                 (sum of -ln p over those targets, which gives bits per byte). Optional: "aux_loss"
                 (auxiliary terms, already included in the objective), "correct" (argmax hits, evaluation).
  generate       new ids [B, max_new] after prompts [B, P] (greedy or sampled).
  aux state      optional state that is neither a parameter nor optimizer state (MrT5's PI controller):
                 `init_aux_state()` gives it, the train step passes it to `loss(..., aux_state=)` and
                 replaces it by `update_aux_state(aux_state, metric_sums)` after the update; it lives in
                 the train state, so checkpoints and resume carry it.
  summarize      derived metrics from metric sums (e.g. a deletion rate = deleted / gated), shown in the
                 train logs and the bpb results; the sums named in `count_keys` are not reported as
                 per-target means.

How the planned families fit without touching the loop:

  Encoder-decoder (ByT5 / MrT5, models/byt5/): batch_format "span_corruption" (a new builder in
    data/pipeline.py: {inputs [B, Ti], decoder_inputs [B, To], targets [B, To], weights}); `loss`
    runs encoder then decoder and adds MrT5's deletion regulariser as "aux_loss"; `generate` encodes the
    prompt once, keeps the encoder output and each layer's cross-attention K/V in the `cache` collection
    and decodes from the start id; eval_tasks ("bpb", "generate", "encoder_ablation"), where bpb counts
    the target bytes.
  Hierarchical byte LM (models/hierarchical.py): batch_format "causal_lm", exactly the flat LM's batches;
    `module().apply(variables, ids [B, T]) -> logits [B, T, V]` with patch boundaries computed inside;
    `loss` adds the boundary predictor's loss as "aux_loss"; `generate` may re-run the forward per byte or
    use a cache of completed patches.

`tests/training/test_families.py` trains a test-double encoder-decoder family end to end through
`training.loop.run` this way.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections

_FAMILIES: dict[str, type["ModelFamily"]] = {}

# Flax collection where modules sow auxiliary loss terms (`self.sow("losses", "name", value)`); a family's
# loss adds their sum to the objective (models/transformer.py).
LOSSES_COLLECTION = "losses"


def freeze(model_config: Any) -> ml_collections.FrozenConfigDict:
  """Hashable model config (lists become tuples) so modules can be jit-static and nn.scan-friendly."""
  if isinstance(model_config, ml_collections.FrozenConfigDict):
    return model_config
  return ml_collections.FrozenConfigDict(model_config)


class ModelFamily:
  """Base class of a model family; see the module docstring. `config` is `config.model` (frozen)."""

  batch_format: str = "causal_lm"
  eval_tasks: tuple[str, ...] = ("bpb",)
  count_keys: tuple[str, ...] = ()  # metric sums that are counts for `summarize`, not per-target means

  def __init__(self, config: Any):
    self.config = freeze(config)

  def module(self, *, decode: bool = False) -> nn.Module:
    raise NotImplementedError

  def example_batch(self, batch_size: int, seq_len: int) -> dict[str, jax.Array]:
    """Zeros shaped like one batch of `batch_format` (what `init` and abstract shapes need)."""
    raise NotImplementedError

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> Any:
    """Boxed (logically partitioned) params for batches shaped like `batch`."""
    raise NotImplementedError

  def loss(self, params: Any, batch: dict[str, jax.Array], *, rng: jax.Array | None = None,
           train: bool = True, aux_state: Any = None, step: jax.Array | None = None
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(objective sum, {"weight", "nll", ...} sums) as f32 scalars; differentiable in params.

    `aux_state` is the family's aux state (training; None at evaluation), `step` the optimizer step.
    """
    raise NotImplementedError

  def init_aux_state(self) -> Any:
    """The family's aux state at step 0 (a pytree of arrays; {} = none)."""
    return {}

  def update_aux_state(self, aux_state: Any, sums: dict[str, jax.Array]) -> Any:
    """The aux state after a train step whose metric sums are `sums`."""
    del sums
    return aux_state

  def check_data(self, data_config: Any) -> None:
    """Raises ValueError (one sentence) if the model cannot train or evaluate on `config.data`."""
    del data_config

  def flops_per_byte(self, seq_len: int) -> dict[str, Any] | None:
    """Training FLOPs per byte (models/flops.py breakdown) for sequences of seq_len, or None if uncounted."""
    del seq_len
    return None

  def summarize(self, sums: dict[str, Any]) -> dict[str, Any]:
    """Derived metrics {name: value} from metric sums (train step or a whole evaluation)."""
    del sums
    return {}

  def generate(self, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new: int,
               temperature: float = 0.0, top_k: int = 0) -> jax.Array:
    """prompt [B, P] int ids -> [B, max_new] new ids."""
    raise NotImplementedError(f"model.name={self.config.name!r} does not generate.")


def register_family(name: str) -> Callable[[type[ModelFamily]], type[ModelFamily]]:
  def wrap(cls: type[ModelFamily]) -> type[ModelFamily]:
    if name in _FAMILIES:
      raise ValueError(f"model family {name!r} is registered twice.")
    _FAMILIES[name] = cls
    return cls
  return wrap


def get_family(model_config: Any) -> ModelFamily:
  """The family named by `model_config.name`, built (and so validated) for that config."""
  name = model_config.name
  if name not in _FAMILIES:
    raise ValueError(f"unknown model.name {name!r}; registered model families: "
                     f"{', '.join(sorted(_FAMILIES))}.")
  return _FAMILIES[name](model_config)


def family_names() -> list[str]:
  return sorted(_FAMILIES)
