"""Reading keys back out of vLLM's CPU paged KV cache (for the H2O policy).

vLLM's CPU kernels store a block's keys in an ISA-specific packed order (on
AVX2 ``vec`` the ``[block_size, head_dim]`` tile is stored transposed), so the
layout is learnt, not assumed: one probe writes tokens whose values are their
token index, then their channel index, through vLLM's own cache-write op, and
reads back where each ``(token, channel)`` landed. The result is a gather
index that turns a packed key tile into ``[block_size, head_dim]``.

Only unquantised caches are readable (a packing that is a permutation of the
tile); anything else is refused with a clear error before serving.
"""

from __future__ import annotations

import functools

import torch


class UnreadableKeyLayout(ValueError):
    """The KV cache's key packing is not a permutation of the tile."""


@functools.lru_cache(maxsize=8)
def key_tile_order(
    isa: str, block_size: int, head_dim: int, dtype: torch.dtype, kv_cache_dtype: str
) -> torch.Tensor:
    """``[block_size * head_dim]`` int64: packed position of plain element
    ``token * head_dim + channel`` of one (block, KV head) key tile."""
    from vllm import _custom_ops as ops

    if kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UnreadableKeyLayout(
            f"infinigen option 'policy': 'h2o' reads keys back from the KV "
            f"cache and needs an unquantised cache, got kv_cache_dtype="
            f"{kv_cache_dtype!r}"
        )
    cache = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
    view = cache.view(1, 1, block_size * 2, head_dim)
    key_plane, value_plane = view.chunk(2, dim=2)
    slots = torch.arange(block_size)
    planes = []
    for kind in ("token", "channel"):
        if kind == "token":
            values = torch.arange(block_size, dtype=dtype)[:, None].expand(
                block_size, head_dim
            )
        else:
            values = torch.arange(head_dim, dtype=dtype)[None, :].expand(
                block_size, head_dim
            )
        key = values.contiguous().view(block_size, 1, head_dim)
        ops.cpu_attn_reshape_and_cache(
            key,
            torch.zeros_like(key),
            key_plane,
            value_plane,
            slots,
            isa,
            k_scale=1.0,
            v_scale=1.0,
            kv_cache_dtype=kv_cache_dtype,
        )
        planes.append(key_plane.reshape(-1).float().round().long().clone())
    plain_index = planes[0] * head_dim + planes[1]
    order = torch.full((block_size * head_dim,), -1, dtype=torch.long)
    order[plain_index.clamp(0, block_size * head_dim - 1)] = torch.arange(
        block_size * head_dim
    )
    if (order < 0).any() or not torch.equal(
        torch.sort(plain_index).values, torch.arange(block_size * head_dim)
    ):
        raise UnreadableKeyLayout(
            f"infinigen option 'policy': 'h2o' cannot read keys back from "
            f"vLLM's CPU KV cache with ISA {isa!r} (its key packing is not a "
            "plain reordering); choose another policy"
        )
    return order


def read_keys(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, order: torch.Tensor
) -> torch.Tensor:
    """Plain keys of some blocks of one layer's CPU cache.

    Args:
        kv_cache: ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``.
        block_ids: ``[n]`` int physical block ids, in position order.
        order: from :func:`key_tile_order`.

    Returns:
        ``[n * block_size, num_kv_heads, head_dim]`` in the cache's dtype.
    """
    _, num_kv_heads, block_size, two_head = kv_cache.shape
    head_dim = two_head // 2
    blocks = kv_cache.index_select(0, block_ids.long())
    tiles = blocks.view(-1, num_kv_heads, block_size * 2, head_dim)[:, :, :block_size]
    flat = tiles.reshape(-1, num_kv_heads, block_size * head_dim)
    plain = flat.index_select(2, order).view(-1, num_kv_heads, block_size, head_dim)
    return plain.permute(0, 2, 1, 3).reshape(-1, num_kv_heads, head_dim)
