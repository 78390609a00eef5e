"""The runtime on small tensors, without an engine.

A runtime of three layers (layer 0 dense, layers 1 and 2 sparse) over a
host cache in vLLM's CPU layout (``[blocks, kv_heads, block_size, 2 *
head_dim]``, keys in plain order, read back by a plain key reader): KV
writes, the keep-everything path, sparse reads in place and through
staging against the method's own functions, counters, policy tracking and
run-time reconfiguration, and H2O's prefill observation.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.engine.tiny_model import BLOCK, DIM, HEADS, HIDDEN, KV, P, speculator
from vllm_infinigen.config import InfiniGenConfig
from vllm_infinigen.engine.layer_state import LayerInfo, SparseLayer
from vllm_infinigen.engine.placement import StagingPlan, plan_in_place
from vllm_infinigen.engine.policies.base import PolicyContext
from vllm_infinigen.engine.policies.h2o import H2OPolicy
from vllm_infinigen.engine.policies.registry import POLICIES, policy_class
from vllm_infinigen.engine.runtime import (
    InfiniGenRuntime,
    plan_kv_write,
    selection_policy,
)
from vllm_infinigen.method.partial_cache import partial_key_bytes
from vllm_infinigen.method.quant4 import PACKED_DTYPE, packed_width, unpack_int4
from vllm_infinigen.method.recall import attention_block_mass
from vllm_infinigen.method.scoring import (
    BlockScoreRule,
    block_scores,
    residual_block_bias,
)
from vllm_infinigen.method.selection import PAD, select_blocks

NUM_BLOCKS = 96


def _plain_reader(host: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    keys = host.index_select(0, ids.long())[..., :DIM]  # [n, kv, B, d]
    return keys.permute(0, 2, 1, 3).reshape(-1, KV, DIM)


class World:
    """A runtime, its host caches and a batch of requests written into them."""

    def __init__(
        self, seq_lens: list[int], device: str = "cpu", **options: Any
    ) -> None:
        infos = {
            0: LayerInfo(0, "layers.0.attn", 0.5, False, "first layer"),
            1: LayerInfo(1, "layers.1.attn", 0.5, True, ""),
            2: LayerInfo(2, "layers.2.attn", 0.5, True, ""),
        }
        # These tests drive InfiniGen one layer ahead (prepare_ahead) unless
        # they choose the query source themselves.
        options.setdefault("query_source", "speculated")
        self.context = PolicyContext(block_size=BLOCK, key_reader=_plain_reader)
        self.runtime = InfiniGenRuntime(
            InfiniGenConfig(**options),
            infos,
            {1: speculator(1, device), 2: speculator(2, device)},
            self.context,
        )
        gen = torch.Generator().manual_seed(7)
        self.host = {
            i: torch.zeros(NUM_BLOCKS, KV, BLOCK, 2 * DIM, device=device)
            for i in self.runtime.sparse
        }
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        width = (max(seq_lens) + BLOCK - 1) // BLOCK
        self.table = (
            torch.randperm(NUM_BLOCKS, generator=gen)[: len(seq_lens) * width]
            .view(len(seq_lens), width)
            .to(device=device, dtype=torch.int32)
        )
        self.keys: dict[int, list[torch.Tensor]] = {}
        for index in self.runtime.sparse:
            self.keys[index] = []
            for r, n in enumerate(seq_lens):
                key = torch.randn(n, KV, DIM, generator=gen).to(device)
                self.write(index, r, key, 0)
                self.keys[index].append(key)
        self.x = torch.randn(len(seq_lens), HIDDEN, generator=gen).to(device)

    def layer(self, index: int) -> SparseLayer:
        return self.runtime.sparse[index]

    def slots(self, r: int, start: int, count: int) -> torch.Tensor:
        pos = torch.arange(start, start + count, device=self.table.device)
        return self.table[r, pos // BLOCK].long() * BLOCK + pos % BLOCK

    def write(self, index: int, r: int, key: torch.Tensor, start: int) -> None:
        slots = self.slots(r, start, key.shape[0])
        host = self.host[index]
        view = host.permute(0, 2, 1, 3).reshape(NUM_BLOCKS * BLOCK, KV, 2 * DIM)
        view[slots, :, :DIM] = key
        host.copy_(view.view(NUM_BLOCKS, BLOCK, KV, 2 * DIM).permute(0, 2, 1, 3))
        # vLLM pads slot mappings with -1: the runtime must skip those.
        padded = torch.cat([slots, torch.full_like(slots[:1], -1)])
        key = torch.cat([key, torch.zeros_like(key[:1])])
        self.runtime.on_kv_write(self.layer(index), key, host, padded)

    def prepare(self, index: int) -> None:
        self.runtime.prepare_ahead(
            self.layer(index),
            self.x,
            self.table,
            self.seq_lens,
            int(self.seq_lens.max()),
            int(self.seq_lens.sum()),
        )


def test_kv_write_stores_partial_keys_at_their_slots() -> None:
    world = World([9, 21])
    for index in (1, 2):
        layer = world.layer(index)
        assert layer.partial_cache is not None
        flat = layer.partial_cache.view(NUM_BLOCKS * BLOCK, KV, P)
        for r, key in enumerate(world.keys[index]):
            want = layer.speculator.partial_keys(key)
            got = flat[world.slots(r, 0, key.shape[0])]
            torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_kv_write_keeps_each_blocks_residual_sum_and_restarts_it_on_reuse() -> None:
    world = World([9, 21])
    layer = world.layer(1)
    assert layer.residual_sums is not None
    spec = layer.speculator
    for r, key in enumerate(world.keys[1]):
        for j in range((key.shape[0] + BLOCK - 1) // BLOCK):
            want = spec.residual_keys(key[j * BLOCK : (j + 1) * BLOCK]).sum(0)
            got = layer.residual_sums[int(world.table[r, j])]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Request 0's first block is freed and reused by a new request: written
    # from its first slot again, it holds only the new tokens.
    block = int(world.table[0, 0])
    new = torch.randn(3, KV, DIM, generator=torch.Generator().manual_seed(3))
    world.write(1, 0, new, 0)
    torch.testing.assert_close(
        layer.residual_sums[block], spec.residual_keys(new).sum(0), rtol=1e-4, atol=1e-4
    )


def test_full_budget_in_place_takes_the_dense_path() -> None:
    world = World([30, 41], budget=1.0)
    world.prepare(1)
    layer = world.layer(1)
    assert layer.pending is None  # nothing prepared: vLLM's own path
    stats = world.runtime.stats_snapshot()["layers"]["1"]
    blocks = 8 + 11
    assert stats["steps"] == stats["dense_steps"] == 1
    assert stats["blocks_total"] == stats["blocks_selected"] == blocks
    assert stats["bytes_swapped"] == 0
    assert stats["kv_bytes_read"] == blocks * KV * BLOCK * 2 * DIM * 4


def test_dense_path_counts_from_host_ints_like_tensors() -> None:
    world = World([30, 41], budget=1.0)
    layer = world.layer(1)
    world.prepare(1)  # counted from the sequence lengths' tensor
    world.runtime.prepare_ahead(
        layer, None, world.table, world.seq_lens, 41, 71, total_blocks=8 + 11
    )
    stats = world.runtime.stats_snapshot()["layers"]["1"]
    assert stats["dense_steps"] == 2 and stats["decode_requests"] == 4
    assert stats["blocks_total"] == stats["blocks_selected"] == 2 * (8 + 11)
    world.runtime.reset_stats()
    assert world.runtime.stats_snapshot()["total"]["blocks_total"] == 0


def test_kv_write_plan_skips_padding_and_finds_fresh_blocks() -> None:
    slots = torch.tensor([5, -1, 32, 33, -1, 48], dtype=torch.int32)
    write = plan_kv_write(slots, 16)
    assert write.tokens == 6
    assert write.rows is not None and write.rows.tolist() == [0, 2, 3, 5]
    assert write.slots.tolist() == [5, 32, 33, 48]
    assert write.fresh.tolist() == [2, 3]
    whole = plan_kv_write(torch.tensor([7, 8]), 16)
    assert whole.rows is None and whole.fresh.numel() == 0
    # A planned write stores what an unplanned one does.
    world = World([9])
    layer = world.layer(1)
    assert layer.partial_cache is not None
    key = torch.randn(3, KV, DIM)
    padded = torch.cat([world.slots(0, 9, 2), torch.tensor([-1])])
    before = layer.partial_cache.clone()
    world.runtime.on_kv_write(layer, key, world.host[1], padded)
    once = layer.partial_cache.clone()
    layer.partial_cache.copy_(before)
    plan = plan_kv_write(padded, BLOCK)
    world.runtime.on_kv_write(layer, key, world.host[1], padded, plan)
    assert torch.equal(layer.partial_cache, once)
    assert not torch.equal(once, before)


def test_short_requests_take_the_dense_path_at_a_small_budget() -> None:
    # min_blocks 8: requests of at most 8 blocks are read whole.
    world = World([20, 32], budget=0.2)
    world.prepare(1)
    assert world.layer(1).pending is None
    assert world.runtime.stats_snapshot()["total"]["dense_steps"] == 1


def test_short_steps_read_everything_until_selection_pays() -> None:
    world = World([61, 100], budget=0.3, min_blocks=2, sparse_min_tokens=200)
    assert not world.runtime.needs_input(161)
    world.prepare(1)  # 161 context tokens: below the threshold
    assert world.layer(1).pending is None
    world.runtime.reconfigure({"sparse_min_tokens": 100})
    assert world.runtime.needs_input(161)
    world.prepare(1)
    assert world.layer(1).pending is not None
    total = world.runtime.stats_snapshot()["total"]
    assert total["steps"] == 2 and total["dense_steps"] == 1
    with pytest.raises(ValueError, match="'sparse_min_tokens' must be an integer"):
        world.runtime.reconfigure({"sparse_min_tokens": -1})


def test_platform_default_applies_when_unset() -> None:
    world = World([61, 100], budget=0.3, min_blocks=2)
    world.context.sparse_min_tokens = 1000
    assert world.runtime.sparse_min_tokens == 1000
    world.prepare(1)
    assert world.layer(1).pending is None
    world.runtime.reconfigure({"sparse_min_tokens": 0})
    world.prepare(1)
    assert world.layer(1).pending is not None


@pytest.mark.parametrize("policy", ["infinigen", "streaming", "h2o"])
def test_sparse_read_in_place_matches_the_method(policy: str) -> None:
    world = World([61, 100, 7], budget=0.3, min_blocks=2, policy=policy)
    world.prepare(2)
    layer = world.layer(2)
    read = world.runtime.take(layer)
    assert read is not None and read.handle is None
    runtime = world.runtime
    width = 25
    table = world.table[:, :width]
    if policy == "infinigen":
        spec = layer.speculator
        full = spec.speculate_full(world.x, (world.seq_lens - 1).long())
        assert full is not None and layer.partial_cache is not None
        assert layer.residual_sums is not None
        bias = residual_block_bias(
            spec.residual_query(full),
            layer.residual_sums,
            table,
            world.seq_lens,
            BLOCK,
            0.5,
        )
        scores = block_scores(
            spec.partial_query(full),
            layer.partial_cache,
            table,
            world.seq_lens,
            0.5,
            block_bias=bias,
        )
    else:
        scores = runtime.policy.scores_ahead(
            layer, world.x, table, world.seq_lens, runtime.selection
        )
    selection = select_blocks(scores, world.seq_lens, BLOCK, runtime.selection)
    want = plan_in_place(selection, table, world.seq_lens, BLOCK)
    assert torch.equal(read.plan.host_ids, want.host_ids)
    assert torch.equal(read.plan.sparse_seq_lens, want.sparse_seq_lens)
    counts = read.plan.counts.tolist()
    n_blocks = [16, 25, 2]
    for r, n in enumerate(n_blocks):
        assert counts[r] <= max(-(-3 * n // 10), min(n, 2)) + 2  # + forced
        ids = read.plan.host_ids[r, : counts[r]]
        assert int(ids[-1]) == int(world.table[r, n - 1])  # newest last
        assert (read.plan.host_ids[r, counts[r] :] == PAD).all()
    # Counters: every selected block counted once.
    assert layer.counters is not None
    assert int(layer.counters.sum()) == sum(counts)
    stats = runtime.stats_snapshot()["layers"]["2"]
    assert stats["blocks_selected"] == sum(counts)
    assert stats["blocks_total"] == sum(n_blocks)
    assert stats["steps"] == 1 and stats["dense_steps"] == 0


@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_staging_copies_what_in_place_reads(mode: str) -> None:
    staged = World([61, 100], budget=0.3, min_blocks=2, swap_mode=mode)
    in_place = World([61, 100], budget=0.3, min_blocks=2)
    try:
        staged.prepare(1)
        in_place.prepare(1)
        a = in_place.runtime.take(in_place.layer(1))
        b = staged.runtime.take(staged.layer(1))
        assert a is not None and b is not None and b.handle is not None
        assert isinstance(b.plan, StagingPlan)
        assert torch.equal(a.plan.host_ids, b.plan.host_ids)
        # This step's newest token is written after the copy started.
        staged.write(1, 0, torch.ones(1, KV, DIM), 60)
        buffer = staged.runtime.finish_staging(staged.layer(1), b)
        host = staged.host[1]
        src = b.staging.src_block_ids
        assert torch.equal(buffer[: src.numel()], host[src])
        snap = staged.runtime.stats_snapshot()
        assert snap["total"]["bytes_swapped"] == snap["total"]["kv_bytes_read"] > 0
        assert snap["staging_peak_blocks"] == src.numel()
    finally:
        staged.runtime.shutdown()


def test_full_budget_through_staging_copies_every_block() -> None:
    world = World([30, 41], budget=1.0, swap_mode="sync")
    world.prepare(1)
    read = world.runtime.take(world.layer(1))
    assert read is not None and read.handle is not None
    assert read.plan.counts.tolist() == [8, 11]


def test_fresh_blocks_reset_their_counters() -> None:
    world = World([61, 100], budget=0.3, min_blocks=2)
    world.prepare(1)
    layer = world.layer(1)
    assert layer.counters is not None
    first = int(world.table[0, 0])
    assert int(layer.counters[first]) == 1  # the sink block
    world.write(1, 0, torch.randn(2, KV, DIM), 0)  # block reused from slot 0
    assert int(layer.counters[first]) == 0


def test_reconfigure_switches_policy_and_refuses_bad_options() -> None:
    world = World([61, 100])
    runtime = world.runtime
    assert runtime.track(["quest"]) == ["infinigen", "quest"]
    effective = runtime.reconfigure({"policy": "quest", "budget": 0.5})
    assert effective["policy"] == "quest" and effective["budget"] == 0.5
    assert runtime.selection.alpha == float("inf")  # peers take pure top-k
    assert not runtime.policy.ahead
    world.prepare(1)  # Quest chooses at attention, not one layer ahead
    assert world.layer(1).pending is None
    with pytest.raises(ValueError, match="'partial_ratio' is fixed at start-up"):
        runtime.reconfigure({"partial_ratio": 0.5})
    with pytest.raises(ValueError, match=r"'budget' must be a number in \(0.0, 1.0\]"):
        runtime.reconfigure({"budget": 0})
    with pytest.raises(ValueError, match="'policy' must be one of"):
        runtime.track(["bogus"])
    assert runtime.config.policy == "quest"  # a refused change changes nothing
    runtime.reconfigure({"policy": "infinigen"})
    world.prepare(1)
    with pytest.raises(RuntimeError, match="during a step"):
        runtime.reconfigure({"budget": 0.3})


def test_h2o_needs_a_key_reader() -> None:
    with pytest.raises(ValueError, match="'policy' h2o"):
        H2OPolicy(PolicyContext(block_size=BLOCK)).check_supported()


def test_registry_names_every_policy_class() -> None:
    for name in POLICIES:
        assert policy_class(name).name == name
    with pytest.raises(ValueError, match="'policy' must be one of"):
        policy_class("bogus")


def test_selection_policy_threshold_only_for_infinigen() -> None:
    config = InfiniGenConfig(alpha=5.0)
    for name in POLICIES:
        policy = policy_class(name)(PolicyContext(block_size=BLOCK))
        alpha = selection_policy(config, policy).alpha
        assert alpha == (5.0 if name == "infinigen" else float("inf")), name
    # alpha is a margin of mass: the peak rule takes its top-k whole.
    infinigen = policy_class("infinigen")(PolicyContext(block_size=BLOCK))
    for options in ({"score_rule": "max"}, {"partial_ratio": 1.0}):
        peak = selection_policy(InfiniGenConfig(alpha=5.0, **options), infinigen)
        assert peak.score_rule is BlockScoreRule.MAX, options
        assert peak.alpha == float("inf"), options
    mass = selection_policy(InfiniGenConfig(partial_ratio=0.3), infinigen)
    assert mass.score_rule is BlockScoreRule.LOG_MASS and mass.alpha == 8.0


def test_h2o_prefill_observation_counts_rows_once() -> None:
    """Observed prefill rows give each KV head one unit of mass per row; the
    rows of the prompt's last block go to the live mass only."""
    world = World([61], policy="h2o")
    layer = world.layer(1)
    h2o = world.runtime.policy
    assert isinstance(h2o, H2OPolicy)
    query = torch.randn(61, HEADS, DIM)
    h2o.observe_prefill(
        layer,
        query,
        torch.tensor([0, 61]),
        world.seq_lens,
        world.table,
        [0],
    )
    mass = h2o.mass[1].sum(0)
    prefill = h2o.prefill_mass[1].sum(0)
    torch.testing.assert_close(mass, torch.full((KV,), 16.0))
    # Rows at positions >= 60 (the last block holds 60..60) are left out.
    torch.testing.assert_close(prefill, torch.full((KV,), 15.0))
    world.runtime.reconfigure({"budget": 0.3})  # a new run: back to prefill's
    torch.testing.assert_close(h2o.mass[1].sum(0), prefill)


