"""Block scores of the peer selection policies (Quest, H2O, StreamingLLM).

Every policy turns its own evidence into the same ``[num_reqs, num_kv_heads,
max_blocks]`` float32 score table that :func:`~.scoring.block_scores` gives
InfiniGen, in log-mass-like units, so :func:`~.selection.select_blocks` picks
the same number of blocks per request for all of them (equal budget): only
the choice of blocks differs.

* **Quest**: per block and KV head the element-wise minimum and maximum of
  its keys (the device-tier metadata, :func:`update_key_bounds`). With the
  current layer's real query ``q``, ``sum_c max(q_c * min_c, q_c * max_c)``
  is an upper bound of ``q . k`` over the block's keys; the scaled bound is
  the block's logit, merged over the group's query heads by log-mean-exp.
* **H2O**: per block and KV head the attention mass its tokens have received
  (:func:`attention_block_mass`, accumulated by the engine). Blocks rank by
  log mass, and the newest half of the request's budget is always kept (the
  paper's heavy hitters plus recent window, in blocks).
* **StreamingLLM**: position only: the sink blocks plus the newest blocks.

No vLLM import; no host synchronisation (shapes depend on shapes only).
"""

from __future__ import annotations

import math

import torch

from .selection import SelectionPolicy, budget_blocks, num_blocks_of, valid_blocks

#: Score added to a block the policy always keeps (above any real score).
KEEP_BONUS = 1.0e4


