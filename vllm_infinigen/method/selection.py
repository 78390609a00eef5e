"""Which KV blocks each decode request fetches for one layer.

The engine moves whole blocks shared by all KV heads, so the rule yields one
block set per request per layer. Per request ``r`` with ``n_r =
ceil(seq_len_r / block_size)`` blocks:

1. *Margin* of block ``j`` (logit units, ``<= 0``, the best block has 0):

   * :attr:`HeadReduction.PER_HEAD`: ``max_g (score[g, j] -
     max_j' score[g, j'])``: each KV head measures blocks against its own
     best block (the paper's per-head ``s >= max(s) - alpha`` rule) and the
     block set is the union over heads.
   * :attr:`HeadReduction.MAX`: ``s_j = max_g score[g, j]``, margin ``s_j -
     max_j' s_j'``: heads with lower logits may lose their blocks.
   * :attr:`HeadReduction.MEAN` (default): ``s_j = log mean_g exp(score[g, j])``,
     margin ``s_j - max_j' s_j'``: with ``LOG_MASS`` block scores, the log of
     the block's mass averaged over all query heads.

2. *Forced* blocks: the first ``sink_blocks`` and the last
   ``recent_blocks`` (the newest, partly filled block is always among them
   when ``recent_blocks >= 1``).
3. *Candidates*: other blocks with ``margin >= -alpha``.
4. *Budget*: ``b_r = max(ceil(budget_fraction * n_r), min(n_r, m))``
   with ``m = min_blocks`` (capped by ``max_blocks``), then capped by
   ``max_blocks``; a request of at most ``m`` blocks has all its blocks
   forced, so short requests are read whole. Forced blocks count against
   the budget but are kept even beyond it; the remaining
   ``max(b_r - forced_r, 0)`` places go to the candidates with the largest
   margins; ties go to the newer (higher) block.
5. Output: logical block indices sorted ascending (so the newest block is
   last), padded with :data:`PAD` to a width fixed by shapes and the policy
   only: ``max_blocks`` of the table, or ``max(max_blocks, sink_blocks +
   recent_blocks)`` when a count cap is set (no host sync).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from vllm_infinigen.config import DEFAULT_CONFIG

from .scoring import BlockScoreRule

PAD = -1
"""Padding value of :attr:`BlockSelection.indices` past ``counts``."""

_BUDGET_SLACK = 1e-6
"""Keeps ``ceil(0.3 * 10)`` at 3 despite float rounding (``3.0000000000000004``)."""


class HeadReduction(enum.Enum):
    """How KV heads' block scores become one per block (see module docstring)."""

    PER_HEAD = "per_head"
    MAX = "max"
    MEAN = "mean"


@dataclass(frozen=True)
class SelectionPolicy:
    """Block selection parameters (the defaults are justified in docs/method.md).

    Attributes:
        alpha: logit margin below the best block within which a block is a
            candidate. ``inf`` makes every block a candidate (pure top-k by
            budget).
        budget_fraction: at most this share of a request's blocks (rounded
            up) is selected, forced blocks included; in ``(0, 1]``.
        max_blocks: optional cap on the number of selected blocks (e.g. the
            staging slots per request); ``None``: no cap.
        sink_blocks: leading blocks always selected (attention sinks).
        recent_blocks: trailing blocks always selected (includes the
            partly filled newest block).
        min_blocks: the budget never falls below this many blocks, and a
            request with at most this many blocks reads them all (short
            contexts stay exact); ``0`` turns it off.
        head_reduction: how per-KV-head scores are merged.
        score_rule: the block score rule the scores were made with (read by
            the caller of :func:`~.scoring.block_scores`; kept here so one
            object carries every selection option).
        residual: the scores include each block's residual term
            (:func:`~.scoring.residual_block_bias`), read like ``score_rule``
            by the caller of the scorer.
    """

    # Defaults measured on Qwen2.5-Coder-0.5B, 1536-token prompt, block size
    # 16/32 (benchmarks/results/recall.json, docs/method.md): LOG_MASS + MEAN
    # recalls 3-4 points more attention mass than MAX + PER_HEAD at the same
    # budget; alpha 8 never removes a block the 20-30% budget would keep.
    alpha: float = 8.0
    budget_fraction: float = 0.2
    max_blocks: int | None = None
    sink_blocks: int = 1
    recent_blocks: int = 1
    min_blocks: int = DEFAULT_CONFIG.min_blocks
    head_reduction: HeadReduction = HeadReduction.MEAN
    score_rule: BlockScoreRule = BlockScoreRule.LOG_MASS
    residual: bool = True

    def __post_init__(self) -> None:
        if not self.alpha >= 0.0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if not 0.0 < self.budget_fraction <= 1.0:
            raise ValueError(
                f"budget_fraction must be in (0, 1], got {self.budget_fraction}"
            )
        if self.max_blocks is not None and self.max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1 or None, got {self.max_blocks}")
        if self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0, got {self.sink_blocks}")
        if self.recent_blocks < 0:
            raise ValueError(f"recent_blocks must be >= 0, got {self.recent_blocks}")
        if self.min_blocks < 0:
            raise ValueError(f"min_blocks must be >= 0, got {self.min_blocks}")

    @property
    def effective_min_blocks(self) -> int:
        """``min_blocks``, capped by ``max_blocks`` when a cap is set."""
        if self.max_blocks is None:
            return self.min_blocks
        return min(self.min_blocks, self.max_blocks)

    def output_width(self, table_width: int) -> int:
        """Columns of :attr:`BlockSelection.indices` for a block table width."""
        if self.max_blocks is None:
            return table_width
        return min(
            table_width, max(self.max_blocks, self.sink_blocks + self.recent_blocks)
        )