def test_swap_mode_switches_between_requests() -> None:
    world = World([61, 100], budget=0.3, min_blocks=2)
    runtime = world.runtime
    assert runtime.copier is None
    runtime.reconfigure({"swap_mode": "thread"})
    world.prepare(1)
    read = runtime.take(world.layer(1))
    assert read is not None and read.handle is not None
    runtime.finish_staging(world.layer(1), read)
    runtime.reconfigure({"swap_mode": "in_place"})
    assert runtime.copier is None
    world.prepare(1)
    read = runtime.take(world.layer(1))
    assert read is not None and read.handle is None


def test_real_query_source_chooses_at_attention_from_the_layers_query() -> None:
    world = World([61, 100, 7], budget=0.3, min_blocks=2, query_source="real")
    runtime = world.runtime
    assert not runtime.ahead and not runtime.needs_input(168)
    world.prepare(2)  # nothing one layer ahead
    layer = world.layer(2)
    assert layer.pending is None
    # The layer's real query: RoPE of the projection the speculator predicts.
    spec = layer.speculator
    positions = (world.seq_lens - 1).long()
    query = torch.nn.functional.linear(world.x, spec.query_weight, spec.query_bias)
    query = query.view(3, HEADS, DIM)
    assert spec.rope is not None
    query = spec.rope(positions, query)
    # Its partial channels are what speculation computes from the same input.
    torch.testing.assert_close(
        spec.partial_query(query), spec.speculate(world.x, positions)
    )
    read = runtime.prepare_at_attention(
        layer, query, world.table, world.seq_lens, 100, 168
    )
    assert read is not None
    runtime.reconfigure({"query_source": "speculated"})
    assert runtime.ahead
    world.prepare(2)
    ahead = runtime.take(layer)
    assert ahead is not None  # same query, same blocks
    assert torch.equal(ahead.plan.host_ids, read.plan.host_ids)


