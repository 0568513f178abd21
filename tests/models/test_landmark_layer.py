"""Landmark layer specifics (models/landmark.py); the generic mixer checks are in tests/models/test_mixers.py.

Covers the options, the op-implementation choice (slot-aligned "xla" vs "reference" with segments), the
top-k retrieval decoding (exact when every block is retrieved; finite far past the training length), and
decoding under nn.scan.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import landmark as landmark_model
from models import registry
from tests.models import model_testing as mt

B, T = 2, 23
DECODE_ATOL = 1e-5


def _config(num_layers=2, name="landmark_lm", **landmark_options):
  overrides = {f"landmark.{key}": value for key, value in landmark_options.items()}
  return mt.tiny_model_config("landmark", num_layers=num_layers, name=name, **overrides)


@pytest.mark.parametrize("options, message", [
    ({"blocksize": 5}, "unknown model.landmark option"),
    ({"block_size": 1}, "block_size must be an int >= 2"),
    ({"inference": "exact"}, "inference must be one of"),
    ({"top_k": 0}, "top_k must be an int >= 1"),
    ({"local_blocks": -1}, "local_blocks must be an int >= 0"),
    ({"granularity": "per_head"}, "granularity must be one of"),
    ({"stingy": "yes"}, "stingy must be a bool"),
    ({"chunk_len": 0}, "chunk_len must be an int >= 1"),
    ({"impl": "triton"}, "impl must be one of"),
    ({"packed_blocks": "window"}, "packed_blocks must be one of"),
])
def test_bad_options_raise(options, message):
  with pytest.raises(ValueError, match=message):
    landmark_model.landmark_options(_config(**options))


def test_landmark_id_needs_an_embedding_row():
  config = mt.tiny_model_config("landmark", vocab_pad_multiple=1)
  with pytest.raises(ValueError, match="needs an embedding row"):
    models.get_family(config)


def test_defaults_and_the_family_stream():
  options = landmark_model.landmark_options(mt.tiny_model_config("softmax"))
  assert options == registry.plain_defaults(landmark_model.DEFAULTS)
  assert options["block_size"] == 51 and options["top_k"] == 4 and options["inference"] == "full"
  # Only the landmark_lm family inserts landmarks; the plain transformer runs the mixers on its inputs.
  assert models.get_family(_config(name="transformer")).module().stream is None
  stream = models.get_family(_config()).module().stream
  assert (stream.block_size, stream.packed_blocks) == (5, "document")  # test override, module default


def test_config_file_takes_the_registered_defaults():
  from configs import landmark as landmark_config
  section = landmark_config.get_config().model.landmark.to_dict()
  assert section == {**registry.plain_defaults(landmark_model.DEFAULTS), "packed_blocks": "stream"}


def test_reference_path_matches_slot_aligned_path():
  """The mixer with one segment and explicit positions (the "reference" op) == without segments or
  positions (the slot-aligned default op, "xla" on CPU)."""
  config = _config()
  module = landmark_model.LandmarkAttention(config=config)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 29, config.d_model)), jnp.float32)
  variables = module.init(mt.key(0), x)
  ones = jnp.ones((B, 29), jnp.int32)
  arange = jnp.broadcast_to(jnp.arange(29, dtype=jnp.int32), (B, 29))
  np.testing.assert_allclose(module.apply(variables, x, ones, arange), module.apply(variables, x),
                             atol=1e-5, rtol=0)


def _decode_matches_forward(config, pieces, cache_len):
  model = models.get_model(config)
  params = mt.init_params(model)
  inputs = mt.random_ids(11, (B, sum(pieces)))
  expected = mt.forward(model, params, inputs)
  decoded = mt.decode_in_pieces(models.get_model(config, decode=True), params, inputs, pieces, cache_len)
  return expected, decoded


def test_stream_packed_blocks_isolate_documents_with_the_blockwise_op():
  """packed_blocks="stream": window-aligned blocks, documents isolated by segment ids; the blockwise op
  ("xla") gives the same logits as the reference op, and one segment equals the unsegmented forward."""
  inputs = mt.random_ids(3, (B, T))
  segment_ids, positions = mt.two_segments((9, 14))
  stream_xla = _config(packed_blocks="stream", impl="xla")
  model = models.get_model(stream_xla)
  params = mt.init_params(model)
  logits = np.asarray(mt.forward(model, params, inputs, segment_ids, positions))
  reference = models.get_model(_config(packed_blocks="stream", impl="reference"))
  np.testing.assert_allclose(mt.forward(reference, params, inputs, segment_ids, positions), logits,
                             rtol=0, atol=1e-5)
  for changed_segment in (1, 2):
    changed = np.where(segment_ids == changed_segment, mt.random_ids(8, (B, T)), inputs)
    kept = segment_ids != changed_segment
    np.testing.assert_allclose(np.asarray(mt.forward(model, params, changed, segment_ids, positions))[kept],
                               logits[kept], rtol=0, atol=1e-5)
  ones, arange = mt.two_segments((T, T))
  np.testing.assert_allclose(mt.forward(model, params, inputs, ones, arange),
                             mt.forward(model, params, inputs), rtol=0, atol=1e-5)


def test_topk_retrieving_every_block_matches_forward():
  """inference="topk" with top_k >= all blocks, true positions (stingy=False): exactly the parallel
  forward (spec §2.4 reduces to §2.2), for a chunked prefill (13 slots in chunks of 4: lax.map and a
  remainder) and single tokens."""
  config = _config(num_layers=1, inference="topk", top_k=8, stingy=False, chunk_len=4, local_blocks=0)
  expected, decoded = _decode_matches_forward(config, (11,) + (1,) * 6, cache_len=T)
  assert mt.max_abs_diff(decoded, expected) <= DECODE_ATOL, mt.max_abs_diff(decoded, expected)


def test_topk_small_k_runs_far_past_training_length():
  """top_k=1 with stingy positions over 4x the training length: finite logits that differ from the
  exact read (blocks are dropped), and the exact read still matches the forward."""
  train_len, length = T, 4 * T
  config = _config(num_layers=1, inference="topk", top_k=1, stingy=True, chunk_len=16)
  model = models.get_model(config)
  params = mt.init_params(model, seq_len=train_len)
  inputs = mt.random_ids(3, (B, length))
  pieces = (70,) + (1,) * (length - 70)
  decoded = mt.decode_in_pieces(models.get_model(config, decode=True), params, inputs, pieces, length)
  assert decoded.shape == (B, length, config.vocab_size)
  assert bool(jnp.all(jnp.isfinite(decoded)))
  exact = mt.forward(model, params, inputs)
  assert mt.max_abs_diff(decoded[:, :5], exact[:, :5]) <= DECODE_ATOL  # first block: nothing to drop
  assert mt.max_abs_diff(decoded, exact) > 1e-3  # retrieval approximates once there are many blocks


@pytest.mark.slow
def test_decode_matches_forward_under_scan_and_remat():
  """nn.cond (decode expansion) around an nn.scan'ed, rematerialised stack."""
  config = mt.tiny_model_config("landmark", scan_layers=True, remat="full")
  expected, decoded = _decode_matches_forward(config, (6,) + (1,) * 4, cache_len=12)
  assert mt.max_abs_diff(decoded, expected) <= DECODE_ATOL, mt.max_abs_diff(decoded, expected)
