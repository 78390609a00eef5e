"""The fused CPU block scorer equals the torch reference (method/scoring.py)."""

from __future__ import annotations

import pytest
import torch

from vllm_infinigen.engine.cpu_scoring import load_block_scorer
from vllm_infinigen.method.quant4 import pack_int4, quantize_query, unpack_int4
from vllm_infinigen.method.scoring import BlockScoreRule, block_scores


@pytest.fixture(scope="module")
def scorer():  # type: ignore[no-untyped-def]
    errors: list[str] = []
    fused = load_block_scorer(errors.append)
    assert fused is not None, errors  # the project's machines have a compiler
    return fused


def _case(
    seed: int,
    block_size: int,
    dtype: torch.dtype,
    kv: int = 2,
    group: int = 7,
    p: int = 20,
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    num_reqs = int(torch.randint(1, 6, (1,), generator=gen))
    seq_lens = torch.randint(1, 40 * block_size, (num_reqs,), generator=gen)
    width = int((seq_lens.max() + block_size - 1) // block_size) + 2  # ragged + pad
    num_blocks = num_reqs * width + 5
    cache = torch.randn(num_blocks, block_size, kv, p, generator=gen).to(dtype)
    table = torch.randperm(num_blocks, generator=gen)[: num_reqs * width]
    query = torch.randn(num_reqs, kv * group, p, generator=gen) * 2
    return query, cache, table.view(num_reqs, width).to(torch.int32), seq_lens


@pytest.mark.parametrize("rule", list(BlockScoreRule))
@pytest.mark.parametrize("block_size", [32, 64, 16])
@pytest.mark.parametrize("seed", range(4))
def test_fused_scores_match_reference(
    scorer, rule: BlockScoreRule, block_size: int, seed: int
) -> None:  # type: ignore[no-untyped-def]
    query, cache, table, seq_lens = _case(seed, block_size, torch.float32)
    want = block_scores(query, cache, table, seq_lens, 0.125, rule)
    got = scorer(query, cache, table, seq_lens, 0.125, rule)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rule", list(BlockScoreRule))
@pytest.mark.parametrize("seed", range(3))
def test_fused_block_bias_matches_reference(
    scorer, rule: BlockScoreRule, seed: int
) -> None:  # type: ignore[no-untyped-def]
    query, cache, table, seq_lens = _case(seed, 32, torch.float32)
    gen = torch.Generator().manual_seed(100 + seed)
    bias = (
        torch.randn(table.shape[0], query.shape[1], table.shape[1], generator=gen) * 4
    )
    want = block_scores(query, cache, table, seq_lens, 0.125, rule, block_bias=bias)
    got = scorer(query, cache, table, seq_lens, 0.125, rule, block_bias=bias)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The bias changes the scores (a test that could not fail otherwise).
    plain = scorer(query, cache, table, seq_lens, 0.125, rule)
    assert not torch.allclose(plain[torch.isfinite(plain)], got[torch.isfinite(got)])


@pytest.mark.parametrize("rule", list(BlockScoreRule))
@pytest.mark.parametrize(
    ("kv", "group", "p", "dtype"),
    [
        (1, 4, 256, torch.bfloat16),  # Gemma 3 270M's shape: lanes left unused
        (4, 8, 64, torch.float16),  # one full vector of heads per KV head
        (2, 12, 33, torch.float32),  # more heads than lanes: two passes
        (3, 1, 5, torch.bfloat16),
    ],
)
def test_other_group_shapes_match_reference(
    scorer, rule: BlockScoreRule, kv: int, group: int, p: int, dtype: torch.dtype
) -> None:  # type: ignore[no-untyped-def]
    """The op scores the heads of a KV group a vector's lanes at a time:
    groups smaller and larger than a vector, and every key type, score as
    the reference does."""
    query, cache, table, seq_lens = _case(kv * group + p, 32, dtype, kv, group, p)
    want = block_scores(query, cache.float(), table, seq_lens, 0.125, rule)
    got = scorer(query, cache, table, seq_lens, 0.125, rule)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_too_many_channels_are_refused(scorer) -> None:  # type: ignore[no-untyped-def]
    query, cache, table, seq_lens = _case(3, 32, torch.float32, 1, 2, 520)
    with pytest.raises(RuntimeError, match="at most 512 partial channels, got 520"):
        scorer(query, cache, table, seq_lens, 0.125)


def test_half_precision_partial_keys(scorer) -> None:  # type: ignore[no-untyped-def]
    query, cache, table, seq_lens = _case(7, 32, torch.bfloat16)
    want = block_scores(query, cache.float(), table, seq_lens, 0.125)
    got = scorer(query, cache, table, seq_lens, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("rule", list(BlockScoreRule))
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize(("block_size", "d_partial"), [(32, 20), (16, 7), (64, 64)])
def test_4_bit_partial_keys_match_reference(
    scorer, rule: BlockScoreRule, biased: bool, block_size: int, d_partial: int
) -> None:  # type: ignore[no-untyped-def]
    """Packed keys (odd and even channel counts, partly filled tiles) score
    as the torch path scores them, and as the floats they decode to."""
    query, cache, table, seq_lens = _case(d_partial, block_size, torch.float32)
    query = torch.randn(*query.shape[:2], d_partial) * 2
    cache = torch.randn(*cache.shape[:3], d_partial) * 3
    packed = pack_int4(cache)
    bias = None
    if biased:
        gen = torch.Generator().manual_seed(d_partial)
        bias = torch.randn(*query.shape[:2], table.shape[1], generator=gen) * 4
    want = block_scores(query, packed, table, seq_lens, 0.125, rule, block_bias=bias)
    dequantized = unpack_int4(packed, d_partial)
    codes, q_scale = quantize_query(query * 0.125)
    again = block_scores(
        codes.float() * q_scale,
        dequantized,
        table,
        seq_lens,
        1.0,
        rule,
        block_bias=bias,
    )
    got = scorer(query, packed, table, seq_lens, 0.125, rule, block_bias=bias)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, again, rtol=1e-4, atol=1e-4)
    # The query at 8 bits moves a score by far less than the keys' 4 bits do.
    exact = block_scores(query, cache, table, seq_lens, 0.125, rule, block_bias=bias)
    full_query = block_scores(
        query, dequantized, table, seq_lens, 0.125, rule, block_bias=bias
    )
    finite = torch.isfinite(exact)
    query_error = (got - full_query)[finite].abs().max()
    key_error = (full_query - exact)[finite].abs().max()
    assert 0 < query_error < key_error / 4


def test_4_bit_rows_of_another_width_are_refused(scorer) -> None:  # type: ignore[no-untyped-def]
    query, cache, table, seq_lens = _case(2, 32, torch.float32)  # 20 channels
    packed = pack_int4(cache[..., :17])  # 11 bytes: 17 channels, not 20's 12
    with pytest.raises(RuntimeError, match="12 elements for 20 channels packed"):
        scorer(query, packed, table, seq_lens, 0.125)


def test_empty_table(scorer) -> None:  # type: ignore[no-untyped-def]
    query, cache, _, _ = _case(1, 32, torch.float32)
    out = scorer(
        query[:2], cache, torch.zeros(2, 0, dtype=torch.int32), torch.ones(2), 1.0
    )
    assert out.shape == (2, 2, 0)


def test_far_blocks_keep_their_order(scorer) -> None:  # type: ignore[no-untyped-def]
    """Large logits over a long context (attention sinks): most blocks lie
    far more than 87 nats below the best one, where a mass computed outside
    the log domain flushes them all to one floor value and the top-k among
    them follows the blocks' flatness instead of their logits."""
    gen = torch.Generator().manual_seed(11)
    kv, group, p, block, blocks = 2, 7, 20, 32, 512  # 16K tokens
    cache = (torch.randn(blocks + 3, block, kv, p, generator=gen) * 30).to(
        torch.bfloat16
    )
    table = torch.randperm(blocks + 3, generator=gen)[:blocks].view(1, blocks)
    query = torch.randn(1, kv * group, p, generator=gen) * 30
    lens = torch.tensor([blocks * block - 5])
    table = table.to(torch.int32)
    want = block_scores(query, cache.float(), table, lens, 0.125)
    got = scorer(query, cache, table, lens, 0.125)
    assert float(want.max() - want.min()) > 500  # far beyond exp's range
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-2)
    k = blocks // 5
    top_want = set(want.logsumexp(1)[0].topk(k).indices.tolist())
    top_got = set(got.logsumexp(1)[0].topk(k).indices.tolist())
    assert len(top_want & top_got) >= 0.98 * k


@pytest.mark.parametrize("p", [64, 20, 7])
def test_packed_writer_stores_the_bytes_of_the_torch_write(p: int) -> None:
    """The fused 4-bit write gives write_partial_keys' bytes, at the slots
    given and nowhere else: random rows, rows of zeros, rows whose scale
    sits on a float16 rounding boundary, and rows large enough to cap the
    scale."""
    from vllm_infinigen.engine.cpu_scoring import load_packed_writer
    from vllm_infinigen.method.partial_cache import write_partial_keys
    from vllm_infinigen.method.quant4 import packed_width

    errors: list[str] = []
    writer = load_packed_writer(errors.append)
    assert writer is not None, errors
    gen = torch.Generator().manual_seed(p)
    blocks, block_size, kv, tokens = 6, 32, 2, 40
    keys = torch.randn(tokens, kv, p, generator=gen) * 3
    keys[0] = 0.0
    keys[1, 0] = torch.full((p,), 7.0 * 0.1)  # max |k| / 7 = 0.1, not a float16
    keys[2, 1, 0] = 1e6  # scale capped at float16's largest value
    keys[3] = keys[3].round()  # ties at code boundaries
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    fill = torch.randint(
        0, 256, (blocks, block_size, kv, packed_width(p)), generator=gen
    )
    expected = fill.to(torch.uint8)
    actual = expected.clone()
    write_partial_keys(expected, keys, slots)
    writer(actual, keys, slots)
    assert torch.equal(actual, expected)
    with pytest.raises(ValueError, match="bytes"):
        writer(actual[..., :-1], keys, slots)