def _assert_choices_agree(full: World, rounded: World) -> None:
    """Layer 2's blocks chosen from full-precision and from rounded partial
    keys: rounding may swap blocks of nearly equal score; most choices
    agree."""
    full.prepare(2)
    rounded.prepare(2)
    a = full.runtime.take(full.layer(2))
    b = rounded.runtime.take(rounded.layer(2))
    assert a is not None and b is not None
    same = (a.plan.host_ids == b.plan.host_ids).float().mean()
    assert float(same) >= 0.8


def test_half_precision_partial_keys_choose_like_full_precision() -> None:
    full = World([61, 100, 7], budget=0.3, min_blocks=2, partial_dtype="float32")
    half = World([61, 100, 7], budget=0.3, min_blocks=2)  # auto: bfloat16
    layer = half.layer(2)
    assert layer.partial_cache is not None
    assert layer.partial_cache.dtype == torch.bfloat16
    assert full.layer(2).partial_cache is not None
    torch.testing.assert_close(
        layer.partial_cache.float(),
        full.layer(2).partial_cache,  # type: ignore[arg-type]
        rtol=1e-2,
        atol=1e-2,
    )
    _assert_choices_agree(full, half)
    with pytest.raises(ValueError, match="fixed at start-up"):
        half.runtime.reconfigure({"partial_dtype": "float32"})