def new_key_bounds(
    num_blocks: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[num_blocks, 2, num_kv_heads, head_dim]``: element-wise min (plane 0)
    and max (plane 1) of each block's keys, empty (``+inf``, ``-inf``)."""
    bounds = torch.empty(
        num_blocks, 2, num_kv_heads, head_dim, dtype=dtype, device=device
    )
    bounds[:, 0].fill_(float("inf"))
    bounds[:, 1].fill_(float("-inf"))
    return bounds


def update_key_bounds(
    bounds: torch.Tensor,
    key: torch.Tensor,
    slots: torch.Tensor,
    block_size: int,
    fresh: torch.Tensor | None = None,
) -> None:
    """Fold new keys into their blocks' bounds, in place.

    A block written from its first slot is new to its request (a freed block
    reused): its bounds restart from these keys.

    Args:
        bounds: from :func:`new_key_bounds`.
        key: ``[tokens, num_kv_heads, head_dim]`` post-RoPE keys.
        slots: ``[tokens]`` int valid slots (``block_id * block_size + offset``).
        fresh: the blocks of ``slots`` written from their first slot, when
            the caller has them (computed here otherwise).
    """
    blocks = torch.div(slots.long(), block_size, rounding_mode="floor")
    if fresh is None:
        fresh = blocks[slots % block_size == 0]
    bounds[:, 0].index_fill_(0, fresh, float("inf"))
    bounds[:, 1].index_fill_(0, fresh, float("-inf"))
    key = key.to(bounds.dtype)
    index = blocks[:, None, None].expand_as(key)
    bounds[:, 0].scatter_reduce_(0, index, key, reduce="amin", include_self=True)
    bounds[:, 1].scatter_reduce_(0, index, key, reduce="amax", include_self=True)


def quest_block_scores(
    query: torch.Tensor,
    bounds: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Quest's per-block upper bound of the attention logit.

    Args:
        query: ``[num_reqs, num_heads, head_dim]`` this layer's real queries
            (query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``).
        bounds: ``[num_blocks, 2, num_kv_heads, head_dim]`` key bounds.
        block_table: ``[num_reqs, max_blocks]`` physical block ids.
        seq_lens: ``[num_reqs]`` tokens per request.
        scale: the attention's softmax scale.

    Returns:
        ``[num_reqs, num_kv_heads, max_blocks]`` float32: log-mean-exp over
        the group's query heads of ``scale * sum_c max(q_c min_c, q_c max_c)``;
        ``-inf`` past a request's last block.
    """
    num_reqs, max_blocks = block_table.shape
    _, _, num_kv_heads, head_dim = bounds.shape
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    ids = block_table.reshape(-1).clamp(min=0).long()
    b = bounds.index_select(0, ids).float()  # [R*M, 2, kv, d]
    b = b.view(num_reqs, max_blocks, 2, num_kv_heads, head_dim)
    q = query.float().reshape(num_reqs, 1, num_kv_heads, group, head_dim) * scale
    low = q * b[:, :, 0, :, None, :]  # [R, M, kv, group, d]
    high = q * b[:, :, 1, :, None, :]
    logit = torch.maximum(low, high).sum(-1)  # [R, M, kv, group]
    merged = torch.logsumexp(logit, dim=-1) - math.log(group)
    scores = merged.permute(0, 2, 1)  # [R, kv, M]
    valid = valid_blocks(seq_lens, block_size, max_blocks)
    # Blocks with no key yet (never written) have NaN bounds products.
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    return scores.masked_fill(~valid[:, None, :], float("-inf"))


def streaming_block_scores(
    seq_lens: torch.Tensor, block_size: int, max_blocks: int, num_kv_heads: int
) -> torch.Tensor:
    """StreamingLLM: newer blocks score higher (the selection's sink blocks
    are forced), so the budget goes to the sinks plus the newest blocks.

    Returns ``[num_reqs, num_kv_heads, max_blocks]`` float32.
    """
    num_reqs = seq_lens.shape[0]
    position = torch.arange(max_blocks, device=seq_lens.device, dtype=torch.float32)
    scores = (position / max(max_blocks, 1)).expand(num_reqs, num_kv_heads, max_blocks)
    valid = valid_blocks(seq_lens, block_size, max_blocks)
    return scores.masked_fill(~valid[:, None, :], float("-inf"))


def h2o_block_scores(
    mass: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    policy: SelectionPolicy,
) -> torch.Tensor:
    """H2O: heavy blocks by accumulated attention mass, plus a recent window.

    Args:
        mass: ``[num_blocks, num_kv_heads]`` accumulated attention mass per
            physical block (see :func:`attention_block_mass`).
        block_table: ``[num_reqs, max_blocks]`` physical block ids.
        seq_lens: ``[num_reqs]`` tokens per request.
        policy: the selection parameters (for the request's block budget: the
            newest ``ceil(budget / 2)`` blocks are always kept).

    Returns:
        ``[num_reqs, num_kv_heads, max_blocks]`` float32.
    """
    num_reqs, max_blocks = block_table.shape
    ids = block_table.clamp(min=0).long()
    heavy = mass.float()[ids].permute(0, 2, 1)  # [R, kv, M]
    scores = torch.log(heavy.clamp(min=1e-30))
    n_blocks = num_blocks_of(seq_lens, block_size)[:, None]
    recent = (budget_blocks(n_blocks, policy) + 1) // 2
    logical = torch.arange(max_blocks, device=block_table.device)[None, :]
    keep = logical >= n_blocks - recent
    scores = scores + (keep.float() * KEEP_BONUS)[:, None, :]
    valid = logical < n_blocks
    return scores.masked_fill(~valid[:, None, :], float("-inf"))


def attention_block_mass(
    query: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    key_len: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Attention mass each key block receives from some query rows of one
    request (causal), summed over the rows, averaged over each KV head's
    query heads.

    Args:
        query: ``[rows, num_heads, head_dim]`` queries.
        keys: ``[tokens, num_kv_heads, head_dim]`` the request's keys in
            position order (``tokens`` a multiple of ``block_size``; entries at
            or past ``key_len`` are ignored).
        positions: ``[rows]`` int position of each query row (it attends to
            keys ``0..position``).
        key_len: valid keys.
        scale: the attention's softmax scale.

    Returns:
        ``[tokens // block_size, num_kv_heads]`` float32.
    """
    tokens, num_kv_heads, head_dim = keys.shape
    rows, num_heads, _ = query.shape
    group = num_heads // num_kv_heads
    q = query.float().reshape(rows, num_kv_heads, group, head_dim).permute(1, 0, 2, 3)
    k = keys.float().permute(1, 2, 0)  # [kv, d, T]
    logits = torch.matmul(q.reshape(num_kv_heads, rows * group, head_dim), k)
    logits = logits.view(num_kv_heads, rows, group, tokens) * scale
    t = torch.arange(tokens, device=keys.device)
    hidden = (t[None, :] > positions[:, None].to(t.dtype)) | (t[None, :] >= key_len)
    logits = logits.masked_fill(hidden[None, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    per_token = probs.sum(dim=(1, 2)) / group  # [kv, T]
    return per_token.view(num_kv_heads, tokens // block_size, block_size).sum(-1).T
