"""Recall measurement helpers, and LOG_MASS block scores against true mass."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vllm_infinigen.method.recall import (
    attention_block_mass,
    build_paged_cache,
    oracle_selection,
    random_selection,
    selected_share,
    selection_mass,
    window_selection,
)
from vllm_infinigen.method.scoring import BlockScoreRule, block_scores
from vllm_infinigen.method.selection import PAD, num_blocks_of


def _qk(
    tokens: int = 70, heads: int = 4, kv: int = 2, dim: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, heads, dim, generator=g) * 2, torch.randn(tokens, kv, dim)


def test_block_mass_matches_a_loop() -> None:
    q, k = _qk()
    seq_lens = torch.tensor([70, 33, 1])
    mass = attention_block_mass(q, k, seq_lens, 16, 0.5)
    assert mass.shape == (3, 5)
    torch.testing.assert_close(mass.sum(1), torch.ones(3, dtype=torch.float64))
    for r in range(3):
        n = int(seq_lens[r])
        expected = torch.zeros(5, dtype=torch.float64)
        for h in range(4):
            logits = (k[:n, h // 2].double() @ q[r, h].double()) * 0.5
            probs = logits.softmax(0)
            for t in range(n):
                expected[t // 16] += probs[t] / 4
        torch.testing.assert_close(mass[r], expected)


def test_log_mass_scores_with_full_keys_equal_true_mass() -> None:
    """Full channels + real queries: exp(LOG_MASS) averaged over KV heads is
    exactly the attention mass the recall is measured against."""
    q, k = _qk(seed=3)
    seq_lens = torch.tensor([70, 40, 17])
    cache, table = build_paged_cache(k, 16, 3, torch.Generator().manual_seed(1))
    scores = block_scores(q, cache, table, seq_lens, 0.5, BlockScoreRule.LOG_MASS)
    estimated = scores.double().exp().mean(dim=1)
    torch.testing.assert_close(
        estimated, attention_block_mass(q, k, seq_lens, 16, 0.5), atol=1e-6, rtol=1e-5
    )


def test_oracle_is_the_best_set_of_its_size() -> None:
    q, k = _qk(tokens=80, seed=5)
    seq_lens = torch.tensor([80, 80, 50])
    mass = attention_block_mass(q, k, seq_lens, 16, 1.0)
    counts = torch.tensor([2, 3, 1])
    oracle = oracle_selection(mass, seq_lens, 16, counts)
    assert oracle.counts.tolist() == [2, 3, 1]
    got = selection_mass(mass, oracle)
    for r in range(3):
        n = int(num_blocks_of(seq_lens[r : r + 1], 16))
        best = max(
            float(mass[r, list(c)].sum())
            for c in itertools.combinations(range(n), int(counts[r]))
        )
        assert math.isclose(float(got[r]), best, rel_tol=1e-9)


def test_random_and_window_baselines_have_the_requested_size() -> None:
    seq_lens = torch.tensor([160, 40, 16])
    counts = torch.tensor([4, 2, 1])
    gen = torch.Generator().manual_seed(0)
    rand = random_selection(10, seq_lens, 16, counts, gen)
    assert rand.counts.tolist() == [4, 2, 1]
    n = num_blocks_of(seq_lens, 16)
    for r in range(3):
        picked = rand.indices[r, : int(rand.counts[r])]
        assert bool((picked < n[r]).all()) and len(set(picked.tolist())) == len(picked)
    window = window_selection(10, seq_lens, 16, counts, sink_blocks=1)
    assert window.indices[0, :4].tolist() == [0, 7, 8, 9]
    assert window.indices[1, :2].tolist() == [0, 2]
    assert window.indices[2, :1].tolist() == [0]
    assert bool((window.indices[0, 4:] == PAD).all())


def test_selection_mass_ignores_padding() -> None:
    mass = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    oracle = oracle_selection(mass, torch.tensor([48]), 16, torch.tensor([1]))
    assert oracle.indices.tolist() == [[0, PAD, PAD]]
    assert float(selection_mass(mass, oracle)[0]) == 0.5


def test_selected_share_is_the_selected_blocks_exact_mass() -> None:
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, dim, block, tokens = 6, 2, 16, 8, 45  # 6 blocks, last partial
    query = torch.randn(heads, dim, generator=gen)
    keys = torch.randn(tokens, kv_heads, dim, generator=gen)
    mass = attention_block_mass(query[None], keys, torch.tensor([tokens]), block, 0.25)[
        0
    ]
    selected = torch.tensor([True, False, False, True, False, True])
    share = selected_share(query, keys, selected, block, 0.25)
    assert float(share) == pytest.approx(float(mass[selected].sum()), abs=1e-5)
    every = selected_share(query, keys, torch.ones(6, dtype=torch.bool), block, 0.25)
    assert float(every) == pytest.approx(1.0, abs=1e-5)
    none = selected_share(query, keys, torch.zeros(6, dtype=torch.bool), block, 0.25)
    assert float(none) == 0.0
