"""Train state, optimizer, and the pure train / eval step functions of any model family (jitted by the loop)."""

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from models.family import ModelFamily
from training import runtime
from training import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  aux_state: Any = flax.struct.field(default_factory=dict)  # the family's (models/family.py)


def learning_rate_schedule(opt_config: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup to optimizer.lr, then a decay to lr * min_lr_ratio at total_steps: cosine (the default)
  or, with optimizer.schedule = "linear", linear (MrT5's continued training, spec §3.6)."""
  warmup = min(opt_config.warmup_steps, max(total_steps - 1, 0))
  end_value = opt_config.lr * opt_config.min_lr_ratio
  kind = opt_config.get("schedule", "cosine")
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_config.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=end_value)
  if kind == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt_config.lr, warmup),
         optax.linear_schedule(opt_config.lr, end_value, max(total_steps - warmup, 1))], [warmup])
  raise ValueError(f"optimizer.schedule must be 'cosine' or 'linear', got {kind!r}.")


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


def init_train_state(family: ModelFamily, tx: optax.GradientTransformation, rng: jax.Array,
                     seq_len: int) -> TrainState:
  """Fresh state with logically-partitioned (boxed) params; unbox with `nn.unbox` after sharding."""
  params = family.init(rng, family.example_batch(1, seq_len))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(nn.unbox(params)),
                    aux_state=family.init_aux_state())


def state_partition_specs(abstract_state: TrainState, tx: optax.GradientTransformation) -> TrainState:
  """PartitionSpecs (logical names) for every leaf of a boxed abstract TrainState.

  Optimizer moments inherit their parameter's names via optax.tree_map_params; counters replicate.
  """
  param_specs = nn.get_partition_spec(abstract_state.params)
  opt_specs = optax.tree_map_params(
      tx, lambda _, spec: spec, abstract_state.opt_state, param_specs,
      transform_non_params=lambda _: jax.sharding.PartitionSpec(),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  aux_specs = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), abstract_state.aux_state)
  return TrainState(step=jax.sharding.PartitionSpec(), params=param_specs, opt_state=opt_specs,
                    aux_state=aux_specs)


def state_shardings(family: ModelFamily, tx: optax.GradientTransformation, config: Any, mesh: Any
                    ) -> tuple[TrainState, TrainState]:
  """(abstract unboxed TrainState, its NamedShardings), without allocating anything."""
  boxed = jax.eval_shape(lambda r: init_train_state(family, tx, r, config.train.seq_len), jax.random.key(0))
  specs = state_partition_specs(boxed, tx)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, sharding.axis_rules(config.mesh))
  return runtime.strip_boxes(boxed), shardings


def train_step(state: TrainState, batch: dict[str, jax.Array], *, family: ModelFamily,
               tx: optax.GradientTransformation, schedule: optax.Schedule, grad_accum: int = 1,
               seed: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch; with grad_accum > 1 the batch is split into that many
  micro-batches whose loss sums and gradients are added (the same weighted mean as without accumulation).

  The objective is the family's loss sum divided by the summed target weight; "loss" is that whole
  objective (auxiliary terms included) and every other metric sum the family returns, except "weight" and
  "nll", is reported as a mean the same way (e.g. "aux_loss"). `seed` and the step number give each step
  (and micro-batch) its own rng for families that need one (dropout).
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)

  def objective(params, micro_batch, micro_rng):
    return family.loss(params, micro_batch, rng=micro_rng, train=True, aux_state=state.aux_state,
                       step=state.step)

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if grad_accum == 1:
    (total, sums), grad_sum = grad_fn(state.params, batch, rng)
  else:
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

    def accumulate(carry, xs):
      micro_batch, index = xs
      (total_i, sums_i), grad_i = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (total_i, sums_i, grad_i)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, state.params, first, rng))
    (total, sums, grad_sum), _ = jax.lax.scan(
        accumulate, (zeros[0][0], zeros[0][1], zeros[1]), (micro, jnp.arange(grad_accum)))

  denom = jnp.maximum(sums["weight"], 1.0)
  grads = jax.tree.map(lambda g: g / denom, grad_sum)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": total / denom, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
             "tokens": sums["weight"]}
  metrics.update({k: v / denom for k, v in sums.items()
                  if k not in ("weight", "nll") + tuple(family.count_keys)})
  metrics.update(family.summarize(sums))
  aux_state = family.update_aux_state(state.aux_state, sums)
  metrics.update({f"aux/{k}": v for k, v in aux_state.items()} if isinstance(aux_state, dict) else {})
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, aux_state=aux_state), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, family: ModelFamily) -> dict[str, jax.Array]:
  """The family's metric sums over one batch ("weight", "nll", "correct", ...), without an update."""
  return family.loss(params, batch, train=False)[1]


def make_step_fns(family: ModelFamily, tx: optax.GradientTransformation, schedule: optax.Schedule,
                  grad_accum: int, seed: int = 0) -> tuple[Callable, Callable]:
  train = lambda s, b: train_step(s, b, family=family, tx=tx, schedule=schedule, grad_accum=grad_accum,
                                  seed=seed)
  evaluate = lambda p, b: eval_step(p, b, family=family)
  return train, evaluate
