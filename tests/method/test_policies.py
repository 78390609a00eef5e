"""The peer policies' block scores against direct computations."""

from __future__ import annotations

import math

import torch

from vllm_infinigen.method import SelectionPolicy, select_blocks
from vllm_infinigen.method.policies import (
    attention_block_mass,
    h2o_block_scores,
    new_key_bounds,
    quest_block_scores,
    streaming_block_scores,
    update_key_bounds,
)

BS = 4


def _bounds_from(keys: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Write ``keys`` (``[tokens, kv, d]``) from slot 0 in two chunks."""
    bounds = new_key_bounds(num_blocks, keys.shape[1], keys.shape[2])
    slots = torch.arange(keys.shape[0])
    update_key_bounds(bounds, keys[:5], slots[:5], BS)
    update_key_bounds(bounds, keys[5:], slots[5:], BS)
    return bounds


def test_key_bounds_are_block_min_and_max() -> None:
    torch.manual_seed(0)
    keys = torch.randn(10, 2, 3)
    bounds = _bounds_from(keys, 4)
    for block in range(3):
        part = keys[block * BS : (block + 1) * BS]
        assert torch.equal(bounds[block, 0], part.amin(0))
        assert torch.equal(bounds[block, 1], part.amax(0))
    assert torch.isinf(bounds[3]).all()  # never written
    # A block written again from its first slot (freed and reused) restarts.
    fresh = torch.randn(1, 2, 3)
    update_key_bounds(bounds, fresh, torch.tensor([BS]), BS)
    assert torch.equal(bounds[1, 0], fresh[0]) and torch.equal(bounds[1, 1], fresh[0])


def test_quest_score_bounds_every_logit_of_its_block() -> None:
    torch.manual_seed(1)
    keys = torch.randn(12, 2, 8)
    bounds = _bounds_from(keys, 3)
    query = torch.randn(1, 4, 8)  # 2 query heads per KV head
    scale = 0.5
    scores = quest_block_scores(
        query, bounds, torch.tensor([[0, 1, 2]]), torch.tensor([12]), BS, scale
    )
    assert scores.shape == (1, 2, 3)
    for head in range(2):
        for block in range(3):
            k = keys[block * BS : (block + 1) * BS, head]  # [BS, d]
            q = query[0, head * 2 : head * 2 + 2] * scale  # [2, d]
            low, high = bounds[block, 0, head], bounds[block, 1, head]
            upper = torch.maximum(q * low, q * high)
            expected = torch.logsumexp(upper.sum(-1), 0) - math.log(2)
            assert torch.allclose(scores[0, head, block], expected, atol=1e-5)
            assert ((q @ k.T).amax(1) <= upper.sum(-1) + 1e-5).all()


def test_streaming_keeps_sinks_and_newest() -> None:
    lens = torch.tensor([40, 17])
    scores = streaming_block_scores(lens, BS, 10, 2)
    policy = SelectionPolicy(alpha=math.inf, budget_fraction=0.4, min_blocks=0)
    sel = select_blocks(scores, lens, BS, policy)
    assert sel.indices[0, : sel.counts[0]].tolist() == [0, 7, 8, 9]
    assert sel.indices[1, : sel.counts[1]].tolist() == [0, 4]


def test_h2o_keeps_heavy_blocks_and_a_recent_half() -> None:
    mass = torch.zeros(20, 1)
    mass[3] = 5.0
    mass[5] = 4.0
    mass[1] = 3.0
    table = torch.arange(10)[None, :]
    lens = torch.tensor([40])
    policy = SelectionPolicy(alpha=math.inf, budget_fraction=0.6, min_blocks=0)
    scores = h2o_block_scores(mass, table, lens, BS, policy)
    sel = select_blocks(scores, lens, BS, policy)
    # budget 6: sink 0, recent half 3 blocks (7, 8, 9), heaviest 3 and 5
    assert sel.indices[0, : sel.counts[0]].tolist() == [0, 3, 5, 7, 8, 9]


def test_attention_block_mass_is_causal_and_sums_to_rows() -> None:
    torch.manual_seed(2)
    keys = torch.randn(12, 2, 8)
    query = torch.randn(3, 4, 8)
    positions = torch.tensor([3, 7, 9])
    mass = attention_block_mass(query, keys, positions, 10, BS, 0.3)
    assert mass.shape == (3, 2)
    assert torch.allclose(mass.sum(0), torch.full((2,), 3.0), atol=1e-5)
    only_first = attention_block_mass(query[:1], keys, positions[:1], 10, BS, 0.3)
    assert torch.allclose(only_first[0], torch.ones(2), atol=1e-6)
    assert (only_first[1:] == 0).all()
