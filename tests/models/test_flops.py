"""models/flops.py: FLOPs per byte by hand, the hierarchical model's reduction to the flat one, parameter
counts against the initialised trees, and XLA's own count of compiled forwards."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from configs import (base, byte2word, dynamic_pooling, gla, hat, hourglass, landmark, lyt, megabyte, selective,
                     spacebyte, ssa, toucan)
from models import flops

T = 64


def small(module=base, **model):
  """A config module's model config at d_model 64, 2 heads, 2 layers, f32 and the dense attention op."""
  config = module.get_config().model
  config.d_model, config.num_heads, config.num_layers = 64, 2, 2
  config.attention_impl, config.dtype = "reference", "float32"
  if "hierarchical" in config:
    h = config.hierarchical
    h.encoder_layers, h.global_layers, h.decoder_layers = 1, 1, 1
    if h.projection == "pad":
      h.global_d_model, h.global_num_heads = 128, 4
  for key, value in model.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  return config


def test_flat_transformer_is_six_matmul_params_plus_the_full_square_attention_by_hand():
  config = small(d_model=32, num_layers=3)  # SwiGLU width 64, 2 heads of 16, logits over 384 padded rows
  result = flops.training_flops_per_byte(config, T)
  matmul_params = 3 * (4 * 32 * 32 + 3 * 32 * 64) + 32 * 384
  assert result["matmul_params"] == matmul_params == 43_008
  attention = 3 * 2 * T * 32  # per layer: q.k over all T keys and the T weighted values, 32 = H x d_head
  assert result["param_flops"] == 6 * matmul_params
  assert result["attention_flops"] == 6 * attention
  assert result["total"] == 6 * (matmul_params + attention) == 3 * result["forward"]
  # GQA keeps the query heads' attention; k and v shrink to one kv head.
  gqa = flops.training_flops_per_byte(small(d_model=32, num_layers=3, num_kv_heads=1), T)
  assert gqa["matmul_params"] == matmul_params - 3 * 2 * 32 * 16 and gqa["attention_flops"] == 6 * attention


def test_gla_counts_the_chunk_and_the_state_terms_by_hand():
  config = small(gla, d_model=32, num_layers=1, **{"gla.chunk_size": 16})  # 2 heads, d_k 8, d_v 16
  result = flops.training_flops_per_byte(config, T)
  # q, k, v; the low-rank gate 32 -> 16 -> 2 x 8; out and the swish output gate (2 x 16 = 32 wide); the MLP
  weights = 32 * 2 * (8 + 8 + 16) + 32 * 16 + 16 * 2 * 8 + 2 * 32 * 32 + 3 * 32 * 64
  assert result["matmul_params"] == weights + 32 * 384
  assert result["attention_flops"] == 6 * 2 * (16 * (8 + 16) + 2 * 8 * 16)
  short = flops.training_flops_per_byte(config, 8)  # one chunk of the whole window
  assert short["attention_flops"] == 6 * 2 * (8 * (8 + 16) + 2 * 8 * 16)


@pytest.mark.parametrize("projection", ["pad", "linear"])
def test_hierarchical_at_patch_size_one_without_global_layers_is_the_flat_model(projection):
  config = small(hourglass, **{"hierarchical.patch_size": 1, "hierarchical.global_layers": 0,
                               "hierarchical.encoder_layers": 2, "hierarchical.decoder_layers": 3,
                               "hierarchical.projection": projection, "hierarchical.pooling": "mean",
                               "hierarchical.upsampling": "gather"})
  flat = flops.training_flops_per_byte(small(num_layers=5), T)
  result = flops.training_flops_per_byte(config, T, patches_per_byte=1.0)
  assert result["slots"] == T + 1 and result["realised"]["slots"] == T + 1
  projections = 0 if projection == "pad" else 6 * 2 * 64 * 64 * (T + 1) / T  # down and up on T + 1 slots
  assert result["total"] == pytest.approx(flat["total"] + projections, rel=1e-12)
  assert result["attention_flops"] == pytest.approx(flat["attention_flops"], rel=1e-12)
  assert result["realised"]["total"] == pytest.approx(result["total"], rel=1e-12)


def test_hierarchical_realised_cost_follows_the_patches_and_fixed_patches_match_the_capacity():
  config = small(dynamic_pooling)  # whitespace, capacity T // 3 + 1
  result = flops.training_flops_per_byte(config, T, patches_per_byte=1 / 6)
  assert result["slots"] == 23 and result["patches_per_byte"] == 22 / T
  assert result["realised"]["total"] < result["total"]
  assert result["realised"]["parts"]["encoder"] == result["parts"]["encoder"]  # byte layers do not change
  fixed = flops.training_flops_per_byte(small(hourglass), T, patches_per_byte=1 / 4)  # k = 4: T / 4 + 1
  assert fixed["realised"]["total"] == pytest.approx(fixed["total"], rel=1e-12)
  assert "M (weights" in flops.describe(result) and "realised" in flops.describe(result)


@pytest.mark.parametrize("module,model", [
    (base, {}), (base, {"num_kv_heads": 1, "qk_norm": True, "tie_embeddings": False}), (gla, {}),
    (landmark, {}), (ssa, {}), (selective, {}), (hourglass, {}), (dynamic_pooling, {}), (hat, {}),
    (spacebyte, {}), (dynamic_pooling, {"hierarchical.global_mixer": "gla"}),
    (hourglass, {"hierarchical.pooling": "concat", "hierarchical.upsampling": "linear"}),
    (megabyte, {"hierarchical.global_d_model": 256}), (lyt, {}), (byte2word, {}), (toucan, {}),
], ids=lambda x: getattr(x, "__name__", str(x)).rpartition(".")[2])
def test_param_count_is_the_initialised_tree(module, model):
  config = small(module, **model)
  family = models.get_family(config)
  shapes = jax.eval_shape(lambda: nn.unbox(family.init(jax.random.key(0), family.example_batch(1, 16))))
  assert flops.param_count(config) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  tables = 2 if module in (megabyte, lyt) else 1
  assert flops.param_count(config) - flops.param_count_non_embedding(config) == tables * 384 * 64


@pytest.mark.parametrize("module,model", [
    (base, {}), (gla, {"gla.impl": "xla"}), (landmark, {}), (hourglass, {}), (spacebyte, {}),
    (megabyte, {"hierarchical.global_d_model": 256}), (hat, {}), (lyt, {}), (toucan, {}),
], ids=lambda x: getattr(x, "__name__", str(x)).rpartition(".")[2])
def test_forward_count_agrees_with_xla_cost_analysis(module, model):
  """XLA counts every op of the compiled f32 forward (elementwise ones too): within 15% of ours."""
  config = small(module, **model)
  family = models.get_family(config)
  params = jax.eval_shape(lambda: nn.unbox(family.init(jax.random.key(0), family.example_batch(2, T))))
  ids = jax.ShapeDtypeStruct((2, T), jnp.int32)
  cost = jax.jit(lambda p, i: family.module().apply({"params": p}, i)).lower(params, ids).compile()
  cost = cost.cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / (2 * T)
  ours = flops.training_flops_per_byte(config, T)["forward"]
  assert abs(xla / ours - 1) < 0.15, (xla, ours)


def test_other_families_are_refused():
  config = small()
  config.name = "byt5"
  with pytest.raises(ValueError, match="no FLOP count for model family 'byt5'"):
    flops.training_flops_per_byte(config, T)
