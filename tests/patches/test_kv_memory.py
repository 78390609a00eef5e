"""The automatic KV cache size leaves room for INFINIGEN's device tier."""

from __future__ import annotations

import pytest
import torch

from vllm_infinigen.method.partial_cache import new_partial_key_cache, new_residual_sums
from vllm_infinigen.patches.kv_memory import device_tier_share, host_tier_bytes


def test_share_of_qwen_shapes() -> None:
    # 24 layers, head_dim 64, 23 sparse layers of 20 partial channels.
    share = device_tier_share(24, 64, [20] * 23)
    partial = 23 * 20 / (24 * 2 * 64)
    assert share == pytest.approx(partial + 2 / 24)


def test_in_place_reads_need_no_staging_room() -> None:
    share = device_tier_share(24, 64, [20] * 23, staging=False)
    assert share == pytest.approx(23 * 20 / (24 * 2 * 64))


def test_share_covers_what_the_device_tier_allocates() -> None:
    """The share times the host tier's bytes equals the bytes the runtime
    allocates per sparse layer (partial keys and residual sums), measured
    from the tensors themselves: 24 layers, 23 sparse, bfloat16 KV."""
    layers, sparse, kv, head_dim, block, blocks, d_partial = 24, 23, 2, 64, 32, 10, 20
    host = torch.empty(blocks, kv, block, 2 * head_dim, dtype=torch.bfloat16)
    partial = new_partial_key_cache(blocks, block, kv, d_partial, dtype=torch.bfloat16)
    sums = new_residual_sums(blocks, kv, head_dim - d_partial)
    share = device_tier_share(
        layers,
        head_dim,
        [d_partial] * sparse,
        staging=False,
        residual_dims=[head_dim - d_partial] * sparse,
        block_size=block,
        residual_itemsize_ratio=4 / 2,
    )
    allocated = sparse * (partial.nbytes + sums.nbytes)
    assert share * layers * host.nbytes == pytest.approx(allocated)


def test_no_sparse_layer_needs_no_room() -> None:
    assert device_tier_share(24, 64, []) == 0.0


def test_host_and_device_tiers_fit_the_automatic_size() -> None:
    automatic = 10 << 30
    share = device_tier_share(26, 256, [77] * 4)  # Gemma 3 270M: 4 global layers
    host = host_tier_bytes(automatic, share)
    assert host < automatic
    assert host * (1 + share) <= automatic
    assert host * (1 + share) > automatic - 2


def test_bad_shapes_rejected() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        device_tier_share(0, 64, [])


def test_half_precision_partial_keys_need_half_the_room() -> None:
    full = device_tier_share(24, 64, [20] * 23, staging=False)
    half = device_tier_share(
        24, 64, [20] * 23, staging=False, partial_itemsize_ratio=0.5
    )
    assert half == pytest.approx(full / 2)