def test_4_bit_partial_keys_are_packed_and_choose_like_full_precision() -> None:
    full = World([61, 100, 7], budget=0.3, min_blocks=2, partial_dtype="float32")
    packed = World([61, 100, 7], budget=0.3, min_blocks=2, partial_dtype="int4")
    layer = packed.layer(2)
    assert layer.partial_cache is not None and full.layer(2).partial_cache is not None
    assert layer.partial_cache.dtype == PACKED_DTYPE
    assert layer.partial_cache.shape == (NUM_BLOCKS, BLOCK, KV, packed_width(P))
    # Each slot holds its key quantized: within half a step of the floats.
    want = full.layer(2).partial_cache
    got = unpack_int4(layer.partial_cache, P)
    step = want.abs().amax(-1, keepdim=True) / 7
    assert bool(((got - want).abs() <= step / 2 * 1.01 + 1e-6).all())
    # The stats count the packed bytes.
    stats = packed.runtime.stats_snapshot()
    assert stats["partial_cache_bytes"] == 2 * NUM_BLOCKS * BLOCK * KV * (
        partial_key_bytes(PACKED_DTYPE, P)
    )
    _assert_choices_agree(full, packed)


def test_auto_query_source_is_real_in_place_and_speculated_with_staging() -> None:
    world = World([61, 100], budget=0.3, min_blocks=2, query_source="auto")
    assert world.runtime.in_place and not world.runtime.ahead
    world.runtime.reconfigure({"swap_mode": "sync"})
    assert world.runtime.ahead
    world.runtime.reconfigure({"policy": "quest"})
    assert not world.runtime.ahead  # Quest always chooses at attention
    world.runtime.shutdown()


