"""The start-up probe of decode costs, and the threshold it gives the runtime
when ``sparse_min_tokens`` is unset."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_runtime import World
from vllm_infinigen.engine.cost_probe import (
    CPU_BLOCK_SIZES,
    NEVER,
    StepCosts,
    choose_block_size,
    probe_block_size,
    probe_step_costs,
)
from vllm_infinigen.method.quant4 import PACKED_DTYPE
from vllm_infinigen.method.scoring import block_scores
from vllm_infinigen.method.selection import SelectionPolicy

COSTS = StepCosts(
    dense_us_per_token=0.2,
    choose_fixed_ms=0.5,
    choose_us_per_token=0.05,
    read_us_per_token=0.04,
    budget=0.2,
    margin=0.1,
)


def test_threshold_is_where_the_saved_kernel_time_pays_for_choosing() -> None:
    # Saved per token at budget 0.2: 0.9 * 0.2 - 0.05 - 0.04 = 0.09 us, so
    # the 500 us of fixed cost are paid from 5556 tokens.
    assert COSTS.threshold(0.2) == 5556
    # At budget 0.1 the read costs half: 0.9 * 0.2 - 0.05 - 0.02 = 0.11 us.
    assert COSTS.threshold(0.1) == 4546
    # Reading everything, or a machine where choosing costs what it saves:
    # never sparse.
    assert COSTS.threshold(1.0) == NEVER
    slow = StepCosts(0.2, 0.5, 0.14, 0.04, 0.2, 0.1)
    assert slow.threshold(0.2) == NEVER


def test_probe_times_vllms_kernel_both_ways() -> None:
    selection = SelectionPolicy(budget_fraction=0.2)
    costs = probe_step_costs(
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        d_partial=64,
        block_size=32,
        dtype=torch.float32,
        partial_dtype=PACKED_DTYPE,
        score=block_scores,
        selection=selection,
        contexts=(1024, 2048, 4096),
        copies=2,
        repeats=3,
    )
    assert costs.budget == 0.2
    assert costs.dense_us_per_token > 0.0
    # The kernel over a fifth of the blocks reads fewer bytes per context
    # token than over all of them.
    assert 0.0 <= costs.read_us_per_token < costs.dense_us_per_token
    assert costs.choose_fixed_ms >= 0.0 and costs.choose_us_per_token >= 0.0
    assert set(costs.to_dict()) >= {"dense_us_per_token", "margin"}


def test_measured_costs_set_the_threshold_when_unset() -> None:
    world = World([61, 100], budget=0.3, min_blocks=2)
    world.context.sparse_min_tokens = 0
    world.context.step_costs = COSTS
    assert world.runtime.sparse_min_tokens == COSTS.threshold(0.3)
    world.prepare(1)  # 161 tokens: far below the measured threshold
    assert world.layer(1).pending is None
    snapshot = world.runtime.stats_snapshot()
    assert snapshot["sparse_min_tokens"] == COSTS.threshold(0.3)
    assert snapshot["step_costs"] == COSTS.to_dict()
    world.runtime.reconfigure({"budget": 0.1})
    assert world.runtime.sparse_min_tokens == COSTS.threshold(0.1)
    # An explicit value wins over the measurement.
    world.runtime.reconfigure({"sparse_min_tokens": 0})
    world.prepare(1)
    assert world.layer(1).pending is not None


def test_never_is_reported_as_infinite() -> None:
    world = World([61, 100], budget=1.0, min_blocks=2)
    world.context.step_costs = COSTS
    assert world.runtime.sparse_min_tokens == NEVER
    assert world.runtime.stats_snapshot()["sparse_min_tokens"] == float("inf")


def test_measured_costs_are_exported_as_gauges() -> None:
    from vllm_infinigen.serving.metrics import metric_families

    world = World([61, 100], budget=0.3, min_blocks=2)
    world.context.step_costs = COSTS
    families = {
        f.name: f for f in metric_families([world.runtime.stats_snapshot()], "m")
    }
    threshold = families["vllm:infinigen_sparse_min_tokens"].samples[0].value
    assert threshold == COSTS.threshold(0.3)
    per_token = families["vllm:infinigen_decode_cost_seconds_per_token"].samples
    values = {s.labels["path"]: s.value for s in per_token}
    assert values == pytest.approx(
        {"dense": 0.2e-6, "choose": 0.05e-6, "read": 0.04e-6}
    )
    fixed = families["vllm:infinigen_decode_cost_choose_fixed_seconds"].samples
    assert fixed[0].value == pytest.approx(0.5e-3)


def test_block_size_is_the_smallest_near_the_fastest() -> None:
    # 32 within 3% of the fastest: the more precise size wins.
    assert choose_block_size({32: 1.02, 64: 1.0, 128: 1.1}, 0.03) == 32
    # A kernel clearly faster at a larger block decides it.
    assert choose_block_size({32: 1.25, 64: 1.11, 128: 1.0}, 0.03) == 128
    assert choose_block_size({32: 1.2, 64: 1.0, 128: 1.01}, 0.03) == 64


def test_block_size_probe_times_every_candidate() -> None:
    choice = probe_block_size.__wrapped__(14, 2, 64, torch.float32, repeats=2)
    assert set(choice.ms) == set(CPU_BLOCK_SIZES)
    assert all(ms > 0.0 for ms in choice.ms.values())
    assert choice.block_size == choose_block_size(choice.ms, choice.tolerance)
    # The log line names the choice and every measurement.
    text = choice.describe()
    assert f"block_size={choice.block_size}" in text
    assert all(f"{size}: " in text for size in CPU_BLOCK_SIZES)


def test_sparse_pays_counts_what_the_selection_still_reads() -> None:
    # Reading a token costs what the dense kernel pays for it; choosing
    # costs 1 us a step: sparse pays while it reads under 0.9 of the context.
    costs = StepCosts(0.2, 0.001, 0.0, 0.04, 0.2, 0.1)
    assert costs.pays(1000, 300, 0.3)
    assert not costs.pays(1000, 900, 0.3)
    assert not costs.pays(1000, 300, 1.0)  # the budget reads everything


@pytest.mark.parametrize(("min_blocks", "sparse"), [(2, True), (20, False)])
def test_requests_near_their_block_floor_keep_the_step_dense(
    min_blocks: int, sparse: bool
) -> None:
    # 161 tokens in 4-token blocks (16 and 25 blocks), budget 0.3: far past
    # the measured threshold (9 tokens). With a floor of 2 blocks the
    # selection reads 52 tokens; with a floor of 20 it would read 141 of
    # 161, which costs more than the dense kernel saves.
    world = World([61, 100], budget=0.3, min_blocks=min_blocks)
    world.context.sparse_min_tokens = 0
    world.context.step_costs = StepCosts(0.2, 0.001, 0.0, 0.04, 0.2, 0.1)
    assert world.runtime.sparse_min_tokens == 9
    world.prepare(1)
    assert (world.layer(1).pending is not None) is sparse
