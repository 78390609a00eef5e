"""Block scores of speculated partial queries against a paged partial key cache.

Everything is batched over decode requests of different lengths, through
vLLM-style block tables, with no host synchronisation: shapes depend only on
tensor shapes, never on tensor values.
"""

from __future__ import annotations

import enum
import math

import torch

from .quant4 import PACKED_DTYPE, quantize_query, unpack_int4


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


class Workspace:
    """Reusable scratch tensors for the decode hot path.

    A decode step scores every sparse layer with the same shapes, and the
    intermediates are megabytes at long contexts: allocating them anew each
    time costs page faults (the allocator hands large blocks back to the
    system) and more than the arithmetic. A workspace keeps one growing
    buffer per name and hands out views of it.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        """A tensor of ``shape`` (uninitialised; valid until the next
        :meth:`get` of the same name)."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.numel() < numel
            or buffer.dtype != dtype
            or buffer.device != device
        ):
            buffer = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def block_scores(
    query_partial: torch.Tensor,
    partial_key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    rule: BlockScoreRule = BlockScoreRule.LOG_MASS,
    workspace: Workspace | None = None,
    block_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score every logical block of every request.

    With ``l[r, h, t] = scale * <q'[r, h], k'[t, g]>`` (logit units: ``scale``
    is the attention's softmax scale, usually ``head_dim ** -0.5``) for the
    query heads ``h`` of KV head ``g`` and the valid tokens ``t`` of request
    ``r``:

    * ``MAX``: ``score[r, g, j] = max over t in block j, h in group g of
      l[r, h, t]``;
    * ``LOG_MASS``: ``score[r, g, j] = log(mean over h in group g of sum over
      t in block j of softmax_t(l[r, h, :])[t])``;

    Args:
        query_partial: ``[num_reqs, num_heads, d_partial]`` speculated queries
            (query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``).
        partial_key_cache: ``[num_blocks, block_size, num_kv_heads, d_partial]``
            one layer's partial keys, indexed by physical block id, or their
            4-bit packing (uint8 ``[..., packed_width(d_partial)]``,
            :mod:`.quant4`: unpacked after the gather, and scored by the
            query at 8 bits, :func:`~.quant4.quantize_query`).
        block_table: ``[num_reqs, max_blocks]`` int physical block ids; entries
            past a request's last block are ignored (they must not exceed
            ``num_blocks - 1``; negative entries are read as block 0).
        seq_lens: ``[num_reqs]`` int tokens in each request's cache,
            ``1 <= seq_len <= max_blocks * block_size``.
        scale: multiplier applied to the dot products.
        rule: see :class:`BlockScoreRule`.
        workspace: scratch buffers reused across calls (None: allocate).
        block_bias: ``[num_reqs, num_heads, max_blocks]`` float32 added to
            every logit of the block for that query head (in logit units,
            :func:`residual_block_bias`), or ``None``.

    Returns:
        ``[num_reqs, num_kv_heads, max_blocks]`` float32; ``-inf`` for blocks
        past a request's end.
    """
    num_reqs, max_blocks = block_table.shape
    num_blocks, block_size, num_kv_heads, width = partial_key_cache.shape
    num_heads, d_partial = query_partial.shape[1:]
    group = num_heads // num_kv_heads
    tokens = max_blocks * block_size
    device = block_table.device
    if tokens == 0:
        return torch.full((num_reqs, num_kv_heads, 0), float("-inf"), device=device)
    space = workspace if workspace is not None else Workspace()
    # Gather the requests' partial keys, one contiguous row per block (one
    # memcpy-like pass; advanced indexing or a head-major permute is several
    # times slower on CPU): [R, T, kv * p].
    flat = partial_key_cache.reshape(num_blocks, block_size * num_kv_heads * width)
    ids = block_table.reshape(-1).clamp(min=0).long()
    keys = space.get("keys", (ids.shape[0], flat.shape[1]), flat.dtype, device)
    torch.index_select(flat, 0, ids, out=keys)
    if keys.dtype == PACKED_DTYPE:
        rows = keys.view(num_reqs, tokens, num_kv_heads, width)
        keys_f = unpack_int4(rows, d_partial).view(num_reqs, tokens, -1)
    else:
        keys_f = keys.view(num_reqs, tokens, num_kv_heads * d_partial)
    if keys_f.dtype != torch.float32:
        keys_f = keys_f.float()
    # One batched GEMM per KV head (its query heads against its channels),
    # tokens last so the reductions below read contiguous memory.
    q = query_partial.float().reshape(num_reqs, num_kv_heads, group, d_partial)
    if keys.dtype == PACKED_DTYPE:  # 4-bit keys are scored by an 8-bit query
        codes, q_scale = quantize_query(q * scale)
        q, scale = codes.float() * q_scale, 1.0
    logits = space.get(
        "logits", (num_reqs, num_kv_heads, group, tokens), torch.float32, device
    )
    for head in range(num_kv_heads):
        channels = keys_f[:, :, head * d_partial : (head + 1) * d_partial]
        torch.bmm(q[:, head] * scale, channels.transpose(1, 2), out=logits[:, head])
    logits = logits.view(num_reqs, num_heads, tokens)
    positions = torch.arange(tokens, device=device)
    invalid = positions[None, :] >= seq_lens[:, None].to(positions.dtype)  # [R, T]
    # An additive -inf mask: a broadcast add is much cheaper than a
    # broadcast masked_fill on CPU.
    bias = space.get("bias", (num_reqs, 1, tokens), torch.float32, device)
    bias.zero_().masked_fill_(invalid[:, None, :], float("-inf"))
    logits.add_(bias)
    blocks = logits.view(num_reqs, num_kv_heads, group, max_blocks, block_size)
    shift = None  # the residual term, per (request, KV head, head, block)
    if block_bias is not None:
        shift = block_bias.float().view(num_reqs, num_kv_heads, group, max_blocks)
    if rule is BlockScoreRule.MAX:
        best = blocks.amax(dim=4)
        if shift is not None:
            best = best + shift
        return best.amax(dim=2)
    # Block masses in the log domain: with attention sinks at long contexts
    # most blocks lie more than ~100 nats below the best one, where exp()
    # underflows and every such block would score -inf (ties: the ranking
    # among them would be lost).
    block_lse = torch.logsumexp(blocks, dim=4)  # [R, kv, group, M]
    if shift is not None:
        block_lse = block_lse + shift  # -inf past the end stays -inf
    log_mass = block_lse - torch.logsumexp(block_lse, dim=-1, keepdim=True)
    return torch.logsumexp(log_mass, dim=2) - math.log(group)


def residual_block_bias(
    query_residual: torch.Tensor,
    residual_sums: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Each block's residual term: ``scale * <q_res[r, h], mean of the block's
    residual keys>``, the part of every logit of the block that the partial
    channels leave out, taken at the block's mean key.

    Args:
        query_residual: ``[num_reqs, num_heads, d_residual]`` the queries'
            residual channels (query head ``h`` reads KV head ``h // group``).
        residual_sums: ``[num_blocks, num_kv_heads, d_residual]`` float32 sums
            of each block's residual keys.
        block_table: ``[num_reqs, max_blocks]`` physical block ids (negative
            entries read block 0).
        seq_lens: ``[num_reqs]`` tokens per request (the last block holds
            ``seq_len - (n - 1) * block_size`` of them).
        block_size: tokens per block.
        scale: the attention's softmax scale.

    Returns:
        ``[num_reqs, num_heads, max_blocks]`` float32 (0 past a request's
        end, where the scores are ``-inf`` anyway).
    """
    num_reqs, max_blocks = block_table.shape
    _, num_kv_heads, d_residual = residual_sums.shape
    num_heads = query_residual.shape[1]
    group = num_heads // num_kv_heads
    ids = block_table.reshape(-1).clamp(min=0).long()
    sums = residual_sums.index_select(0, ids).view(
        num_reqs, max_blocks, num_kv_heads, d_residual
    )
    q = query_residual.float().reshape(num_reqs, num_kv_heads, group, d_residual)
    # [R, kv, group, M]: one batched product per KV head.
    dots = torch.einsum("rkgc,rmkc->rkgm", q, sums)
    start = torch.arange(max_blocks, device=seq_lens.device) * block_size
    filled = (seq_lens.long()[:, None] - start[None, :]).clamp(0, block_size)
    inverse = torch.where(
        filled > 0,
        scale / filled.clamp(min=1).float(),
        torch.zeros((), device=seq_lens.device),
    )
    return (dots * inverse[:, None, None, :]).reshape(num_reqs, num_heads, max_blocks)
