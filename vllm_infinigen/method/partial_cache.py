"""Writing partial keys into a paged partial key cache."""

from __future__ import annotations

import torch


def new_partial_key_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    d_partial: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[num_blocks, block_size, num_kv_heads, d_partial]`` zeros."""
    return torch.zeros(
        num_blocks, block_size, num_kv_heads, d_partial, dtype=dtype, device=device
    )


def write_partial_keys(
    partial_key_cache: torch.Tensor,
    partial_keys: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new tokens' partial keys at their slots, in place.

    Args:
        partial_key_cache: ``[num_blocks, block_size, num_kv_heads, d_partial]``.
        partial_keys: ``[tokens, num_kv_heads, d_partial]``.
        slot_mapping: ``[tokens]`` int slots ``block_id * block_size +
            offset`` (vLLM's ``slot_mapping``). All entries must be valid and
            distinct: slice padding tokens off first (vLLM pads with -1).
    """
    num_blocks, block_size, num_kv_heads, d_partial = partial_key_cache.shape
    flat = partial_key_cache.view(num_blocks * block_size, num_kv_heads, d_partial)
    flat.index_copy_(0, slot_mapping.long(), partial_keys.to(flat.dtype))
