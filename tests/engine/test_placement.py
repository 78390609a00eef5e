"""Placement (in place and staging) and movement of selected blocks,
against obvious loops."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_infinigen.engine.copier import BlockCopier
from vllm_infinigen.engine.placement import (
    plan_in_place,
    plan_prefill_gather,
    plan_staging,
)
from vllm_infinigen.method.selection import PAD, BlockSelection

BLOCK = 4


def _selection(rows: list[list[int]], width: int) -> BlockSelection:
    indices = torch.full((len(rows), width), PAD, dtype=torch.long)
    for r, row in enumerate(rows):
        indices[r, : len(row)] = torch.tensor(row, dtype=torch.long)
    counts = torch.tensor([len(row) for row in rows], dtype=torch.long)
    return BlockSelection(indices=indices, counts=counts)


def _random_case(seed: int) -> tuple[BlockSelection, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    num_reqs = int(torch.randint(1, 5, (1,), generator=gen))
    seq_lens = torch.randint(1, 40, (num_reqs,), generator=gen).to(torch.int32)
    width = int((seq_lens.max() + BLOCK - 1) // BLOCK)
    # A permuted physical block table, as vLLM's allocator produces.
    perm = torch.randperm(64, generator=gen)[: num_reqs * width]
    table = perm.view(num_reqs, width).to(torch.int32)
    rows = []
    for r in range(num_reqs):
        n = int((seq_lens[r] + BLOCK - 1) // BLOCK)
        chosen = {n - 1}
        for j in range(n - 1):
            if torch.rand(1, generator=gen) < 0.4:
                chosen.add(j)
        rows.append(sorted(chosen))
    return _selection(rows, width), table, seq_lens


@pytest.mark.parametrize("seed", range(20))
def test_plan_matches_reference(seed: int) -> None:
    selection, table, seq_lens = _random_case(seed)
    plan = plan_staging(selection, table, seq_lens, BLOCK)
    slot = 0
    want_src = []
    for r in range(table.shape[0]):
        n = int((seq_lens[r] + BLOCK - 1) // BLOCK)
        count = int(selection.counts[r])
        chosen = selection.indices[r, :count].tolist()
        for k, logical in enumerate(chosen):
            want_src.append(int(table[r, logical]))
            assert int(plan.compact_block_table[r, k]) == slot
            slot += 1
        last_len = int(seq_lens[r]) - (n - 1) * BLOCK
        assert int(plan.sparse_seq_lens[r]) == (count - 1) * BLOCK + last_len
        assert int(plan.newest_src[r]) == int(table[r, n - 1])
        assert int(plan.newest_slot[r]) == slot - 1
    assert plan.src_block_ids.tolist() == want_src
    assert plan.total_blocks == len(want_src)
    assert plan.dense_counts.tolist() == ((seq_lens + BLOCK - 1) // BLOCK).tolist()


@pytest.mark.parametrize("seed", range(20))
def test_in_place_plan_matches_reference(seed: int) -> None:
    """In place, each decode row's table lists its selected host blocks in
    order (newest last) and its sequence length covers exactly them."""
    selection, table, seq_lens = _random_case(seed)
    plan = plan_in_place(selection, table, seq_lens, BLOCK)
    staged = plan_staging(selection, table, seq_lens, BLOCK)
    for r in range(table.shape[0]):
        n = int((seq_lens[r] + BLOCK - 1) // BLOCK)
        count = int(selection.counts[r])
        chosen = selection.indices[r, :count].tolist()
        want = [int(table[r, j]) for j in chosen]
        assert plan.compact_block_table[r, :count].tolist() == want
        assert plan.host_ids[r, :count].tolist() == want
        assert (plan.host_ids[r, count:] == PAD).all()
        assert want[-1] == int(table[r, n - 1])  # newest last
        last_len = int(seq_lens[r]) - (n - 1) * BLOCK
        assert int(plan.sparse_seq_lens[r]) == (count - 1) * BLOCK + last_len
    # Both placements read the same blocks with the same lengths.
    assert torch.equal(plan.sparse_seq_lens, staged.sparse_seq_lens)
    assert torch.equal(plan.host_ids, staged.host_ids)
    assert plan.compact_block_table.dtype == torch.int32


@pytest.mark.parametrize("mode", BlockCopier.MODES)
def test_copier_round_trip(mode: str) -> None:
    host = torch.randn(32, 2, BLOCK, 16).to(torch.bfloat16)
    copier = BlockCopier(mode)
    try:
        src = torch.tensor([5, 0, 31, 7], dtype=torch.long)
        for layer in range(3):  # both parities, reused buffers
            handle = copier.submit(layer, host, src)
            staging = handle.wait()
            assert torch.equal(staging[: src.numel()], host[src])
        # The newest block changes after the swap-in: refresh re-copies it.
        host[7] += 1
        BlockCopier.refresh(host, staging, torch.tensor([7]), torch.tensor([3]))
        assert torch.equal(staging[3], host[7])
        assert copier.staging.peak_blocks == 4
    finally:
        copier.shutdown()


@pytest.mark.parametrize("rows", [[1, 2, 3], [3, 1]])
def test_prefill_gather_lays_rows_out_request_after_request(rows: list[int]) -> None:
    """Every block of each prefill row, in row order, against a loop; slots
    of the relative table count on from the previous row's last."""
    table = torch.tensor([[9, 9, 9], [4, 5, 0], [7, 0, 0], [1, 2, 3]])
    lens = {1: 5, 2: 2, 3: 12}
    gather = plan_prefill_gather(
        table, torch.tensor(rows), torch.tensor([lens[r] for r in rows]), BLOCK
    )
    src, rel, slot = [], [], 0
    for r in rows:
        n = math.ceil(lens[r] / BLOCK)
        src += table[r, :n].tolist()
        rel.append(list(range(slot, slot + n)) + [0] * (3 - n))
        slot += n
    assert gather.src_ids.tolist() == src and gather.num_blocks == len(src)
    assert gather.block_table.tolist() == rel and gather.width == 3
    assert gather.block_table.dtype == torch.int32


@pytest.mark.parametrize("mode", BlockCopier.MODES)
def test_copier_under_inference_mode(mode: str) -> None:
    """vLLM runs the forward under inference mode: the staging buffers are
    inference tensors, which a worker thread must still be able to fill."""
    host = torch.randn(8, 2, BLOCK, 4)
    copier = BlockCopier(mode)
    try:
        src = torch.tensor([3, 1], dtype=torch.long)
        with torch.inference_mode():
            for layer in range(2):
                staging = copier.submit(layer, host, src).wait()
                assert torch.equal(staging[:2], host[src])
    finally:
        copier.shutdown()


def test_copier_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="copier mode"):
        BlockCopier("teleport")
