"""Train state, optimizer, loss, and the pure train / eval step functions (jitted by the loop)."""

import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any


def learning_rate_schedule(opt_config: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup to optimizer.lr, then cosine decay to lr * min_lr_ratio at total_steps."""
  warmup = min(opt_config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_config.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=opt_config.lr * opt_config.min_lr_ratio)


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: not on norms (1-D) and not on the byte embedding.

  Params of a scanned layer stack (under the "layers" key, models/transformer.py) carry a leading layer
  axis that does not count: a stacked norm scale [L, D] is still a vector per layer.
  """
  def keep(path, leaf):
    names = [getattr(p, "key", "") for p in path]
    ndim = leaf.ndim - (1 if "layers" in names else 0)
    return ndim >= 2 and "embedding" not in names
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt_config: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled decay, masked) behind global-norm clipping."""
  schedule = learning_rate_schedule(opt_config, total_steps)
  parts = []
  if opt_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip))
  parts.append(optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                           weight_decay=opt_config.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), schedule


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                     seq_len: int) -> TrainState:
  """Fresh state with logically-partitioned (boxed) params; unbox with `nn.unbox` after sharding."""
  dummy = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init(rng, dummy)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(nn.unbox(params)))


def strip_boxes(tree: Any) -> Any:
  """Removes logical-partitioning boxes without applying sharding constraints (safe on abstract trees)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def state_partition_specs(abstract_state: TrainState, tx: optax.GradientTransformation) -> TrainState:
  """PartitionSpecs (logical names) for every leaf of a boxed abstract TrainState.

  Optimizer moments inherit their parameter's names via optax.tree_map_params; counters replicate.
  """
  param_specs = nn.get_partition_spec(abstract_state.params)
  opt_specs = optax.tree_map_params(
      tx, lambda _, spec: spec, abstract_state.opt_state, param_specs,
      transform_non_params=lambda _: jax.sharding.PartitionSpec(),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return TrainState(step=jax.sharding.PartitionSpec(), params=param_specs, opt_state=opt_specs)


def weighted_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(target) * weight, sum of weights), in float32. logits [B,T,V], targets/weights [B,T]."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


def _apply(model: nn.Module, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  return model.apply({"params": params}, batch["inputs"], batch.get("segment_ids"), batch.get("positions"))


# Flax collection where modules sow auxiliary loss terms (e.g. `self.sow("losses", "aux_loss", value)`);
# the train step adds the sum of everything sown there to the objective.
LOSSES_COLLECTION = "losses"


def _model_args(batch: dict[str, jax.Array]) -> tuple[Any, Any, Any]:
  return batch["inputs"], batch.get("segment_ids"), batch.get("positions")


def sows_losses(model: nn.Module, params: Any, batch: dict[str, jax.Array]) -> bool:
  """Whether `model` sows anything into the "losses" collection (decided abstractly, at trace time)."""
  def sown(params, *args):
    return model.apply({"params": params}, *args, mutable=[LOSSES_COLLECTION])[1]
  return bool(jax.tree.leaves(jax.eval_shape(sown, params, *_model_args(batch))))


def _apply_with_aux_loss(model: nn.Module, params: Any, batch: dict[str, jax.Array]
                         ) -> tuple[jax.Array, jax.Array]:
  """(logits, sum of every value sown into "losses" as a float32 scalar)."""
  logits, sown = model.apply({"params": params}, *_model_args(batch), mutable=[LOSSES_COLLECTION])
  aux = sum((jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(sown)), jnp.zeros((), jnp.float32))
  return logits, aux


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule, grad_accum: int = 1
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch [B, T]; with grad_accum > 1 the batch is split into that many
  micro-batches whose gradients are summed (the loss is the same weighted mean as without accumulation).

  Auxiliary losses: when the model sows values into the "losses" collection (e.g. selective attention's
  memory loss), their sum (per micro-batch) is added to the mean cross-entropy; "loss" is then the whole
  objective and metrics also carry "aux_loss". Models that sow nothing run exactly as before.
  """
  sows = sows_losses(model, state.params, batch)

  def sum_loss(params, micro_batch):
    """(weighted objective sum, (weight sum, weighted aux-loss sum))."""
    if not sows:
      logits = _apply(model, params, micro_batch)
      loss_sum, weight_sum = weighted_nll(logits, micro_batch["targets"], micro_batch["weights"])
      return loss_sum, (weight_sum, jnp.zeros((), jnp.float32))
    logits, aux = _apply_with_aux_loss(model, params, micro_batch)
    loss_sum, weight_sum = weighted_nll(logits, micro_batch["targets"], micro_batch["weights"])
    # Weighted by the micro-batch's target count, so after the division below the aux term is a mean.
    aux_sum = aux * jax.lax.stop_gradient(weight_sum)
    return loss_sum + aux_sum, (weight_sum, aux_sum)

  grad_fn = jax.value_and_grad(sum_loss, has_aux=True)
  if grad_accum == 1:
    (loss_sum, (weight_sum, aux_sum)), grad_sum = grad_fn(state.params, batch)
  else:
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def accumulate(carry, micro_batch):
      (loss_i, (weight_i, aux_i)), grad_i = grad_fn(state.params, micro_batch)
      loss_acc, weight_acc, aux_acc, grad_acc = carry
      return (loss_acc + loss_i, weight_acc + weight_i, aux_acc + aux_i,
              jax.tree.map(jnp.add, grad_acc, grad_i)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    scalar = jnp.zeros((), jnp.float32)
    (loss_sum, weight_sum, aux_sum, grad_sum), _ = jax.lax.scan(
        accumulate, (scalar, scalar, scalar, zeros), micro)

  denom = jnp.maximum(weight_sum, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grad_sum)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss_sum / denom, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
             "tokens": weight_sum}
  if sows:
    metrics["aux_loss"] = aux_sum / denom
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module) -> dict[str, jax.Array]:
  """Summed natural-log loss and count over the batch's weighted targets (real bytes for bpb)."""
  nll_sum, count = weighted_nll(_apply(model, params, batch), batch["targets"], batch["weights"])
  return {"nll_sum": nll_sum, "count": count}


def bits_per_byte(nll_sum: float, count: float) -> float:
  """bpb = sum(-ln p) / (N_bytes * ln 2)  (token_free.md section 0)."""
  return nll_sum / max(count, 1.0) / math.log(2.0)


def make_step_fns(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                  grad_accum: int) -> tuple[Callable, Callable]:
  train = lambda s, b: train_step(s, b, model=model, tx=tx, schedule=schedule, grad_accum=grad_accum)
  evaluate = lambda p, b: eval_step(p, b, model=model)
  return train, evaluate