def test_step_counters_histograms_and_sampled_recall() -> None:
    world = World(
        [40, 65],
        budget=0.4,
        min_blocks=0,
        sparse_min_tokens=0,
        recall_sample_rate=1.0,
    )
    runtime = world.runtime
    query = torch.randn(2, HEADS, DIM, generator=torch.Generator().manual_seed(3))
    sampled, shares = [], []
    for _ in range(4):
        for index in (1, 2):
            layer = world.layer(index)
            world.prepare(index)
            read = runtime.take(layer)
            assert read is not None
            if runtime.recall_due(layer):
                row = runtime._recall_turn % 2
                share = runtime.sample_recall(
                    layer, query, world.table, world.seq_lens, read
                )
                # Reference: the exact block masses of that request, summed
                # over the blocks whose host ids the plan reads.
                tokens = int(world.seq_lens[row])
                mass = attention_block_mass(
                    query[row : row + 1],
                    world.keys[index][row],
                    torch.tensor([tokens]),
                    BLOCK,
                    0.5,
                )[0]
                count = int(read.plan.counts[row])
                chosen = set(read.plan.host_ids[row, :count].tolist())
                blocks = world.table[row, : mass.shape[0]].tolist()
                want = sum(
                    float(m) for m, b in zip(mass, blocks, strict=True) if b in chosen
                )
                assert share == pytest.approx(want, abs=1e-5)
                assert 0.0 < share < 1.0  # 40% of the blocks: not all the mass
                sampled.append((index, row))
                shares.append(share)
            runtime.layer_done(layer)
    steps = runtime.steps
    assert (steps.sparse_steps, steps.sparse_requests) == (4, 8)
    assert (steps.whole_steps, steps.whole_requests) == (0, 0)
    # one sample per step, the layers and the requests in turn
    assert [i for i, _ in sampled] == [1, 2, 1, 2]
    assert len({r for _, r in sampled}) == 2
    assert steps.recall.count == 4 and sum(steps.recall.counts) == 4
    assert steps.last_recall == pytest.approx(shares[-1])
    assert steps.recall.total == pytest.approx(sum(shares))
    assert steps.selection_s.count == 4 and steps.selection_s.total > 0
    assert steps.swap_wait_s.count == 0  # in place: no staging copy
    snap = runtime.stats_snapshot()
    assert snap["steps"]["recall"]["count"] == 4
    assert snap["device_tier_bytes"] >= snap["partial_cache_bytes"] > 0


