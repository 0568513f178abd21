"""Token-free sequence shortening: boundaries -> groups, pooling, upsampling, compaction (DESIGN §4).

Everything here is shape-static: a set of data-dependent size lives in a buffer of static capacity with a
validity mask. Public entries (specs/token_free.md sections in each docstring):
  groups (§5.1, §19.2):  `group_ids` -> `Groups`, `pool` (mean / sum / last; impl "segment_sum" or
                         "onehot"), `upsample` (the causal inclusive / exclusive gather). Boundary
                         convention b_t = 1: the group ends at byte t; slot 0 is the null group.
  boundary sources:      `fixed_boundaries`, `whitespace_boundaries`, `spacelike_boundaries`,
                         `is_spacelike` (§5.2, §11.1; jnp over ByT5 ids); `hat_word_boundaries` and
                         `hat_split` (§4.1, host-side numpy).
  trained sources (§5.2, `ops.pooling.learned`): `learned_boundaries` (Gumbel-sigmoid sample with the
                         straight-through estimate, or 1[p > 0.5]), `relaxed_bernoulli`,
                         `straight_through`, `binomial_prior_loss`, `next_byte_entropy`,
                         `entropy_spikes`, `sigmoid_bce`; `pool(..., boundaries=b)` differentiates the
                         pooled groups w.r.t. a straight-through b.
  fixed patches (§6, §10.1): `shift_right`, `fixed_pool`, `fixed_upsample`.
  resampling (§4.3, §6, §8, §10.1, `ops.pooling.resample`): `group_offsets`, `read_offsets`, `run_ids`,
                         `concat_pool` (MEGABYTE / LinearPool), `offset_slices` (linear upsampling),
                         `pooling_mask`, `upsampling_mask`, `masked_attention` (attention pooling and
                         upsampling, HAT's connector).
  end of token (§7, `ops.pooling.end_of_token`): `eot_layout` (Toucan's expanded stream), `expand_layout`,
                         `next_byte_view`, `eot_targets`.
  compaction (§3.4):     `compact_indices`, `gather_rows` (MrT5 hard deletion).
"""

from ops.pooling.boundaries import fixed_boundaries
from ops.pooling.boundaries import is_spacelike
from ops.pooling.boundaries import spacelike_boundaries
from ops.pooling.boundaries import whitespace_boundaries
from ops.pooling.compaction import compact_indices, gather_rows
from ops.pooling.end_of_token import EotLayout
from ops.pooling.end_of_token import eot_layout
from ops.pooling.end_of_token import eot_targets
from ops.pooling.end_of_token import expand_layout
from ops.pooling.end_of_token import next_byte_view
from ops.pooling.fixed import fixed_pool
from ops.pooling.fixed import fixed_upsample
from ops.pooling.fixed import shift_right
from ops.pooling.groups import Groups
from ops.pooling.groups import group_ids
from ops.pooling.groups import pool
from ops.pooling.groups import upsample
from ops.pooling.hat_split import hat_split
from ops.pooling.hat_split import hat_word_boundaries
from ops.pooling.learned import binomial_prior_loss
from ops.pooling.learned import entropy_spikes
from ops.pooling.learned import learned_boundaries
from ops.pooling.learned import next_byte_entropy
from ops.pooling.learned import relaxed_bernoulli
from ops.pooling.learned import sigmoid_bce
from ops.pooling.learned import straight_through
from ops.pooling.resample import concat_pool
from ops.pooling.resample import group_offsets
from ops.pooling.resample import masked_attention
from ops.pooling.resample import offset_slices
from ops.pooling.resample import pooling_mask
from ops.pooling.resample import read_offsets
from ops.pooling.resample import run_ids
from ops.pooling.resample import upsampling_mask

__all__ = [
    "compact_indices", "gather_rows",
    "Groups", "group_ids", "pool", "upsample",
    "fixed_boundaries", "whitespace_boundaries", "spacelike_boundaries", "is_spacelike",
    "hat_split", "hat_word_boundaries",
    "learned_boundaries", "relaxed_bernoulli", "straight_through", "binomial_prior_loss",
    "next_byte_entropy", "entropy_spikes", "sigmoid_bce",
    "shift_right", "fixed_pool", "fixed_upsample",
    "group_offsets", "read_offsets", "run_ids", "concat_pool", "offset_slices", "pooling_mask",
    "upsampling_mask", "masked_attention",
    "EotLayout", "eot_layout", "eot_targets", "expand_layout", "next_byte_view",
]
