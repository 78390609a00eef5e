"""Placement: where each selected block lands in the staging area.

Pure index bookkeeping (no copies): from one layer's block selection for the
decode requests, compute the source block ids in the host tier, the staging
slots they go to, and the compacted block table and sequence lengths the
paged-attention kernel reads. Staging slots are assigned request after
request in selection order, so the copy is one ``index_select`` into the
first ``total`` slots, and each request's newest (partly filled) block is its
last slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_infinigen.method.selection import BlockSelection


@dataclass(frozen=True, eq=False)
class StagingPlan:
    """One layer's swap-in for one decode step.

    Attributes:
        src_block_ids: ``[total]`` int64 host-tier block ids to copy.
        compact_block_table: ``[num_reqs, width]`` int32 staging slots per
            request (slot 0 past ``counts``).
        sparse_seq_lens: ``[num_reqs]`` int32 tokens the kernel attends to:
            full blocks for all selected blocks but the newest, plus the
            newest block's filled part.
        newest_src: ``[num_reqs]`` int64 host block id of each request's
            newest block (re-copied after this step's KV write).
        newest_slot: ``[num_reqs]`` int64 its staging slot.
        counts: ``[num_reqs]`` int64 selected blocks per request.
        total_blocks: ``int(counts.sum())``.
        dense_blocks: blocks dense attention would read (``sum(n_r)``).
    """

    src_block_ids: torch.Tensor
    compact_block_table: torch.Tensor
    sparse_seq_lens: torch.Tensor
    newest_src: torch.Tensor
    newest_slot: torch.Tensor
    counts: torch.Tensor
    total_blocks: int
    dense_blocks: int


def plan_staging(
    selection: BlockSelection,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
) -> StagingPlan:
    """Lay one layer's selected blocks out in staging slots.

    Args:
        selection: ascending logical block indices per request, newest last
            (``recent_blocks >= 1`` guarantees it).
        block_table: ``[num_reqs, max_blocks]`` physical block ids.
        seq_lens: ``[num_reqs]`` tokens per request (``>= 1``).
        block_size: tokens per block.
    """
    indices, counts = selection.indices, selection.counts.long()
    num_reqs, width = indices.shape
    seq = seq_lens.long()
    num_blocks = (seq + block_size - 1) // block_size
    valid = torch.arange(width, device=indices.device)[None, :] < counts[:, None]
    logical = indices.clamp(min=0).long()
    physical = torch.gather(block_table.long(), 1, logical)
    offsets = torch.cumsum(counts, 0) - counts
    slots = offsets[:, None] + torch.arange(width, device=indices.device)[None, :]
    compact = torch.where(valid, slots, torch.zeros_like(slots)).to(torch.int32)
    src = physical[valid]
    last_len = seq - (num_blocks - 1) * block_size
    sparse = (counts - 1) * block_size + last_len
    newest_src = torch.gather(block_table.long(), 1, (num_blocks - 1)[:, None])[:, 0]
    newest_slot = offsets + counts - 1
    return StagingPlan(
        src_block_ids=src,
        compact_block_table=compact,
        sparse_seq_lens=sparse.to(torch.int32),
        newest_src=newest_src,
        newest_slot=newest_slot,
        counts=counts,
        total_blocks=int(src.numel()),
        dense_blocks=int(num_blocks.sum()),
    )
