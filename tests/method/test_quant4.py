"""Partial keys packed at 4 bits: the format, the cache, the torch scorer."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_infinigen.method.partial_cache import (
    new_partial_key_cache,
    partial_key_bytes,
    write_partial_keys,
)
from vllm_infinigen.method.quant4 import (
    PACKED_DTYPE,
    pack_int4,
    packed_width,
    quantize_query,
    unpack_int4,
)
from vllm_infinigen.method.scoring import BlockScoreRule, block_scores


def _stored_scale(rows: torch.Tensor) -> torch.Tensor:
    """The float16 scale of each packed row, read from its last two bytes,
    little-endian (``[..., 1]`` float32), one row at a time."""
    flat = rows.reshape(-1, rows.shape[-1])
    scales = [
        float(torch.tensor(row[-2:].tolist(), dtype=torch.uint8).view(torch.float16))
        for row in flat
    ]
    return torch.tensor(scales).view(*rows.shape[:-1], 1)


def _within_half_a_step(keys: torch.Tensor, rows: torch.Tensor) -> None:
    back = unpack_int4(rows, keys.shape[-1])
    scale = _stored_scale(rows)
    # Half a quantization step, plus float32 rounding of k / scale.
    bound = scale / 2 * (1 + 1e-5) + 1e-30
    assert bool(((back - keys.float()).abs() <= bound).all())


@pytest.mark.parametrize("d_partial", [1, 2, 7, 20, 64, 77, 256])
def test_round_trip_is_within_half_a_step(d_partial: int) -> None:
    gen = torch.Generator().manual_seed(d_partial)
    keys = torch.randn(50, 3, d_partial, generator=gen) * 4
    rows = pack_int4(keys)
    assert rows.dtype == PACKED_DTYPE
    assert rows.shape == (50, 3, math.ceil(d_partial / 2) + 2)
    _within_half_a_step(keys, rows)
    # The scale is the row's largest magnitude over 7 (up to float16).
    want = keys.abs().amax(-1, keepdim=True) / 7
    torch.testing.assert_close(_stored_scale(rows), want, rtol=1e-3, atol=0)


def test_codes_are_symmetric_4_bit_and_nibbles_are_offset_binary() -> None:
    keys = torch.tensor([[7.0, -7.0, 0.0, 3.0, -1.0]])  # scale 1: codes = keys
    rows = pack_int4(keys)
    assert rows.shape == (1, 5)
    assert _stored_scale(rows).item() == 1.0
    # Channel 2i in the low nibble of byte i; nibble = code + 8.
    assert rows[0, :3].tolist() == [15 | (1 << 4), 8 | (11 << 4), 7 | (8 << 4)]
    assert unpack_int4(rows, 5).tolist() == keys.tolist()


def test_zero_rows_and_a_zero_cache_decode_to_zeros() -> None:
    keys = torch.zeros(4, 2, 9)
    keys[1, 0, 3] = 7.0  # one nonzero row among zero rows (scale 1)
    back = unpack_int4(pack_int4(keys), 9)
    assert torch.equal(back[keys.abs().amax(-1) == 0], torch.zeros(7, 9))
    assert torch.equal(back[1, 0], keys[1, 0])
    cache = new_partial_key_cache(3, 4, 2, 9, dtype=PACKED_DTYPE)
    assert torch.equal(unpack_int4(cache, 9), torch.zeros(3, 4, 2, 9))


@pytest.mark.parametrize("magnitude", [1e-6, 1e-3, 1.0, 300.0, 6e4])
def test_extreme_magnitudes_round_trip(magnitude: float) -> None:
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(16, 2, 33, generator=gen) * magnitude
    keys[0, 0, 0] = 7 * magnitude  # an outlier channel
    rows = pack_int4(keys)
    _within_half_a_step(keys, rows)
    assert bool(torch.isfinite(unpack_int4(rows, 33)).all())


def test_scale_beyond_float16_is_capped_not_infinite() -> None:
    keys = torch.tensor([[1e6, -5e5, 0.0]])  # max / 7 > float16's largest
    rows = pack_int4(keys)
    scale = _stored_scale(rows)
    assert scale.item() == torch.finfo(torch.float16).max
    back = unpack_int4(rows, 3)
    assert bool(torch.isfinite(back).all())
    assert back[0, 0] == 7 * scale.item()  # clamped to the largest code
    assert back[0, 1] < 0 and back[0, 2] == 0


def test_halves_pack_like_float32() -> None:
    keys = torch.randn(8, 2, 20, generator=torch.Generator().manual_seed(3))
    half = keys.to(torch.bfloat16)
    assert torch.equal(pack_int4(half), pack_int4(half.float()))


def test_unpack_refuses_a_width_of_other_channels() -> None:
    rows = pack_int4(torch.randn(2, 20))
    with pytest.raises(ValueError, match="13 bytes, got 12"):
        unpack_int4(rows, 21)  # 21 channels need 13


def test_packed_cache_shape_and_bytes_follow_the_format() -> None:
    # d_partial 64 (head_dim 64, partial_ratio 1.0): 32 code bytes + 2 scale.
    assert partial_key_bytes(PACKED_DTYPE, 64) == 32 + 2
    assert partial_key_bytes(PACKED_DTYPE, 77) == 39 + 2  # odd: a spare nibble
    assert partial_key_bytes(PACKED_DTYPE, 256) == 128 + 2
    assert partial_key_bytes(torch.bfloat16, 20) == 20 * 2
    assert partial_key_bytes(torch.float32, 20) == 20 * 4
    cache = new_partial_key_cache(5, 16, 2, 77, dtype=PACKED_DTYPE)
    assert cache.shape == (5, 16, 2, packed_width(77)) and cache.dtype == torch.uint8
    assert cache.nbytes == 5 * 16 * 2 * partial_key_bytes(PACKED_DTYPE, 77)


def test_write_partial_keys_packs_into_a_packed_cache() -> None:
    gen = torch.Generator().manual_seed(2)
    block, kv, d = 8, 2, 13
    cache = new_partial_key_cache(4, block, kv, d, dtype=PACKED_DTYPE)
    keys = torch.randn(5, kv, d, generator=gen)
    slots = torch.tensor([3 * 8 + 0, 3 * 8 + 1, 0 * 8 + 7, 2 * 8 + 4, 1 * 8 + 0])
    write_partial_keys(cache, keys, slots)
    flat = unpack_int4(cache, d).view(4 * block, kv, d)
    torch.testing.assert_close(flat[slots], unpack_int4(pack_int4(keys), d))
    _within_half_a_step(keys, cache.view(4 * block, kv, -1)[slots])
    untouched = torch.ones(4 * block, dtype=torch.bool)
    untouched[slots] = False
    assert not bool(flat[untouched].any())


def _paged_case(seed: int, d_partial: int) -> tuple[torch.Tensor, ...]:
    """A ragged batch over permuted blocks: queries, float keys, table, lens."""
    gen = torch.Generator().manual_seed(seed)
    block, kv, group = 16, 2, 3
    seq_lens = torch.tensor([37, 1, 16, 100, 64], dtype=torch.int32)
    width = 8  # ceil(100 / 16) + one padded column
    num_blocks = len(seq_lens) * width + 3
    keys = torch.randn(num_blocks, block, kv, d_partial, generator=gen) * 3
    table = torch.randperm(num_blocks, generator=gen)[: len(seq_lens) * width]
    query = torch.randn(len(seq_lens), kv * group, d_partial, generator=gen)
    return query, keys, table.view(len(seq_lens), width).to(torch.int32), seq_lens


@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("rule", list(BlockScoreRule))
@pytest.mark.parametrize("d_partial", [20, 7])
def test_packed_scores_equal_scores_of_the_dequantized_keys(
    rule: BlockScoreRule, biased: bool, d_partial: int
) -> None:
    query, keys, table, lens = _paged_case(d_partial, d_partial)
    packed = pack_int4(keys)
    dequantized = unpack_int4(packed, d_partial)
    bias = None
    if biased:
        gen = torch.Generator().manual_seed(9)
        bias = torch.randn(
            table.shape[0], query.shape[1], table.shape[1], generator=gen
        )
    got = block_scores(query, packed, table, lens, 0.25, rule, block_bias=bias)
    # Packed keys are scored by the query at 8 bits (quantize_query).
    codes, q_scale = quantize_query(query * 0.25)
    query8 = codes.float() * q_scale
    want = block_scores(query8, dequantized, table, lens, 1.0, rule, block_bias=bias)
    assert got.shape == want.shape == (table.shape[0], 2, table.shape[1])
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The 4-bit keys score near the float keys they stand for.
    exact = block_scores(query, keys, table, lens, 0.25, rule, block_bias=bias)
    finite = torch.isfinite(exact)
    assert not torch.equal(got[finite], exact[finite])
    torch.testing.assert_close(got[finite], exact[finite], rtol=0.2, atol=1.0)
