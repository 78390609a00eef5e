"""The automatic KV cache size leaves room for INFINIGEN's device tier."""

from __future__ import annotations

import pytest

from vllm_infinigen.patches.kv_memory import device_tier_share, host_tier_bytes


def test_share_of_qwen_shapes() -> None:
    # 24 layers, head_dim 64, 23 sparse layers of 20 partial channels.
    share = device_tier_share(24, 64, [20] * 23)
    partial = 23 * 20 / (24 * 2 * 64)
    assert share == pytest.approx(partial + 2 / 24)


def test_in_place_reads_need_no_staging_room() -> None:
    share = device_tier_share(24, 64, [20] * 23, staging=False)
    assert share == pytest.approx(23 * 20 / (24 * 2 * 64))


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
