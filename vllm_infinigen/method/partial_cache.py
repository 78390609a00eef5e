"""Writing partial keys into a paged partial key cache.

A cache holds the partial keys as floats (``[num_blocks, block_size,
num_kv_heads, d_partial]`` of a floating dtype) or packed at 4 bits
(``[num_blocks, block_size, num_kv_heads, packed_width(d_partial)]``
uint8, :mod:`.quant4`): a uint8 cache is a packed one.
"""

from __future__ import annotations

import torch

from .quant4 import PACKED_DTYPE, pack_int4, packed_width

#: Storage type of the residual sums.
RESIDUAL_DTYPE = torch.float32


def partial_row_width(dtype: torch.dtype, d_partial: int) -> int:
    """Last dimension of a partial key cache of ``dtype``: ``d_partial``
    numbers, or their packed bytes for :data:`~.quant4.PACKED_DTYPE`."""
    return packed_width(d_partial) if dtype == PACKED_DTYPE else d_partial


def partial_key_bytes(dtype: torch.dtype, d_partial: int) -> int:
    """Bytes a partial key cache of ``dtype`` keeps per token and KV head
    (what every sizing of the device tier counts)."""
    return partial_row_width(dtype, d_partial) * dtype.itemsize


def new_partial_key_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    d_partial: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Zeros for ``d_partial`` channels per token and KV head: ``[num_blocks,
    block_size, num_kv_heads, d_partial]`` of a floating ``dtype``, or, for
    ``torch.uint8``, the packed 4-bit rows ``[num_blocks, block_size,
    num_kv_heads, packed_width(d_partial)]`` (zero rows decode to zeros)."""
    width = partial_row_width(dtype, d_partial)
    return torch.zeros(
        num_blocks, block_size, num_kv_heads, width, dtype=dtype, device=device
    )


def write_partial_keys(
    partial_key_cache: torch.Tensor,
    partial_keys: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new tokens' partial keys at their slots, in place (quantized
    to 4 bits when the cache is packed).

    Args:
        partial_key_cache: :func:`new_partial_key_cache`'s ``[num_blocks,
            block_size, num_kv_heads, width]``.
        partial_keys: ``[tokens, num_kv_heads, d_partial]``.
        slot_mapping: ``[tokens]`` int slots ``block_id * block_size +
            offset`` (vLLM's ``slot_mapping``). All entries must be valid and
            distinct: slice padding tokens off first (vLLM pads with -1).
    """
    num_blocks, block_size, num_kv_heads, width = partial_key_cache.shape
    flat = partial_key_cache.view(num_blocks * block_size, num_kv_heads, width)
    if flat.dtype == PACKED_DTYPE:
        rows = pack_int4(partial_keys)
    else:
        rows = partial_keys.to(flat.dtype)
    flat.index_copy_(0, slot_mapping.long(), rows)


def new_residual_sums(
    num_blocks: int,
    num_kv_heads: int,
    d_residual: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[num_blocks, num_kv_heads, d_residual]`` float32 zeros: per block,
    the sum of its tokens' residual keys (the skewed channels the partial
    keys leave out)."""
    return torch.zeros(
        num_blocks, num_kv_heads, d_residual, dtype=RESIDUAL_DTYPE, device=device
    )


def new_block_fill(
    num_blocks: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[num_blocks]`` int32 zeros: per block, how many of its first slots
    its residual sum already counts."""
    return torch.zeros(num_blocks, dtype=torch.int32, device=device)


def write_residual_sums(
    residual_sums: torch.Tensor,
    residual_keys: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    fresh_blocks: torch.Tensor,
    fill: torch.Tensor,
) -> None:
    """Add new tokens' residual keys to their blocks' sums, in place.

    Args:
        residual_sums: ``[num_blocks, num_kv_heads, d_residual]`` float32.
        residual_keys: ``[tokens, num_kv_heads, d_residual]``.
        slot_mapping: ``[tokens]`` valid slots (padding sliced off).
        block_size: tokens per block.
        fresh_blocks: blocks written from their first slot in this write:
            their sums restart from zero first (a reused block keeps nothing
            of its previous request).
        fill: ``[num_blocks]`` int32 (:func:`new_block_fill`), updated in
            place: a slot the sum already counts is not added again. vLLM
            writes a slot twice when a prompt is wholly in its prefix cache
            (it recomputes the last token into the cached block, which every
            request with that prompt shares); without ``fill`` every such
            request would add that token once more.
    """
    fresh = fresh_blocks.long()
    residual_sums.index_fill_(0, fresh, 0.0)
    slots = slot_mapping.long()
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    keys = residual_keys.to(residual_sums.dtype)
    fill.index_fill_(0, fresh, 0)
    offsets = (slots - blocks * block_size).to(fill.dtype)
    new = offsets >= fill.index_select(0, blocks)
    residual_sums.index_add_(0, blocks[new], keys[new])
    fill.scatter_reduce_(0, blocks, offsets + 1, reduce="amax")
