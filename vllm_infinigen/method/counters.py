"""Selection counters: how often each physical block was selected.

Counter-based eviction (the InfiniGen artifact's best policy) needs, per
physical block id, the number of times speculation selected it. The counter
tensor lives where the selection does and is updated in place by a
scatter-add, with no host synchronisation.
"""

from __future__ import annotations

import torch

from .selection import BlockSelection, selected_block_ids


def new_selection_counters(
    num_blocks: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[num_blocks]`` int64 zeros."""
    return torch.zeros(num_blocks, dtype=torch.long, device=device)


def count_selected_blocks(
    counters: torch.Tensor, block_table: torch.Tensor, selection: BlockSelection
) -> torch.Tensor:
    """Add one to the counter of every selected physical block, in place.

    A block selected by several requests (a shared prefix) counts once per
    request.

    Args:
        counters: ``[num_blocks]`` integer counters, updated in place.
        block_table: ``[num_reqs, max_blocks]`` int physical block ids.
        selection: this layer's selection.

    Returns:
        ``counters``.
    """
    ids = selected_block_ids(block_table, selection).to(torch.long)
    hits = (ids >= 0).to(counters.dtype)
    counters.scatter_add_(0, ids.clamp(min=0).reshape(-1), hits.reshape(-1))
    return counters
