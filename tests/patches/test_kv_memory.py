"""The automatic KV cache size leaves room for INFINIGEN's device tier."""

from __future__ import annotations

import pytest
import torch

from vllm_infinigen.method.partial_cache import (
    new_partial_key_cache,
    new_residual_sums,
    partial_key_bytes,
)
from vllm_infinigen.method.quant4 import PACKED_DTYPE
from vllm_infinigen.method.skew import partial_dim
from vllm_infinigen.patches.kv_memory import device_tier_share, host_tier_bytes

LAYERS, SPARSE, KV, BLOCK, BLOCKS = 24, 23, 2, 32, 10


@pytest.mark.parametrize(
    ("head_dim", "ratio", "dtype"),
    [
        (64, 0.3, torch.bfloat16),
        (64, 0.3, torch.float32),
        (64, 1.0, PACKED_DTYPE),  # whole keys at 4 bits
        (256, 0.3, PACKED_DTYPE),  # an odd d_partial (77): a spare nibble
    ],
)
def test_share_covers_what_the_device_tier_allocates(
    head_dim: int, ratio: float, dtype: torch.dtype
) -> None:
    """The share times the host tier's bytes equals the bytes the runtime
    allocates per sparse layer (partial keys and residual sums), measured
    from the tensors themselves: 24 layers, 23 sparse, bfloat16 KV."""
    d_partial = partial_dim(head_dim, ratio)
    d_residual = head_dim - d_partial
    host = torch.empty(BLOCKS, KV, BLOCK, 2 * head_dim, dtype=torch.bfloat16)
    partial = new_partial_key_cache(BLOCKS, BLOCK, KV, d_partial, dtype=dtype)
    sums = new_residual_sums(BLOCKS, KV, d_residual)
    share = device_tier_share(
        LAYERS,
        head_dim,
        host.element_size(),
        [partial_key_bytes(dtype, d_partial)] * SPARSE,
        staging=False,
        residual_dims=[d_residual] * SPARSE,
        block_size=BLOCK,
    )
    allocated = SPARSE * (partial.nbytes + sums.nbytes)
    assert share * LAYERS * host.nbytes == pytest.approx(allocated)


def test_staging_reserves_two_layers_of_the_cache() -> None:
    partial = [partial_key_bytes(torch.bfloat16, 20)] * SPARSE
    in_place = device_tier_share(LAYERS, 64, 2, partial, staging=False)
    staged = device_tier_share(LAYERS, 64, 2, partial)
    assert staged - in_place == pytest.approx(2 / LAYERS)


def test_whole_keys_at_4_bits_need_less_room_than_30_percent_in_bfloat16() -> None:
    for head_dim in (64, 128, 256):  # Qwen2.5 0.5B, Llama, Gemma 3 270M
        whole = partial_key_bytes(PACKED_DTYPE, partial_dim(head_dim, 1.0))
        part = partial_key_bytes(torch.bfloat16, partial_dim(head_dim, 0.3))
        assert whole < part
        shares = [
            device_tier_share(LAYERS, head_dim, 2, [b] * SPARSE, staging=False)
            for b in (whole, part)
        ]
        assert shares[0] < shares[1]


def test_no_sparse_layer_needs_no_room() -> None:
    assert device_tier_share(24, 64, 2, []) == 0.0


def test_host_and_device_tiers_fit_the_automatic_size() -> None:
    automatic = 10 << 30
    # Gemma 3 270M: 26 layers, 4 global (sparse) ones of 77 partial channels.
    share = device_tier_share(26, 256, 2, [partial_key_bytes(torch.bfloat16, 77)] * 4)
    host = host_tier_bytes(automatic, share)
    assert host < automatic
    assert host * (1 + share) <= automatic
    assert host * (1 + share) > automatic - 2


def test_bad_shapes_rejected() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        device_tier_share(0, 64, 2, [])
    with pytest.raises(ValueError, match="kv_itemsize"):
        device_tier_share(24, 64, 0, [])
