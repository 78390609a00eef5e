"""The CUDA tier's swap engine and device counters (``engine/cuda_swap.py``).

On CPU the engine copies inline on the current stream. With a GPU (``gpu``
mark): the side stream, its fork and join, and a plan dropped while its copy
is in flight. CUDA-graph replay and the absence of host syncs are
``benchmarks/gpu_check.py``'s ``graph`` and ``no_host_sync`` checks
(``tests/test_gpu_check.py`` runs them).
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_cuda_copy import random_selection
from vllm_infinigen.engine.cuda_copy import as_block_rows, plan_fixed_capacity
from vllm_infinigen.engine.cuda_swap import DeviceCounters, SwapEngine


def test_swap_engine_cpu_fills_parity_buffers_in_place() -> None:
    gen = torch.Generator().manual_seed(4)
    block_shape = (16, 2, 8)
    pools = [torch.randn(20, *block_shape, generator=gen) for _ in range(3)]
    block_bytes = as_block_rows(pools[0]).shape[1]
    reqs, cols, width = 3, 4, 5
    engine = SwapEngine(reqs * width, block_bytes, num_layers=3, device="cpu")
    addresses = [b.data_ptr() for b in engine.buffers]
    assert engine.nbytes == 2 * reqs * width * block_bytes
    for layer, pool in enumerate(pools):
        host_ids, counts = random_selection(gen, reqs, cols, num_blocks=20)
        plan = plan_fixed_capacity(host_ids, counts, width)
        staged = engine.start(layer, pool, plan)
        engine.wait(layer)
        assert staged is engine.buffer(layer) is engine.buffers[layer % 2]
        typed = staged.view(torch.float32).view(reqs * width, *block_shape)
        for r in range(reqs):
            for j in range(int(counts[r])):
                slot = int(plan.compact_block_table[r, j])
                torch.testing.assert_close(typed[slot], pool[int(host_ids[r, j])])
    assert [b.data_ptr() for b in engine.buffers] == addresses


def test_swap_engine_refuses_oversized_plans() -> None:
    engine = SwapEngine(4, 64, num_layers=1, device="cpu")
    pool = torch.zeros(10, 64, dtype=torch.uint8)
    plan = plan_fixed_capacity(torch.zeros(1, 5, dtype=torch.long), torch.ones(1), 5)
    with pytest.raises(ValueError, match="5 staging slots"):
        engine.start(0, pool, plan)
    small = plan_fixed_capacity(torch.zeros(1, 2, dtype=torch.long), torch.ones(1), 2)
    with pytest.raises(ValueError, match="staging expects 64"):
        engine.start(0, torch.zeros(10, 32, dtype=torch.uint8), small)
    with pytest.raises(ValueError, match="must be positive"):
        SwapEngine(0, 64, num_layers=1, device="cpu")


def test_device_counters_cpu() -> None:
    counters = DeviceCounters("cpu")
    counters.add(torch.tensor([2, 0, 5]), block_bytes=1024)
    counters.add(torch.tensor([1]), block_bytes=1024)
    assert counters.snapshot() == {"blocks_read": 8, "bytes_read": 8192, "steps": 2}
    counters.reset()
    assert counters.snapshot() == {"blocks_read": 0, "bytes_read": 0, "steps": 0}


@pytest.mark.gpu
def test_swap_engine_side_stream() -> None:
    """start forks after ``ready``, wait joins; the staging buffers are never
    reallocated; a plan dropped right after start is still read correctly."""
    from vllm_infinigen.engine.cuda_pool import PinnedHostPool

    cuda = torch.device("cuda", torch.cuda.current_device())
    num_blocks, block_bytes, reqs, cols, width = 64, 4096, 3, 6, 8
    gen = torch.Generator().manual_seed(5)
    data = torch.randint(
        0, 255, (num_blocks, block_bytes), generator=gen, dtype=torch.uint8
    )
    pool = PinnedHostPool(num_blocks * block_bytes, cuda)
    try:
        pool.host.copy_(data.view(-1))
        rows = pool.device_view.view(num_blocks, block_bytes)
        engine = SwapEngine(reqs * width, block_bytes, num_layers=4, device=cuda)
        addresses = [b.data_ptr() for b in engine.buffers]
        for layer in range(4):
            host_ids, counts = random_selection(gen, reqs, cols, num_blocks)
            plan = plan_fixed_capacity(host_ids.to(cuda), counts.to(cuda), width)
            ready = torch.cuda.Event()
            ready.record()
            staged = engine.start(layer, rows, plan, ready)
            del plan  # its ids must outlive the copy (record_stream)
            torch.empty(1 << 20, device=cuda).fill_(1.0)  # reuse freed memory
            engine.wait(layer)
            got = staged.cpu()
            for r in range(reqs):
                for j in range(int(counts[r])):
                    assert torch.equal(got[r * width + j], data[int(host_ids[r, j])])
        assert [b.data_ptr() for b in engine.buffers] == addresses
    finally:
        torch.cuda.synchronize()
        pool.release()
