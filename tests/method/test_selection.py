"""Block scoring, block selection, partial key writes and selection counters."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from tests.method.reference_twins import ref_block_scores, ref_counts, ref_select
from vllm_infinigen.method.counters import (
    count_selected_blocks,
    new_selection_counters,
)
from vllm_infinigen.method.partial_cache import (
    new_block_fill,
    new_partial_key_cache,
    new_residual_sums,
    write_partial_keys,
    write_residual_sums,
)
from vllm_infinigen.method.scoring import (
    BlockScoreRule,
    block_scores,
    residual_block_bias,
)
from vllm_infinigen.method.selection import (
    PAD,
    HeadReduction,
    SelectionPolicy,
    num_blocks_of,
    select_blocks,
    selected_block_ids,
)

#: The reference twin of the selection has no per-request floor: these
#: policies start from ``min_blocks=0`` (tests of the floor set it).
Policy = functools.partial(SelectionPolicy, min_blocks=0)


def _ragged_batch(
    seq_lens: list[int],
    block_size: int,
    num_heads: int = 6,
    num_kv: int = 2,
    d_partial: int = 5,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, a cache, a randomly permuted block table and seq_lens."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_req = [math.ceil(n / block_size) for n in seq_lens]
    max_blocks = max(blocks_per_req, default=0) + 1  # one padded column
    num_blocks = sum(blocks_per_req) + 3
    cache = torch.randn(num_blocks, block_size, num_kv, d_partial, generator=g)
    ids = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks_per_req):
        table[r, :n] = ids[used : used + n]
        used += n
    queries = torch.randn(len(seq_lens), num_heads, d_partial, generator=g)
    return queries, cache, table, torch.tensor(seq_lens, dtype=torch.int32)


CASES = {
    "ragged": ([37, 1, 16, 100, 64, 17], 16),
    "one-block": ([5], 16),
    "exact-blocks": ([32, 64], 32),
    "long": ([500, 300, 41], 16),
}


@pytest.mark.parametrize("rule", list(BlockScoreRule))
@pytest.mark.parametrize("case", list(CASES))
def test_block_scores_match_reference(case: str, rule: BlockScoreRule) -> None:
    seq_lens, block_size = CASES[case]
    q, cache, table, lens = _ragged_batch(seq_lens, block_size)
    out = block_scores(q, cache, table, lens, scale=0.25, rule=rule)
    expected = ref_block_scores(
        q,
        cache,
        table,
        lens,
        scale=0.25,
        log_mass=rule is not BlockScoreRule.MAX,
    )
    assert out.shape == expected.shape
    assert torch.equal(torch.isinf(out), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out[finite], expected[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", list(BlockScoreRule))
def test_block_scores_ignore_physical_placement(rule: BlockScoreRule) -> None:
    """The same logical content under two different block tables scores equal."""
    q, cache, table, lens = _ragged_batch([70, 33], 16, seed=4)
    perm = torch.randperm(cache.shape[0])
    moved = torch.empty_like(cache)
    moved[perm] = cache  # block b now lives at perm[b]
    new_table = perm[table.long()].to(torch.int32)
    torch.testing.assert_close(
        block_scores(q, moved, new_table, lens, 1.0, rule),
        block_scores(q, cache, table, lens, 1.0, rule),
    )


def test_block_scores_of_zero_requests() -> None:
    cache = torch.randn(4, 16, 2, 3)
    out = block_scores(
        torch.zeros(0, 4, 3),
        cache,
        torch.zeros(0, 5, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32),
        1.0,
    )
    assert out.shape == (0, 2, 5)


def _check_against_reference(
    scores: torch.Tensor, lens: torch.Tensor, block_size: int, policy: SelectionPolicy
) -> None:
    sel = select_blocks(scores, lens, block_size, policy)
    expected, width = ref_select(
        scores,
        lens,
        block_size,
        alpha=policy.alpha,
        budget_fraction=policy.budget_fraction,
        max_blocks=policy.max_blocks,
        sink=policy.sink_blocks,
        recent=policy.recent_blocks,
        reduction=policy.head_reduction.value,
    )
    assert sel.indices.shape == (scores.shape[0], width)
    assert sel.counts.tolist() == [len(row) for row in expected]
    for r, row in enumerate(expected):
        assert sel.indices[r, : len(row)].tolist() == row
        assert bool((sel.indices[r, len(row) :] == PAD).all())


POLICIES = [
    Policy(),
    Policy(alpha=1.0, budget_fraction=0.5),
    Policy(alpha=0.0, budget_fraction=1.0, sink_blocks=0, recent_blocks=0),
    Policy(alpha=math.inf, budget_fraction=0.3, sink_blocks=2, recent_blocks=2),
    Policy(alpha=3.0, budget_fraction=1.0, max_blocks=4),
    Policy(alpha=8.0, budget_fraction=0.25, head_reduction=HeadReduction.MAX),
    Policy(alpha=2.0, budget_fraction=0.05, sink_blocks=3, recent_blocks=3),
    Policy(alpha=5.0, budget_fraction=0.4, head_reduction=HeadReduction.MEAN),
]


@pytest.mark.parametrize("rule", list(BlockScoreRule))
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: repr(p)[15:60])
@pytest.mark.parametrize("case", list(CASES))
def test_select_blocks_matches_reference(
    case: str, policy: SelectionPolicy, rule: BlockScoreRule
) -> None:
    seq_lens, block_size = CASES[case]
    q, cache, table, lens = _ragged_batch(seq_lens, block_size, seed=9)
    scores = block_scores(q, cache, table, lens, scale=1.0, rule=rule)
    _check_against_reference(scores, lens, block_size, policy)


@pytest.mark.parametrize("seed", range(20))
def test_select_blocks_random_scores(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    num_reqs = int(torch.randint(1, 6, (1,), generator=g))
    block_size = 16
    lens = torch.randint(1, 300, (num_reqs,), generator=g)
    # coarse scores: many exact ties, exercising the tie rule
    scores = torch.randint(-6, 3, (num_reqs, 3, 20), generator=g).float()
    policy = Policy(
        alpha=float(torch.randint(0, 6, (1,), generator=g)),
        budget_fraction=float(torch.rand(1, generator=g)) * 0.9 + 0.1,
        max_blocks=[None, 3, 8][seed % 3],
        sink_blocks=seed % 3,
        recent_blocks=(seed // 3) % 3,
        head_reduction=list(HeadReduction)[seed % 3],
    )
    _check_against_reference(scores, lens, block_size, policy)


def test_equal_scores_prefer_newest_blocks() -> None:
    scores = torch.zeros(1, 2, 10)
    lens = torch.tensor([160])  # 10 full blocks of 16
    policy = Policy(alpha=1.0, budget_fraction=0.5, sink_blocks=1)
    sel = select_blocks(scores, lens, 16, policy)
    # 5 blocks: sink 0, recent 9, then the newest candidates 8, 7, 6
    assert sel.indices[0].tolist()[:5] == [0, 6, 7, 8, 9]
    assert sel.counts.tolist() == [5]


def test_budget_larger_than_sequence_selects_all_candidates() -> None:
    q, cache, table, lens = _ragged_batch([40, 9], 16)
    scores = block_scores(q, cache, table, lens, 1.0)
    sel = select_blocks(scores, lens, 16, Policy(alpha=math.inf, budget_fraction=1.0))
    assert sel.counts.tolist() == [3, 1]
    assert sel.indices[0, :3].tolist() == [0, 1, 2]
    assert sel.indices[1].tolist()[:1] == [0]


def test_newest_block_is_last_and_forced() -> None:
    q, cache, table, lens = _ragged_batch([77, 130, 16], 16, seed=2)
    scores = block_scores(q, cache, table, lens, 1.0)
    sel = select_blocks(scores, lens, 16, Policy(alpha=0.0, budget_fraction=0.1))
    newest = num_blocks_of(lens, 16) - 1
    last = torch.gather(sel.indices, 1, (sel.counts - 1)[:, None])[:, 0]
    assert torch.equal(last, newest)
    assert bool((sel.indices[:, 0] == 0).all())  # the sink block


def test_forced_blocks_exceed_small_budget() -> None:
    scores = torch.randn(1, 2, 20)
    lens = torch.tensor([320])
    policy = Policy(alpha=100.0, budget_fraction=0.05, sink_blocks=2, recent_blocks=2)
    sel = select_blocks(scores, lens, 16, policy)
    assert sel.indices[0, :4].tolist() == [0, 1, 18, 19]
    assert sel.counts.tolist() == [4]


def test_min_blocks_reads_short_requests_whole_and_floors_the_budget() -> None:
    # Scores that would keep only the sink and newest blocks (middle ones are
    # far below alpha), for a 3-block, an 8-block and a 20-block request.
    scores = torch.full((3, 2, 20), -100.0)
    scores[:, :, 0] = 0.0
    lens = torch.tensor([70, 256, 640])
    policy = Policy(alpha=8.0, budget_fraction=0.2, min_blocks=8)
    sel = select_blocks(scores, lens, 32, policy)
    assert sel.counts.tolist() == [3, 8, 2]  # 20 blocks: alpha keeps 2 of 8
    assert sel.indices[0, :3].tolist() == [0, 1, 2]
    assert sel.indices[1, :8].tolist() == list(range(8))
    loose = Policy(alpha=math.inf, budget_fraction=0.2, min_blocks=8)
    assert select_blocks(scores, lens, 32, loose).counts.tolist() == [3, 8, 8]
    without = Policy(alpha=8.0, budget_fraction=0.2)
    assert select_blocks(scores, lens, 32, without).counts.tolist() == [2, 2, 2]


def test_min_blocks_is_capped_by_max_blocks() -> None:
    scores = torch.zeros(1, 2, 6)
    policy = Policy(alpha=math.inf, budget_fraction=0.2, max_blocks=3, min_blocks=8)
    sel = select_blocks(scores, torch.tensor([192]), 32, policy)
    assert sel.indices.shape == (1, 3)
    assert sel.counts.tolist() == [3]


def test_max_blocks_caps_count_and_width() -> None:
    q, cache, table, lens = _ragged_batch([400, 200], 16)
    scores = block_scores(q, cache, table, lens, 1.0)
    policy = Policy(alpha=math.inf, budget_fraction=1.0, max_blocks=6)
    sel = select_blocks(scores, lens, 16, policy)
    assert sel.indices.shape == (2, 6)
    assert sel.counts.tolist() == [6, 6]


def test_per_head_union_keeps_a_quiet_heads_block() -> None:
    scores = torch.tensor([[[10.0, 9.0, 0.0, 0.0], [-5.0, -5.0, 1.0, -5.0]]])
    lens = torch.tensor([64])
    kwargs = dict(alpha=2.0, budget_fraction=1.0, sink_blocks=0, recent_blocks=0)
    per_head = select_blocks(
        scores,
        lens,
        16,
        Policy(head_reduction=HeadReduction.PER_HEAD, **kwargs),  # type: ignore[arg-type]
    )
    merged = select_blocks(
        scores,
        lens,
        16,
        Policy(head_reduction=HeadReduction.MAX, **kwargs),  # type: ignore[arg-type]
    )
    assert per_head.indices[0, : int(per_head.counts[0])].tolist() == [0, 1, 2]
    assert merged.indices[0, : int(merged.counts[0])].tolist() == [0, 1]


def test_zero_requests() -> None:
    policy = Policy()
    sel = select_blocks(
        torch.zeros(0, 2, 7), torch.zeros(0, dtype=torch.int32), 16, policy
    )
    assert sel.indices.shape == (0, 7)
    assert sel.counts.shape == (0,)
    empty = select_blocks(
        torch.zeros(0, 2, 0), torch.zeros(0, dtype=torch.int32), 16, policy
    )
    assert empty.indices.shape == (0, 0)
    table = torch.zeros(0, 7, dtype=torch.int32)
    assert selected_block_ids(table, sel).shape == (0, 7)
    counters = new_selection_counters(5)
    count_selected_blocks(counters, table, sel)
    assert counters.tolist() == [0] * 5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"budget_fraction": 0.0}, "budget_fraction"),
        ({"budget_fraction": 1.2}, "budget_fraction"),
        ({"max_blocks": 0}, "max_blocks"),
        ({"sink_blocks": -1}, "sink_blocks"),
        ({"recent_blocks": -2}, "recent_blocks"),
        ({"min_blocks": -1}, "min_blocks"),
    ],
)
def test_policy_validation_names_the_option(
    kwargs: dict[str, float], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        Policy(**kwargs)  # type: ignore[arg-type]


def test_selected_ids_and_counters_match_reference() -> None:
    q, cache, table, lens = _ragged_batch([90, 33, 250, 16], 16, seed=6)
    scores = block_scores(q, cache, table, lens, 1.0)
    policy = Policy(alpha=2.0, budget_fraction=0.4)
    sel = select_blocks(scores, lens, 16, policy)
    ids = selected_block_ids(table, sel)
    rows = [sel.indices[r, : int(sel.counts[r])].tolist() for r in range(4)]
    for r, row in enumerate(rows):
        assert ids[r, : len(row)].tolist() == [int(table[r, j]) for j in row]
        assert bool((ids[r, len(row) :] == PAD).all())
    counters = new_selection_counters(cache.shape[0])
    count_selected_blocks(counters, table, sel)
    count_selected_blocks(counters, table, sel)
    expected = ref_counts(cache.shape[0], table, rows) * 2
    assert torch.equal(counters, expected)


def test_shared_prefix_block_counts_once_per_request() -> None:
    table = torch.tensor([[4, 2], [4, 3]], dtype=torch.int32)
    scores = torch.zeros(2, 1, 2)
    sel = select_blocks(scores, torch.tensor([20, 20]), 16, Policy(budget_fraction=1.0))
    counters = count_selected_blocks(new_selection_counters(6), table, sel)
    assert counters.tolist() == [0, 0, 1, 1, 2, 0]


def test_write_partial_keys_places_tokens_at_their_slots() -> None:
    cache = new_partial_key_cache(4, 8, 2, 3)
    keys = torch.randn(5, 2, 3)
    slots = torch.tensor([3 * 8 + 0, 3 * 8 + 1, 0 * 8 + 7, 2 * 8 + 4, 1 * 8 + 0])
    write_partial_keys(cache, keys, slots)
    torch.testing.assert_close(cache[3, 0], keys[0])
    torch.testing.assert_close(cache[3, 1], keys[1])
    torch.testing.assert_close(cache[0, 7], keys[2])
    torch.testing.assert_close(cache[2, 4], keys[3])
    torch.testing.assert_close(cache[1, 0], keys[4])
    assert int((cache != 0).any(dim=(2, 3)).sum()) == 5


def test_residual_sums_restart_when_a_block_is_written_from_its_first_slot() -> None:
    sums = new_residual_sums(4, 2, 3)
    fill = new_block_fill(4)
    first = torch.randn(4, 2, 3)
    slots = torch.tensor([8, 9, 10, 11])  # block 2, from its first slot
    write_residual_sums(sums, first, slots, 4, torch.tensor([2]), fill)
    torch.testing.assert_close(sums[2], first.sum(0))
    more = torch.randn(2, 2, 3)
    write_residual_sums(sums, more, torch.tensor([12, 13]), 4, torch.tensor([3]), fill)
    torch.testing.assert_close(sums[2], first.sum(0))  # untouched
    # Block 2 reused by another request: written from slot 0 again.
    again = torch.randn(2, 2, 3)
    write_residual_sums(sums, again, torch.tensor([8, 9]), 4, torch.tensor([2]), fill)
    torch.testing.assert_close(sums[2], again.sum(0))
    torch.testing.assert_close(sums[3], more.sum(0))


@pytest.mark.parametrize("rule", list(BlockScoreRule))
def test_residual_term_is_exact_when_blocks_share_their_residual_key(
    rule: BlockScoreRule,
) -> None:
    """Partial keys plus the block-mean residual term score exactly like the
    whole keys when every token of a block has the same residual channels;
    the last, partly filled block divides by its own fill."""
    gen = torch.Generator().manual_seed(5)
    block, kv, group, p, e = 8, 2, 3, 4, 3
    num_blocks, seq_lens = 12, torch.tensor([29, 8, 17])
    table = torch.randperm(num_blocks, generator=gen).view(3, 4)  # no block shared
    partial = torch.randn(num_blocks, block, kv, p, generator=gen)
    per_block = torch.randn(num_blocks, 1, kv, e, generator=gen) * 3
    residual = per_block.expand(num_blocks, block, kv, e)
    sums = new_residual_sums(num_blocks, kv, e)
    fill = new_block_fill(num_blocks)
    for r, n in enumerate(seq_lens.tolist()):  # each request's tokens, in order
        slots = table[r, torch.arange(n) // block] * block + torch.arange(n) % block
        fresh = slots[slots % block == 0] // block
        write_residual_sums(
            sums, residual.reshape(-1, kv, e)[slots], slots, block, fresh, fill
        )
    query = torch.randn(3, kv * group, p + e, generator=gen)
    bias = residual_block_bias(query[..., p:], sums, table, seq_lens, block, 0.5)
    got = block_scores(
        query[..., :p].contiguous(),
        partial,
        table,
        seq_lens,
        0.5,
        rule,
        block_bias=bias,
    )
    whole = torch.cat([partial, residual], dim=-1)
    want = block_scores(query, whole, table, seq_lens, 0.5, rule)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain = block_scores(
        query[..., :p].contiguous(), partial, table, seq_lens, 0.5, rule
    )
    assert not torch.allclose(plain[torch.isfinite(plain)], want[torch.isfinite(want)])


def test_residual_sums_count_a_rewritten_slot_once() -> None:
    """vLLM recomputes the last token of a prompt that is wholly in its
    prefix cache into the shared cached block: the sum must not grow with
    every such request."""
    sums = new_residual_sums(3, 2, 3)
    fill = new_block_fill(3)
    tokens = torch.randn(6, 2, 3)
    slots = torch.arange(4, 10)  # block 1 whole, block 2 from its first slot
    write_residual_sums(sums, tokens, slots, 4, torch.tensor([1, 2]), fill)
    torch.testing.assert_close(sums[1], tokens[:4].sum(0))
    assert fill.tolist() == [0, 4, 2]
    for _ in range(3):  # three requests with the same cached prompt
        again = tokens[3:4] + 1e-3  # the last token, recomputed
        write_residual_sums(sums, again, torch.tensor([7]), 4, torch.tensor([]), fill)
    torch.testing.assert_close(sums[1], tokens[:4].sum(0))
    # Appends still count, also next to a rewrite in the same write.
    more = torch.randn(2, 2, 3)
    write_residual_sums(sums, more, torch.tensor([9, 10]), 4, torch.tensor([]), fill)
    torch.testing.assert_close(sums[2], tokens[4:].sum(0) + more[1])
    assert fill.tolist() == [0, 4, 3]
    # Reuse by another request restarts the block and its fill.
    write_residual_sums(sums, more, torch.tensor([8, 9]), 4, torch.tensor([2]), fill)
    torch.testing.assert_close(sums[2], more.sum(0))
    assert fill.tolist() == [0, 4, 2]
