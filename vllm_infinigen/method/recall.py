"""Attention-mass recall of a block selection, and the baselines it is judged by.

Recall of a selection = the share of the true attention probability mass
(softmax of the real query against all cached keys, averaged over query
heads) that falls in the selected blocks. 1.0 means the sparse attention
sees every token that matters. Baselines of the same size per request:

* oracle: the blocks with the largest true mass (the best possible set);
* random: uniformly random blocks (expected recall = share of blocks);
* window: the sink blocks plus the most recent blocks (StreamingLLM-like).

:func:`evaluate_layer` measures one layer on one sequence, going through the
same paged path as the engine (a partial key cache with permuted block ids,
:func:`~.scoring.block_scores`, :func:`~.selection.select_blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .calibration import AttentionProjection
from .partial_cache import new_partial_key_cache, write_partial_keys
from .scoring import block_scores, residual_block_bias
from .selection import (
    BlockSelection,
    SelectionPolicy,
    num_blocks_of,
    select_blocks,
    selection_from_mask,
    valid_blocks,
)
from .speculator import LayerSpeculator


def attention_block_mass(
    queries: torch.Tensor,
    keys: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """True attention mass per block, averaged over query heads.

    Args:
        queries: ``[num_reqs, num_heads, head_dim]`` real post-RoPE queries.
        keys: ``[tokens, num_kv_heads, head_dim]`` real post-RoPE keys of one
            sequence; request ``r`` attends to ``keys[:seq_lens[r]]``.
        seq_lens: ``[num_reqs]`` int, ``<= tokens``.
        block_size: tokens per block.
        scale: softmax scale.
        dtype: the arithmetic's precision (float64 for the benchmarks;
            the engine's online sample takes float32).

    Returns:
        ``[num_reqs, ceil(tokens / block_size)]`` in ``dtype`` on ``keys``'
        device; each row sums to 1.
    """
    tokens, num_kv_heads, head_dim = keys.shape
    num_reqs, num_heads, _ = queries.shape
    group = num_heads // num_kv_heads
    q = queries.to(dtype).reshape(num_reqs, num_kv_heads, group, head_dim)
    logits = torch.einsum("rkgd,tkd->rkgt", q, keys.to(dtype)) * scale
    positions = torch.arange(tokens, device=keys.device)
    valid = positions[None, :] < seq_lens.to(keys.device)[:, None]
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = logits.softmax(dim=-1).mean(dim=(1, 2))  # [R, T]
    max_blocks = -(-tokens // block_size)
    padded = probs.new_zeros(num_reqs, max_blocks * block_size)
    padded[:, :tokens] = probs
    return padded.view(num_reqs, max_blocks, block_size).sum(dim=-1)


def selected_share(
    query: torch.Tensor,
    keys: torch.Tensor,
    selected: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Share of one decode token's exact attention mass in its selected blocks.

    The online health signal of the selection (the engine samples it on a
    few decode steps): 1 means the blocks read hold all the attention the
    dense kernel would have paid, averaged over query heads.

    Args:
        query: ``[num_heads, head_dim]`` the layer's real post-RoPE query.
        keys: ``[tokens, num_kv_heads, head_dim]`` the request's keys, in
            position order (its whole context, this step's token included).
        selected: ``[ceil(tokens / block_size)]`` bool, block was read.
        block_size: tokens per block.
        scale: the layer's softmax scale.

    Returns:
        A 0-dim float32 tensor in ``[0, 1]``.
    """
    tokens = keys.shape[0]
    seq_len = torch.full((1,), tokens, device=keys.device)
    mass = attention_block_mass(
        query[None], keys, seq_len, block_size, scale, dtype=torch.float32
    )[0]
    return (mass * selected).sum().clamp(0.0, 1.0)


def selection_mass(block_mass: torch.Tensor, selection: BlockSelection) -> torch.Tensor:
    """``block_mass: [R, M]`` -> ``[R]`` mass inside the selected blocks."""
    idx = selection.indices
    picked = torch.gather(block_mass, 1, idx.clamp(min=0))
    return (picked * (idx >= 0)).sum(dim=1)