@dataclass(frozen=True, eq=False)
class BlockSelection:
    """Selected logical blocks per request.

    Attributes:
        indices: ``[num_reqs, width]`` int64 logical block indices (positions
            in the request's block table), ascending, :data:`PAD` after
            ``counts[r]`` entries.
        counts: ``[num_reqs]`` int64 number of selected blocks.
    """

    indices: torch.Tensor
    counts: torch.Tensor


def blocks_for(tokens: int, block_size: int) -> int:
    """``ceil(tokens / block_size)`` of a host int."""
    return -(-tokens // block_size)


def num_blocks_of(seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[num_reqs]`` -> ``[num_reqs]`` int64: ``ceil(seq_len / block_size)``."""
    return torch.div(
        seq_lens.long() + block_size - 1, block_size, rounding_mode="floor"
    )


def valid_blocks(
    seq_lens: torch.Tensor, block_size: int, max_blocks: int
) -> torch.Tensor:
    """``[num_reqs, max_blocks]`` bool: block ``j`` holds tokens of request
    ``r`` (``j < ceil(seq_lens[r] / block_size)``); on ``seq_lens``' device."""
    logical = torch.arange(max_blocks, device=seq_lens.device)[None, :]
    return logical < num_blocks_of(seq_lens, block_size)[:, None]


def budget_blocks(
    n_blocks: torch.Tensor,
    policy: SelectionPolicy,
) -> torch.Tensor:
    """Block budget ``b_r`` of each request (module docstring, step 4).

    ``n_blocks``: int tensor of blocks per request (any shape); same shape out.
    """
    budget = torch.ceil(n_blocks.double() * policy.budget_fraction - _BUDGET_SLACK)
    budget = torch.maximum(
        budget.long(), n_blocks.long().clamp(max=policy.effective_min_blocks)
    )
    if policy.max_blocks is not None:
        budget = budget.clamp(max=policy.max_blocks)
    return budget


def block_margins(
    scores: torch.Tensor, valid: torch.Tensor, reduction: HeadReduction
) -> torch.Tensor:
    """Per-block margin below the request's best block.

    Args:
        scores: ``[num_reqs, num_kv_heads, max_blocks]`` from
            :func:`~.scoring.block_scores`.
        valid: ``[num_reqs, max_blocks]`` bool, block exists.
        reduction: how heads are merged.

    Returns:
        ``[num_reqs, max_blocks]`` float32, ``<= 0`` on valid blocks,
        ``-inf`` elsewhere.
    """
    # masked_fill with a Python scalar: no host-to-device copy on CUDA
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    if reduction is HeadReduction.PER_HEAD:
        best = scores.amax(dim=-1, keepdim=True)
        margin = (scores - best).amax(dim=1)
    else:
        if reduction is HeadReduction.MAX:
            merged = scores.amax(dim=1)
        else:
            merged = torch.logsumexp(scores, dim=1) - math.log(scores.shape[1])
        margin = merged - merged.amax(dim=-1, keepdim=True)
    return margin.masked_fill(~valid, float("-inf"))


def _rank_descending_newest_first(keys: torch.Tensor) -> torch.Tensor:
    """Rank (0 = first) of each column by ``keys`` descending, ties: higher index.

    ``keys: [num_reqs, n] -> [num_reqs, n]`` int64.
    """
    n = keys.shape[1]
    order = torch.sort(keys.flip(1), dim=1, descending=True, stable=True).indices
    order = n - 1 - order
    ranks = torch.empty_like(order)
    positions = torch.arange(n, device=keys.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def select_blocks(
    scores: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    policy: SelectionPolicy,
) -> BlockSelection:
    """Choose the blocks each request reads for one layer (module docstring).

    Args:
        scores: ``[num_reqs, num_kv_heads, max_blocks]`` block scores.
        seq_lens: ``[num_reqs]`` int tokens per request (``>= 1``).
        block_size: tokens per block.
        policy: the selection parameters.

    Returns:
        A :class:`BlockSelection` of width ``policy.output_width(max_blocks)``.
    """
    num_reqs, _, max_blocks = scores.shape
    device = scores.device
    width = policy.output_width(max_blocks)
    if max_blocks == 0:
        empty = torch.empty(num_reqs, 0, dtype=torch.long, device=device)
        return BlockSelection(
            empty, torch.zeros(num_reqs, dtype=torch.long, device=device)
        )
    n_blocks = num_blocks_of(seq_lens.to(device), block_size)[:, None]  # [R, 1]
    logical = torch.arange(max_blocks, device=device)[None, :]  # [1, M]
    valid = logical < n_blocks
    least = policy.effective_min_blocks
    budget = budget_blocks(n_blocks, policy)
    forced = valid & (
        (logical < policy.sink_blocks)
        | (logical >= n_blocks - policy.recent_blocks)
        | (n_blocks <= least)
    )
    margin = block_margins(scores, valid, policy.head_reduction)
    candidate = valid & ~forced & (margin >= -policy.alpha)

    room = (budget - forced.sum(dim=1, keepdim=True)).clamp(min=0)
    n_take = torch.minimum(room, candidate.sum(dim=1, keepdim=True))

    ranks = _rank_descending_newest_first(margin.masked_fill(~candidate, float("-inf")))
    selected = forced | (candidate & (ranks < n_take))

    return selection_from_mask(selected, width)


def selection_from_mask(
    selected: torch.Tensor, width: int | None = None
) -> BlockSelection:
    """Turn a block mask into a :class:`BlockSelection`.

    Args:
        selected: ``[num_reqs, max_blocks]`` bool.
        width: output columns (``None``: ``max_blocks``); must be at least the
            largest row count, or selected blocks are dropped from ``indices``.

    Returns:
        Indices ascending, :data:`PAD`-padded; counts of ``True`` per row.
    """
    max_blocks = selected.shape[1]
    width = max_blocks if width is None else width
    logical = torch.arange(max_blocks, device=selected.device)[None, :]
    sort_keys = torch.where(selected, logical, max_blocks)
    indices = torch.sort(sort_keys, dim=1).values[:, :width]
    indices = torch.where(indices < max_blocks, indices, PAD)
    return BlockSelection(indices=indices, counts=selected.sum(dim=1))


def selected_block_ids(
    block_table: torch.Tensor, selection: BlockSelection
) -> torch.Tensor:
    """Physical block ids of the selection.

    Args:
        block_table: ``[num_reqs, max_blocks]`` int physical block ids.
        selection: from :func:`select_blocks`.

    Returns:
        ``[num_reqs, width]`` in ``block_table``'s dtype, :data:`PAD` where
        ``selection.indices`` is padded. Row ``r``'s first ``counts[r]``
        entries form a compacted block table (newest block last).
    """
    idx = selection.indices
    ids = torch.gather(block_table, 1, idx.clamp(min=0).to(torch.long))
    return torch.where(idx >= 0, ids, torch.full_like(ids, PAD))