def test_read_whole_steps_are_counted_and_not_sampled() -> None:
    world = World([40, 65], budget=1.0, recall_sample_rate=1.0)
    runtime = world.runtime
    for _ in range(3):
        for index in (1, 2):
            world.prepare(index)
            runtime.layer_done(world.layer(index))
    steps = runtime.steps
    assert (steps.whole_steps, steps.whole_requests) == (3, 6)
    assert steps.sparse_steps == 0
    assert steps.recall.count == 0 and steps.selection_s.count == 0
    runtime.reset_stats()
    assert runtime.steps.whole_steps == 0


def test_recall_sampling_rate_spaces_the_samples() -> None:
    world = World(
        [40, 65], budget=0.4, min_blocks=0, sparse_min_tokens=0, recall_sample_rate=0.25
    )
    runtime = world.runtime
    due = []
    for _ in range(8):
        for index in (1, 2):
            layer = world.layer(index)
            world.prepare(index)
            read = runtime.take(layer)
            due.append(runtime.recall_due(layer))
            if due[-1]:
                assert read is not None
                runtime.sample_recall(
                    layer, torch.randn(2, HEADS, DIM), world.table, world.seq_lens, read
                )
            runtime.layer_done(layer)
    assert sum(due) == 2  # every 4th of 8 steps
    assert runtime.steps.recall.count == 2


def test_reset_stats_restarts_the_recall_schedule() -> None:
    """After a reset the first sparse step samples the first sparse layer,
    whatever ran before: windows of counters are comparable."""
    world = World(
        [40, 65], budget=0.4, min_blocks=0, sparse_min_tokens=0, recall_sample_rate=1.0
    )
    runtime = world.runtime

    def sampled_layers(steps: int = 3) -> list[int]:
        sampled = []
        for _ in range(steps):
            for index in (1, 2):
                layer = world.layer(index)
                world.prepare(index)
                runtime.take(layer)
                if runtime.recall_due(layer):
                    sampled.append(index)
                runtime.layer_done(layer)
        return sampled

    fresh = sampled_layers()
    assert fresh == [1, 2, 1]  # the layers in turn, one per step
    runtime.reset_stats()  # without it the next window samples 2, 1, 2
    assert sampled_layers() == fresh