def _top_count_mask(keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[R, M]`` mask of the ``counts[r]`` largest ``keys`` per row."""
    order = torch.argsort(keys, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(keys.shape[1]).expand_as(order)
    )
    return ranks < counts[:, None]


def oracle_selection(
    block_mass: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    counts: torch.Tensor,
) -> BlockSelection:
    """The ``counts[r]`` blocks with the largest true mass per request."""
    valid = valid_blocks(seq_lens, block_size, block_mass.shape[1])
    keys = torch.where(valid, block_mass, torch.tensor(-1.0, dtype=block_mass.dtype))
    return selection_from_mask(_top_count_mask(keys, counts) & valid)


def random_selection(
    max_blocks: int,
    seq_lens: torch.Tensor,
    block_size: int,
    counts: torch.Tensor,
    generator: torch.Generator,
) -> BlockSelection:
    """``counts[r]`` uniformly random blocks among each request's blocks."""
    valid = valid_blocks(seq_lens, block_size, max_blocks)
    keys = torch.rand(valid.shape, generator=generator, dtype=torch.float64)
    keys = torch.where(valid, keys, torch.tensor(-1.0, dtype=torch.float64))
    return selection_from_mask(_top_count_mask(keys, counts) & valid)


def window_selection(
    max_blocks: int,
    seq_lens: torch.Tensor,
    block_size: int,
    counts: torch.Tensor,
    sink_blocks: int,
) -> BlockSelection:
    """The first ``sink_blocks`` blocks, then the newest, ``counts[r]`` in all."""
    n = num_blocks_of(seq_lens, block_size)[:, None]
    logical = torch.arange(max_blocks)[None, :]
    sink = torch.clamp(counts[:, None], max=sink_blocks)
    recent = counts[:, None] - sink
    mask = (logical < sink) | ((logical >= n - recent) & (logical < n))
    return selection_from_mask(mask)


def build_paged_cache(
    partial_keys: torch.Tensor,
    block_size: int,
    num_reqs: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Page one sequence's partial keys under randomly permuted block ids.

    Args:
        partial_keys: ``[tokens, num_kv_heads, d_partial]``.
        block_size: tokens per block.
        num_reqs: rows of the block table (all share the sequence's blocks).
        generator: drives the permutation.

    Returns:
        ``cache: [2 * max_blocks, block_size, num_kv_heads, d_partial]`` and
        ``block_table: [num_reqs, max_blocks]`` int32.
    """
    tokens, num_kv_heads, d_partial = partial_keys.shape
    max_blocks = -(-tokens // block_size)
    physical = torch.randperm(2 * max_blocks, generator=generator)[:max_blocks]
    cache = new_partial_key_cache(
        2 * max_blocks, block_size, num_kv_heads, d_partial, dtype=partial_keys.dtype
    )
    token_index = torch.arange(tokens)
    slots = physical[token_index // block_size] * block_size + token_index % block_size
    write_partial_keys(cache, partial_keys, slots)
    table = physical.to(torch.int32)[None, :].expand(num_reqs, -1).contiguous()
    return cache, table


def residual_bias_of_requests(
    speculator: LayerSpeculator,
    queries: torch.Tensor,
    keys: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """The residual block term (:func:`~.scoring.residual_block_bias`) of
    requests that read one sequence's first ``seq_lens[r]`` tokens, each
    block's sum over the request's own tokens only (as the engine holds it).

    Args:
        queries: ``[num_reqs, num_heads, head_dim]`` whole (post-RoPE) queries.
        keys: ``[tokens, num_kv_heads, head_dim]`` the sequence's keys.

    Returns:
        ``[num_reqs, num_heads, max_blocks]`` float32.
    """
    residual = speculator.residual_keys(keys).float()
    num_reqs = seq_lens.shape[0]
    max_blocks = -(-keys.shape[0] // block_size)
    sums = torch.zeros(num_reqs * max_blocks, *residual.shape[1:])
    for r, n in enumerate(seq_lens.tolist()):
        blocks = r * max_blocks + torch.arange(n) // block_size
        sums.index_add_(0, blocks, residual[:n])
    table = torch.arange(num_reqs * max_blocks).view(num_reqs, max_blocks)
    return residual_block_bias(
        speculator.residual_query(queries), sums, table, seq_lens, block_size, scale
    )


@dataclass(frozen=True, eq=False)
class LayerRecall:
    """Per-request results of one layer (all ``[num_reqs]`` float64).

    Attributes:
        method: recall of the speculated selection.
        oracle, random, window: recall of the baselines of the same size.
        fraction: selected blocks / request's blocks.
    """

    method: torch.Tensor
    oracle: torch.Tensor
    random: torch.Tensor
    window: torch.Tensor
    fraction: torch.Tensor


def evaluate_layer(
    speculator: LayerSpeculator,
    prev_x: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    eval_positions: torch.Tensor,
    policy: SelectionPolicy,
    block_size: int,
    generator: torch.Generator,
    real_query: bool = False,
) -> LayerRecall:
    """Recall of speculation for one layer at several decode positions.

    Decode request ``r`` is the token at ``eval_positions[r]`` with the cache
    holding tokens ``0..eval_positions[r]`` (itself included).

    Args:
        speculator: this layer's speculator.
        prev_x: ``[num_reqs, hidden]`` the previous layer's attention input
            at the decode positions.
        queries: ``[num_reqs, num_heads, head_dim]`` this layer's real
            post-RoPE queries at the decode positions.
        keys: ``[tokens, num_kv_heads, head_dim]`` this layer's real
            post-RoPE keys of the whole sequence.
        eval_positions: ``[num_reqs]`` int64 decode positions, ``< tokens``.
        policy: selection policy.
        block_size: tokens per block.
        generator: drives the block permutation and the random baseline.
        real_query: score with the partial channels of ``queries`` (the
            engine's in-place default) instead of the speculated query.
    """
    scale = speculator.head_dim**-0.5
    seq_lens = eval_positions + 1
    num_reqs = eval_positions.shape[0]
    if real_query:
        q_spec = speculator.partial_query(queries)
    else:
        q_spec = speculator.speculate(prev_x, eval_positions)
    cache, table = build_paged_cache(
        speculator.partial_keys(keys), block_size, num_reqs, generator
    )
    bias = None
    whole = queries if real_query else speculator.speculate_full(prev_x, eval_positions)
    if policy.residual and speculator.d_residual > 0 and whole is not None:
        bias = residual_bias_of_requests(
            speculator, whole, keys, seq_lens, block_size, scale
        )
    scores = block_scores(
        q_spec, cache, table, seq_lens, scale, policy.score_rule, block_bias=bias
    )
    chosen = select_blocks(scores, seq_lens, block_size, policy)
    mass = attention_block_mass(queries, keys, seq_lens, block_size, scale)
    counts = chosen.counts
    max_blocks = mass.shape[1]
    oracle = oracle_selection(mass, seq_lens, block_size, counts)
    rand = random_selection(max_blocks, seq_lens, block_size, counts, generator)
    window = window_selection(
        max_blocks, seq_lens, block_size, counts, policy.sink_blocks
    )
    return LayerRecall(
        method=selection_mass(mass, chosen),
        oracle=selection_mass(mass, oracle),
        random=selection_mass(mass, rand),
        window=selection_mass(mass, window),
        fraction=counts.double() / num_blocks_of(seq_lens, block_size).double(),
    )


@dataclass(frozen=True, eq=False)
class RecallInputs:
    """One evaluation sequence, captured once and reused across settings.

    Attributes:
        attention_inputs: per layer ``[tokens, hidden]`` attention input ``x``.
        queries: per layer ``[num_reqs, num_heads, head_dim]`` real post-RoPE
            queries at ``eval_positions``.
        keys: per layer ``[tokens, num_kv_heads, head_dim]`` real post-RoPE keys.
        eval_positions: ``[num_reqs]`` int64 decode positions.
    """

    attention_inputs: list[torch.Tensor]
    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    eval_positions: torch.Tensor

    @classmethod
    def from_attention_inputs(
        cls,
        projections: Sequence[AttentionProjection],
        attention_inputs: list[torch.Tensor],
        eval_positions: torch.Tensor,
    ) -> RecallInputs:
        """Recompute the real queries and keys from the captured inputs."""
        tokens = attention_inputs[0].shape[0]
        positions = torch.arange(tokens)
        queries, keys = [], []
        with torch.no_grad():
            for proj, x in zip(projections, attention_inputs, strict=True):
                queries.append(proj.queries(x[eval_positions], eval_positions).float())
                keys.append(proj.keys(x, positions).float())
        return cls(attention_inputs, queries, keys, eval_positions)


def evaluate_recall(
    speculators: Sequence[LayerSpeculator],
    inputs: RecallInputs,
    policy: SelectionPolicy,
    block_size: int,
    *,
    first_layer: int = 1,
    seed: int = 0,
    real_query: bool = False,
) -> dict[int, LayerRecall]:
    """Recall of every speculated layer (layer ``L`` speculated from ``L-1``).

    Args:
        speculators: per layer.
        inputs: the captured evaluation sequence.
        policy: selection policy.
        block_size: tokens per block.
        first_layer: first speculated layer (earlier ones run dense).
        seed: seeds the block permutation and the random baseline.
        real_query: score with each layer's real query (:func:`evaluate_layer`).

    Returns:
        ``{layer: LayerRecall}`` for layers ``first_layer..num_layers-1``.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    pos = inputs.eval_positions
    with torch.no_grad():
        for layer in range(max(first_layer, 1), len(speculators)):
            out[layer] = evaluate_layer(
                speculators[layer],
                inputs.attention_inputs[layer - 1][pos],
                inputs.queries[layer],
                inputs.keys[layer],
                pos,
                policy,
                block_size,
                generator,
                real_query,
            )
    return out
