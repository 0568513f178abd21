"""Token-free sequence shortening: boundaries -> groups, pooling, upsampling, compaction (DESIGN §4).

Public entries so far: `compact_indices` and `gather_rows` (MrT5 hard deletion, specs/token_free.md §3.4,
§19.2). Everything here is shape-static: a kept set of data-dependent size lives in a buffer of static
capacity with a validity mask.
"""

from ops.pooling.compaction import compact_indices, gather_rows

__all__ = ["compact_indices", "gather_rows"]
