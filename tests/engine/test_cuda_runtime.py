"""The CUDA runtime's selection-to-staging glue, on CPU tensors.

Over the small model of ``tests/engine/cuda_world.py`` (vLLM's own LBNHC
paged views, one step's metadata from vLLM's dataclasses, ``cuda_swap``'s
swap engine copying inline on CPU), each decode read is checked as a round
trip: host -> staging -> attention over the compacted staging table equals
attention over the selected tokens read straight from the host cache. The
``gpu`` tests repeat it with the side stream and the Triton gather.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.engine.cuda_world import (
    NAMES,
    World,
    paged_attention,
    paged_caches,
    selected_attention,
    write_kv,
)
from tests.engine.tiny_model import BLOCK, DIM, HEADS, HIDDEN, KV, speculator
from vllm_infinigen.engine.cuda_backend import staging_kv_view, staging_slot_mapping
from vllm_infinigen.engine.cuda_runtime import (
    prefetch_hook,
    read_paged_keys,
    staging_width,
    to_device,
    whole_plan,
)
from vllm_infinigen.method.selection import (
    SelectionPolicy,
    blocks_for,
    num_blocks_of,
    select_blocks,
)


def _check_round_trip(world: World, index: int) -> tuple[Any, Any]:
    """One decode step of layer ``index``: prefetch, KV write, read; staging
    matches the host and attention over it matches the selected tokens."""
    runtime, layer = world.runtime, world.layer(index)
    meta = world.decode_step()
    nd = meta.num_decode_rows
    x = torch.randn(nd, HIDDEN, generator=world.gen).to(world.device)
    runtime.prefetch(layer, x, meta)
    world.finish_token(index, meta)
    query = torch.randn(nd, HEADS, DIM, generator=world.gen).to(world.device)
    read, staged = runtime.decode_read(layer, query, meta)
    cache = world.caches[NAMES[index]]
    staging = staging_kv_view(staged.buffer, cache)
    # The backend writes this step's token into its staging slot too.
    slots = staging_slot_mapping(meta.slot_mapping[:nd], staged.plan.newest_slot, BLOCK)
    write_kv(staging, slots, *world.new_kv)
    plan, fixed = read.plan, staged.plan
    for r in range(nd):
        for j in range(int(plan.counts[r])):
            slot = r * fixed.width + j
            assert int(fixed.compact_block_table[r, j]) == slot
            torch.testing.assert_close(staging[slot], cache[int(plan.host_ids[r, j])])
    starts = meta.query_start_loc[: nd + 1]
    got = paged_attention(
        query, staging, starts, plan.sparse_seq_lens, fixed.compact_block_table
    )
    want = selected_attention(query, cache, plan)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return read, staged


# ------------------------------------------------------------------ widths
@pytest.mark.parametrize(
    "policy",
    [
        SelectionPolicy(alpha=float("inf"), budget_fraction=0.2, min_blocks=2),
        SelectionPolicy(alpha=2.0, budget_fraction=0.5, sink_blocks=2, min_blocks=0),
        SelectionPolicy(budget_fraction=0.3, max_blocks=3, recent_blocks=2),
        SelectionPolicy(budget_fraction=0.05, sink_blocks=3, recent_blocks=3),
    ],
)
def test_staging_width_holds_every_selection(policy: SelectionPolicy) -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        reqs = 1 + trial % 5
        seq_lens = torch.randint(1, 200, (reqs,), generator=gen)
        longest = int(num_blocks_of(seq_lens, BLOCK).max())
        scores = torch.randn(reqs, KV, longest, generator=gen) * (1 + trial)
        selection = select_blocks(scores, seq_lens, BLOCK, policy)
        width = staging_width(policy, longest, whole=False)
        assert int(selection.counts.max()) <= width <= longest
    assert staging_width(policy, 17, whole=True) == 17
    with pytest.raises(ValueError, match="max_blocks"):
        staging_width(policy, 0, whole=False)


def test_staging_width_is_the_budget_of_the_longest_request() -> None:
    policy = SelectionPolicy(budget_fraction=0.25, min_blocks=4)
    assert staging_width(policy, 100, whole=False) == 25  # a quarter of 100
    assert staging_width(policy, 12, whole=False) == 4  # min_blocks
    assert staging_width(policy, 3, whole=False) == 3  # short: every block


def test_whole_plan_reads_every_block_newest_last() -> None:
    table = torch.tensor([[5, 9, 2, 0], [7, 3, 0, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([10, 5])
    plan = whole_plan(table, seq_lens, 10, BLOCK)
    assert plan.counts.tolist() == [3, 2]
    assert plan.host_ids.tolist() == [[5, 9, 2], [7, 3, -1]]
    assert plan.sparse_seq_lens.tolist() == [10, 5]


def test_read_paged_keys_reads_lbnhc_views_in_position_order() -> None:
    cache = paged_caches({NAMES[1]})[NAMES[1]]
    gen = torch.Generator().manual_seed(1)
    slots = torch.tensor([4 * 5 + i for i in range(4)] + [4 * 9, 4 * 9 + 1])
    keys = torch.randn(6, KV, DIM, generator=gen)
    write_kv(cache, slots, keys, torch.zeros_like(keys))
    got = read_paged_keys(cache, torch.tensor([5, 9]))
    assert got.shape == (2 * BLOCK, KV, DIM)
    torch.testing.assert_close(got[:6], keys)


def test_to_device_moves_every_tensor_of_a_speculator() -> None:
    spec = speculator(3)
    moved = to_device(spec, torch.device("meta"))
    assert moved.query_weight.is_meta and moved.key_basis.is_meta
    assert moved.layer_skew.skew.is_meta and moved.layer_skew.channels.is_meta
    assert moved.residual_basis is not None and moved.residual_basis.is_meta
    assert moved.rope == spec.rope and moved.num_heads == spec.num_heads
    assert not spec.query_weight.is_meta  # the original is left as it was
    module = torch.nn.Linear(2, 2)
    assert to_device(module, torch.device("meta")) is module
    assert module.weight.is_meta
    assert to_device("text", torch.device("meta")) == "text"


# ----------------------------------------------------------------- runtime
def test_cuda_runtime_never_reads_in_place_and_speculates_ahead() -> None:
    world = World([30, 41])
    runtime = world.runtime
    assert not runtime.in_place and runtime.copier is None
    assert runtime.ahead  # query_source auto: lead time pays with a copy
    with pytest.raises(ValueError, match=r"'swap_mode' must be one of \['sync'"):
        runtime.reconfigure({"swap_mode": "in_place"})
    with pytest.raises(ValueError, match="'swap_mode'"):
        World([9], swap_mode="in_place")
    runtime.reconfigure({"swap_mode": "thread"})
    assert runtime.swap.mode == "thread" and runtime.swap.engine is None
    with pytest.raises(ValueError, match="'policy' must be one of .* got 'h2o'"):
        runtime.track(["quest", "h2o"])
    assert "h2o" not in runtime.policies


def test_sparse_decode_round_trip() -> None:
    world = World([61, 100, 7], budget=0.3, min_blocks=2)
    read, staged = _check_round_trip(world, 2)
    counts = read.plan.counts
    dense = num_blocks_of(torch.tensor(world.seq_lens), BLOCK)
    assert (counts <= dense).all() and (counts < dense).any()  # sparse
    longest = blocks_for(max(world.seq_lens), BLOCK)
    assert staged.plan.width == staging_width(world.runtime.selection, longest, False)
    assert not world.runtime.swap._inflight  # every started copy was used
    values = world.runtime.swap.counter_values()
    assert values["blocks_read"] == int(counts.sum())
    assert values["steps"] == 1


def test_dense_policy_reads_every_block_every_step() -> None:
    world = World([61, 100, 7], policy="dense")
    total = 0
    for index in (1, 2):
        read, staged = _check_round_trip(world, index)
        dense = num_blocks_of(torch.tensor(world.seq_lens), BLOCK)
        assert read.plan.counts.tolist() == dense.tolist()
        assert staged.plan.width == int(dense.max())
        total += int(dense.sum())
    stats = world.runtime.stats_snapshot()
    assert stats["swap_in"]["blocks_read"] == total
    assert stats["swap_in"]["bytes_read"] == total * BLOCK * KV * 2 * DIM * 4
    assert stats["staging_bytes"] > 0


def test_policy_choosing_at_attention_copies_there() -> None:
    world = World([61, 100, 7], policy="quest", budget=0.3, min_blocks=2)
    assert not world.runtime.ahead
    read, _ = _check_round_trip(world, 1)
    assert (read.plan.counts < num_blocks_of(torch.tensor([61, 100, 7]), BLOCK)).any()


def test_a_layer_without_kv_reads_every_block() -> None:
    world = World([30, 41], budget=0.2)
    runtime, layer = world.runtime, world.layer(1)
    layer.partial_cache = None  # as before the first KV write
    meta = world.decode_step()
    runtime.prefetch(layer, torch.zeros(2, HIDDEN), meta)
    assert layer.pending is None
    query = torch.zeros(2, HEADS, DIM)
    read, staged = runtime.decode_read(layer, query, meta)
    assert read.plan.counts.tolist() == [8, 11]
    assert staged.plan.width == 11


def test_hook_prefetches_from_the_forward_context() -> None:
    """Layer ``L-1``'s pre-hook finds layer ``L``'s metadata in vLLM's forward
    context and starts its swap-in; outside a step it does nothing."""
    from vllm.forward_context import ForwardContext, override_forward_context

    world = World([30, 41], budget=0.3, min_blocks=2)
    layer = world.layer(2)
    hook = prefetch_hook(world.runtime, layer)
    x = torch.randn(2, HIDDEN)
    hook(torch.nn.Linear(1, 1), (x,))
    assert layer.pending is None
    meta = world.decode_step()
    context = ForwardContext(
        no_compile_layers={}, attn_metadata={NAMES[2]: meta}, slot_mapping={}
    )
    with override_forward_context(context):
        hook(torch.nn.Linear(1, 1), (x,))
    assert layer.pending is not None
    assert layer.index in world.runtime.swap._inflight


def test_shutdown_releases_movement() -> None:
    world = World([30, 41])
    _check_round_trip(world, 1)
    world.runtime.shutdown()
    assert world.runtime.swap.engine is None and world.runtime.swap.pool is None


@pytest.mark.gpu
@pytest.mark.parametrize("swap_mode", ["sync", "thread"])
def test_round_trip_on_cuda(swap_mode: str) -> None:
    """The same round trip with device tensors: the Triton gather, and for
    ``thread`` the side stream and its event."""
    world = World([61, 100, 7], device="cuda", budget=0.3, swap_mode=swap_mode)
    for index in (1, 2):
        _check_round_trip(world, index)
    engine = world.runtime.swap.engine
    assert engine is not None and (engine.stream is not None) == (swap_mode == "thread")
