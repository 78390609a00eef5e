"""Block scores of speculated partial queries against a paged partial key cache.

Everything is batched over decode requests of different lengths, through
vLLM-style block tables, with no host synchronisation: shapes depend only on
tensor shapes, never on tensor values.
"""

from __future__ import annotations

import torch


def block_scores(
    query_partial: torch.Tensor,
    partial_key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Score every logical block of every request.

    ``score[r, g, j] = scale * max over the valid tokens t of block j and over
    the query heads h of KV head g of <q'[r, h], k'[t, g]>`` (logit units:
    ``scale`` is the attention's softmax scale, usually ``head_dim ** -0.5``).

    Args:
        query_partial: ``[num_reqs, num_heads, d_partial]`` speculated queries
            (query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``).
        partial_key_cache: ``[num_blocks, block_size, num_kv_heads, d_partial]``
            one layer's partial keys, indexed by physical block id.
        block_table: ``[num_reqs, max_blocks]`` int physical block ids; entries
            past a request's last block are ignored (they must not exceed
            ``num_blocks - 1``; negative entries are read as block 0).
        seq_lens: ``[num_reqs]`` int tokens in each request's cache,
            ``1 <= seq_len <= max_blocks * block_size``.
        scale: multiplier applied to the dot products.

    Returns:
        ``[num_reqs, num_kv_heads, max_blocks]`` float32; ``-inf`` for blocks
        past a request's end.
    """
    num_reqs, max_blocks = block_table.shape
    _, block_size, num_kv_heads, d_partial = partial_key_cache.shape
    num_heads = query_partial.shape[1]
    group = num_heads // num_kv_heads
    keys = partial_key_cache[block_table.clamp(min=0).long()]  # [R, M, B, kv, p]
    keys = keys.reshape(num_reqs, max_blocks * block_size, num_kv_heads, d_partial)
    q = query_partial.reshape(num_reqs, num_kv_heads, group, d_partial)
    dots = torch.einsum("rkgp,rtkp->rkgt", q.float(), keys.float())
    token_scores = dots.amax(dim=2) * scale  # [R, kv, tokens]
    positions = torch.arange(max_blocks * block_size, device=block_table.device)
    valid = positions[None, :] < seq_lens[:, None].to(positions.dtype)  # [R, T]
    token_scores = token_scores.masked_fill(~valid[:, None, :], float("-inf"))
    token_scores = token_scores.view(num_reqs, num_kv_heads, max_blocks, block_size)
    return token_scores.amax(dim=-1)
