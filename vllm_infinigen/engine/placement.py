"""Placement: which host blocks each decode request reads, and where.

Pure index bookkeeping (no copies, no kernels). From one layer's block
selection for the decode requests it computes the compacted block table and
the sparse sequence lengths the paged-attention kernel reads, in one of two
shapes:

* :func:`plan_in_place`: the table holds the selected *host* block ids, so
  the kernel reads them where they lie (the CPU build, where host and device
  tiers share one DRAM). No host synchronisation: every shape comes from the
  selection's shape.
* :func:`plan_staging`: the table holds *staging slots*, assigned request
  after request in selection order, so the copy (``engine/copier.py``) is
  one ``index_select`` into the first ``total`` slots (the GPU shape, where
  the kernel cannot read host memory).

In both, each request's newest (partly filled) block comes last, so
``sparse_seq_lens`` stays a valid sequence length.

Prefill rows of a step read their whole context; where the kernel reads
staging, :func:`plan_prefill_gather` lays those contexts out request after
request (both platforms' backends).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_infinigen.method.selection import PAD, BlockSelection, num_blocks_of


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """One layer's reads for one decode step.

    Attributes:
        compact_block_table: ``[num_reqs, width]`` int32 what the kernel's
            block table holds for each decode row: host block ids
            (in place) or staging slots (staging); 0 past ``counts``.
        host_ids: ``[num_reqs, width]`` int64 host block ids of the selected
            blocks, :data:`~vllm_infinigen.method.selection.PAD` past
            ``counts`` (what an observer of the read blocks needs).
        sparse_seq_lens: ``[num_reqs]`` int32 tokens the kernel attends to:
            full blocks for all selected blocks but the newest, plus the
            newest block's filled part.
        counts: ``[num_reqs]`` int64 selected blocks per request.
        dense_counts: ``[num_reqs]`` int64 blocks dense attention would read.
    """

    compact_block_table: torch.Tensor
    host_ids: torch.Tensor
    sparse_seq_lens: torch.Tensor
    counts: torch.Tensor
    dense_counts: torch.Tensor


@dataclass(frozen=True, eq=False)
class StagingPlan(BlockPlan):
    """A :class:`BlockPlan` whose table points at staging slots.

    Attributes:
        src_block_ids: ``[total]`` int64 host block ids to copy, slot order.
        newest_src: ``[num_reqs]`` int64 host block id of each request's
            newest block (re-copied after this step's KV write).
        newest_slot: ``[num_reqs]`` int64 its staging slot.
        total_blocks: ``int(counts.sum())`` (sizes the copy).
    """

    src_block_ids: torch.Tensor
    newest_src: torch.Tensor
    newest_slot: torch.Tensor
    total_blocks: int


def _selected_host_ids(
    selection: BlockSelection, block_table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid [R, W] bool, host ids [R, W] int64 with PAD)``."""
    indices, counts = selection.indices, selection.counts.long()
    width = indices.shape[1]
    valid = torch.arange(width, device=indices.device)[None, :] < counts[:, None]
    physical = torch.gather(block_table.long(), 1, indices.clamp(min=0).long())
    return valid, physical.masked_fill(~valid, PAD)


def _sparse_seq_lens(
    counts: torch.Tensor,
    seq_lens: torch.Tensor,
    n_blocks: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    last_len = seq_lens.long() - (n_blocks - 1) * block_size
    return ((counts.long() - 1) * block_size + last_len).to(torch.int32)


def plan_in_place(
    selection: BlockSelection,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
) -> BlockPlan:
    """The kernel reads the selected host blocks where they lie.

    Args:
        selection: ascending logical block indices per request, newest last
            (``recent_blocks >= 1`` guarantees it).
        block_table: ``[num_reqs, max_blocks]`` physical block ids.
        seq_lens: ``[num_reqs]`` tokens per request (``>= 1``).
        block_size: tokens per block.
    """
    valid, host_ids = _selected_host_ids(selection, block_table)
    n_blocks = num_blocks_of(seq_lens, block_size)
    return BlockPlan(
        compact_block_table=host_ids.clamp(min=0).to(torch.int32),
        host_ids=host_ids,
        sparse_seq_lens=_sparse_seq_lens(
            selection.counts, seq_lens, n_blocks, block_size
        ),
        counts=selection.counts.long(),
        dense_counts=n_blocks,
    )


def plan_staging(
    selection: BlockSelection,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
) -> StagingPlan:
    """Lay one layer's selected blocks out in staging slots (arguments as
    :func:`plan_in_place`)."""
    counts = selection.counts.long()
    valid, host_ids = _selected_host_ids(selection, block_table)
    width = host_ids.shape[1]
    n_blocks = num_blocks_of(seq_lens, block_size)
    offsets = torch.cumsum(counts, 0) - counts
    slots = offsets[:, None] + torch.arange(width, device=host_ids.device)[None, :]
    compact = torch.where(valid, slots, torch.zeros_like(slots)).to(torch.int32)
    src = host_ids[valid]
    newest_src = torch.gather(block_table.long(), 1, (n_blocks - 1)[:, None])[:, 0]
    return StagingPlan(
        compact_block_table=compact,
        host_ids=host_ids,
        sparse_seq_lens=_sparse_seq_lens(counts, seq_lens, n_blocks, block_size),
        counts=counts,
        dense_counts=n_blocks,
        src_block_ids=src,
        newest_src=newest_src,
        newest_slot=offsets + counts - 1,
        total_blocks=int(src.numel()),
    )


@dataclass(frozen=True, eq=False)
class PrefillGather:
    """Where the prefill rows' whole contexts go in staging, request after
    request (layer-independent: planned once per step).

    Attributes:
        src_ids: ``[num_blocks]`` int64 host block ids, request after
            request, on the block table's device.
        block_table: ``[num_prefill_rows, width]`` int32 slots of each
            prefill row's blocks, relative to the first (0 past its last).
        num_blocks: ``src_ids``' length (a host int: sizes the copy).
        width: columns of ``block_table``.
    """

    src_ids: torch.Tensor
    block_table: torch.Tensor
    num_blocks: int
    width: int


def plan_prefill_gather(
    block_table: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
) -> PrefillGather:
    """Lay the prefill rows' whole contexts out one after the other (host
    arithmetic on CPU tensors; one small copy to the table's device, no
    host synchronisation with it).

    Args:
        block_table: ``[num_reqs, max_blocks]`` physical block ids (any
            device).
        rows: ``[num_prefill_rows]`` int64 CPU indices of the prefill rows.
        seq_lens: ``[num_prefill_rows]`` CPU tokens of those rows.
        block_size: tokens per block.
    """
    counts = num_blocks_of(seq_lens, block_size)
    width = max(1, int(counts.max())) if counts.numel() else 1
    offsets = torch.cumsum(counts, 0) - counts
    cols = torch.arange(width)[None, :]
    valid = cols < counts[:, None]
    table = torch.where(valid, offsets[:, None] + cols, torch.zeros_like(cols))
    row_idx, col_idx = torch.nonzero(valid, as_tuple=True)
    device = block_table.device
    src = block_table[rows[row_idx].to(device), col_idx.to(device)].long()
    return PrefillGather(
        src_ids=src,
        block_table=table.to(device=device, dtype=torch.int32),
        num_blocks=int(counts.sum()),
        width=width,
    )
