"""Block scores of speculated partial queries against a paged partial key cache.

Everything is batched over decode requests of different lengths, through
vLLM-style block tables, with no host synchronisation: shapes depend only on
tensor shapes, never on tensor values.
"""

from __future__ import annotations

import enum
import math

import torch


class BlockScoreRule(enum.Enum):
    """How token scores become a block score (both in log/logit units).

    ``MAX``: the largest scaled partial logit over the block's tokens and the
    group's query heads (InfiniGen's token rule lifted to blocks).
    ``LOG_MASS``: the log of the block's estimated attention mass: softmax of
    each query head's partial logits over the request's tokens, summed over
    the block, averaged over the group's query heads. ``<= 0``.
    """

    MAX = "max"
    LOG_MASS = "log_mass"


def block_scores(
    query_partial: torch.Tensor,
    partial_key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    rule: BlockScoreRule = BlockScoreRule.LOG_MASS,
) -> torch.Tensor:
    """Score every logical block of every request.

    With ``l[r, h, t] = scale * <q'[r, h], k'[t, g]>`` (logit units: ``scale``
    is the attention's softmax scale, usually ``head_dim ** -0.5``) for the
    query heads ``h`` of KV head ``g`` and the valid tokens ``t`` of request
    ``r``:

    * ``MAX``: ``score[r, g, j] = max over t in block j, h in group g of
      l[r, h, t]``;
    * ``LOG_MASS``: ``score[r, g, j] = log(mean over h in group g of sum over
      t in block j of softmax_t(l[r, h, :])[t])``.

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
        rule: see :class:`BlockScoreRule`.

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
    logits = torch.einsum("rkgp,rtkp->rkgt", q.float(), keys.float()) * scale
    positions = torch.arange(max_blocks * block_size, device=block_table.device)
    valid = positions[None, :] < seq_lens[:, None].to(positions.dtype)  # [R, T]
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    if rule is BlockScoreRule.MAX:
        token_scores = logits.amax(dim=2)  # [R, kv, T]
        blocks = token_scores.view(num_reqs, num_kv_heads, max_blocks, block_size)
        return blocks.amax(dim=-1)
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    log_probs = log_probs.view(num_reqs, num_kv_heads, group, max_blocks, block_size)
    block_log_mass = torch.logsumexp(log_probs, dim=-1)  # [R, kv, G, M]
    return torch.logsumexp(block_log_mass, dim=2) - math.log(group)
