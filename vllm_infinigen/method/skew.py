"""Skewing: an orthogonal change of basis per KV head, and the partial channels.

Definitions (per layer, per KV head ``g``; ``G = num_heads / num_kv_heads``):

* ``Q_g``: the post-RoPE calibration queries of the ``G`` query heads that
  share KV head ``g``, stacked along tokens: ``[G * tokens, head_dim]``.
  ``K_g``: the post-RoPE calibration keys of KV head ``g``: ``[tokens,
  head_dim]``. Biases (Qwen2) and head norms (Qwen3) are included: these are
  the vectors the attention kernel sees.
* The skew matrix ``A_g`` (``[head_dim, head_dim]``, orthogonal) holds the
  right singular vectors ``v_i`` of ``Q_g = U S V^T`` as columns, ordered by
  ``sigma_i(Q_g) * ||K_g v_i||`` descending: the query's spread along
  ``v_i`` times the key's spread along the same direction, an estimate of how
  much ``v_i`` contributes to ``Q K^T``. (The paper multiplies the i-th
  singular values of Q and of K, which pairs unrelated directions; ours equals
  it when K shares Q's singular vectors.) Each column's sign is fixed so that
  its largest-magnitude entry is positive, which makes ``A`` deterministic.
  ``(Q A)(K A)^T = Q A A^T K^T = Q K^T``: attention is unchanged.
* Why one ``A`` per KV head: the partial key cache is per KV head and is read
  by all ``G`` query heads of the group, so they must share the basis; the
  SVD of the stacked queries finds the directions that carry the group's
  query energy.
* Partial channels: the ``d_partial = ceil(ratio * head_dim)`` columns of
  ``Q_g A_g`` with the largest score, returned ascending. Criterion
  :attr:`ChannelCriterion.QUERY` (InfiniGen artifact): ``sum_t |Q_g A_g|``;
  :attr:`ChannelCriterion.QUERY_KEY` (the paper's text, artifact issue #7):
  ``mean_t |Q_g A_g| * mean_t |K_g A_g|``;
  :attr:`ChannelCriterion.QUERY_KEY_SPREAD` (this project, made for the
  residual block term): ``mean_t (Q_g A_g)^2`` times the keys' variance
  around their mean within blocks of :data:`SPREAD_BLOCK` consecutive
  calibration tokens, the expected within-block variation of the channel's
  logit term. Ties go to the lower column.
* Without skewing (``A = I``) the same criteria pick raw post-RoPE channels.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch


class ChannelCriterion(enum.Enum):
    """How partial channels are ranked (see module docstring)."""

    QUERY = "query"
    QUERY_KEY = "query_key"
    QUERY_KEY_SPREAD = "query_key_spread"


#: Tokens per block over which :attr:`ChannelCriterion.QUERY_KEY_SPREAD`
#: measures the keys' spread (consecutive calibration tokens; the engine's
#: CPU default block size).
SPREAD_BLOCK = 32


def partial_dim(head_dim: int, ratio: float) -> int:
    """Number of partial channels: ``ceil(ratio * head_dim)``, in ``[1, head_dim]``.

    A ``1e-9`` slack keeps ``0.3 * 10`` from rounding up to 4.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"partial_ratio must be in (0, 1], got {ratio}")
    return max(1, min(head_dim, math.ceil(ratio * head_dim - 1e-9)))


def group_queries(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Stack the queries of each KV head's query group along tokens.

    Args:
        queries: ``[tokens, num_heads, head_dim]``; query head ``h`` belongs
            to KV head ``h // (num_heads // num_kv_heads)`` (vLLM and HF order).

    Returns:
        ``[num_kv_heads, group_size * tokens, head_dim]``; within a group the
        rows are ordered head-major (all tokens of the group's first head
        first).
    """
    tokens, num_heads, head_dim = queries.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads not divisible by {num_kv_heads}")
    group = num_heads // num_kv_heads
    grouped = queries.reshape(tokens, num_kv_heads, group, head_dim)
    return grouped.permute(1, 2, 0, 3).reshape(num_kv_heads, group * tokens, head_dim)


def _fix_signs(basis: torch.Tensor) -> torch.Tensor:
    """``[..., d, d]``: flip each column so its largest-|.| entry is positive."""
    pivot = basis.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(basis, -2, pivot))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return basis * signs


def compute_skew(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The skew matrices of one layer.

    Args:
        queries: ``[tokens, num_heads, head_dim]`` post-RoPE calibration queries.
        keys: ``[tokens, num_kv_heads, head_dim]`` post-RoPE calibration keys.

    Returns:
        ``[num_kv_heads, head_dim, head_dim]`` float32, each orthogonal.
        Computed in float64 for accuracy and reproducibility.
    """
    num_kv_heads = keys.shape[1]
    q_grouped = group_queries(queries.to(torch.float64), num_kv_heads)
    k_heads = keys.to(torch.float64).transpose(0, 1)  # [kv, tokens, d]
    # V and S from the eigendecomposition of the small Gram matrix Q^T Q
    # (float64: the squared condition number costs nothing that matters here;
    # a tall SVD or QR of Q is 5-20x slower on CPU).
    gram = q_grouped.transpose(-1, -2) @ q_grouped  # [kv, d, d]
    eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
    sigma = eigvals.flip(-1).clamp(min=0).sqrt()  # [kv, d] descending
    basis = eigvecs.flip(-1)  # [kv, d, d], columns = right singular vectors
    key_spread = torch.linalg.vector_norm(k_heads @ basis, dim=-2)  # [kv, d]
    importance = sigma * key_spread
    order = torch.argsort(importance, dim=-1, descending=True, stable=True)
    basis = torch.gather(basis, -1, order[:, None, :].expand_as(basis))
    return _fix_signs(basis).to(torch.float32)


def identity_skew(num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """``[num_kv_heads, head_dim, head_dim]`` identities: "no skewing"."""
    return torch.eye(head_dim).expand(num_kv_heads, head_dim, head_dim).clone()


def channel_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    skew: torch.Tensor,
    criterion: ChannelCriterion,
) -> torch.Tensor:
    """Importance of each skewed channel.

    Args:
        queries: ``[tokens, num_heads, head_dim]`` post-RoPE.
        keys: ``[tokens, num_kv_heads, head_dim]`` post-RoPE.
        skew: ``[num_kv_heads, head_dim, head_dim]``.
        criterion: which magnitude to rank by.

    Returns:
        ``[num_kv_heads, head_dim]`` float64 scores (larger = keep).
    """
    num_kv_heads = keys.shape[1]
    a = skew.to(torch.float64)
    q_mag = (group_queries(queries.to(torch.float64), num_kv_heads) @ a).abs()
    if criterion is ChannelCriterion.QUERY:
        return q_mag.sum(dim=1)
    k_skewed = keys.to(torch.float64).transpose(0, 1) @ a  # [kv, tokens, d]
    if criterion is ChannelCriterion.QUERY_KEY:
        return q_mag.mean(dim=1) * k_skewed.abs().mean(dim=1)
    # QUERY_KEY_SPREAD: a channel's share of the logits' variation *within*
    # blocks. The residual block term carries each block's mean key on the
    # channels left out, so a channel whose keys are nearly constant across
    # a block costs little to leave out, however large the query there.
    blocks = max(1, k_skewed.shape[1] // SPREAD_BLOCK)
    width = min(SPREAD_BLOCK, k_skewed.shape[1])
    k_blocks = k_skewed[:, : blocks * width].reshape(
        k_skewed.shape[0], blocks, width, -1
    )
    spread = (k_blocks - k_blocks.mean(dim=2, keepdim=True)).pow(2).mean(dim=(1, 2))
    return q_mag.pow(2).mean(dim=1) * spread


def top_channels(scores: torch.Tensor, d_partial: int) -> torch.Tensor:
    """``scores: [num_kv_heads, head_dim]`` -> ``[num_kv_heads, d_partial]`` int64.

    The ``d_partial`` highest-scoring channels per head (ties: lower channel
    first), returned in ascending channel order.
    """
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return order[:, :d_partial].sort(dim=-1).values


@dataclass(frozen=True, eq=False)
class LayerSkew:
    """The calibrated, frozen skew of one layer (tensors only; cacheable).

    Attributes:
        skew: ``[num_kv_heads, head_dim, head_dim]`` float32 orthogonal ``A``.
        channels: ``[num_kv_heads, d_partial]`` int64, ascending per head.
    """

    skew: torch.Tensor
    channels: torch.Tensor

    def __post_init__(self) -> None:
        kv, d, d2 = self.skew.shape
        if d != d2 or self.channels.shape[0] != kv:
            raise ValueError(
                f"skew {tuple(self.skew.shape)} and channels "
                f"{tuple(self.channels.shape)} disagree"
            )

    @property
    def num_kv_heads(self) -> int:
        return int(self.skew.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.skew.shape[1])

    @property
    def d_partial(self) -> int:
        return int(self.channels.shape[1])

    def kv_heads(self, heads: range) -> LayerSkew:
        """The skew of a subset of this layer's KV heads (a tensor-parallel
        rank's), ``heads`` a range of KV head indices."""
        if heads.start < 0 or heads.stop > self.num_kv_heads or len(heads) < 1:
            raise ValueError(f"KV heads {heads} outside 0..{self.num_kv_heads - 1}")
        part = slice(heads.start, heads.stop, heads.step)
        return LayerSkew(
            skew=self.skew[part].contiguous(), channels=self.channels[part].contiguous()
        )

    def partial_basis(self) -> torch.Tensor:
        """``A[:, :, channels]``: ``[num_kv_heads, head_dim, d_partial]``."""
        return self._columns(self.channels)

    def residual_channels(self) -> torch.Tensor:
        """The skewed channels left out of the partial keys, ascending per
        head: ``[num_kv_heads, head_dim - d_partial]`` int64."""
        kept = torch.zeros(self.num_kv_heads, self.head_dim, dtype=torch.bool)
        kept.scatter_(1, self.channels, True)
        rest = torch.arange(self.head_dim).expand(self.num_kv_heads, -1)
        return rest[~kept].view(self.num_kv_heads, self.head_dim - self.d_partial)

    def residual_basis(self) -> torch.Tensor:
        """``A[:, :, residual channels]``: ``[num_kv_heads, head_dim,
        head_dim - d_partial]``."""
        return self._columns(self.residual_channels())

    def _columns(self, channels: torch.Tensor) -> torch.Tensor:
        """``A[:, :, channels]`` for ``[num_kv_heads, c]`` channel indices."""
        index = channels[:, None, :].expand(-1, self.head_dim, -1)
        return torch.gather(self.skew, 2, index)


def fit_layer_skew(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    partial_ratio: float,
    criterion: ChannelCriterion = ChannelCriterion.QUERY,
    skew: bool = True,
) -> LayerSkew:
    """Skew matrices and partial channels of one layer from calibration data.

    Args:
        queries: ``[tokens, num_heads, head_dim]`` post-RoPE calibration queries.
        keys: ``[tokens, num_kv_heads, head_dim]`` post-RoPE calibration keys.
        partial_ratio: fraction of ``head_dim`` kept (see :func:`partial_dim`).
        criterion: channel ranking rule.
        skew: ``False`` uses ``A = I`` (the "no skewing" baseline).
    """
    _, num_kv_heads, head_dim = keys.shape
    a = compute_skew(queries, keys) if skew else identity_skew(num_kv_heads, head_dim)
    scores = channel_scores(queries, keys, a, criterion)
    channels = top_channels(scores, partial_dim(head_dim, partial_ratio))
    return LayerSkew(skew=a, channels=channels)


def fold_skew_into_projection(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    basis: torch.Tensor,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold a per-KV-head basis into a q or k projection (models without RoPE).

    For head ``h`` of group ``g``: ``(x W_h^T + b_h) B_g = x (B_g^T W_h)^T +
    b_h B_g``. With ``basis = A`` this is the OPT-style fold of the skew into
    ``W_q``/``W_k``; with ``basis = A[:, :, channels]`` it gives the partial
    projection that computes only ``d_partial`` outputs per head.

    Args:
        weight: ``[num_heads * head_dim, hidden]`` (``nn.Linear`` layout).
        bias: ``[num_heads * head_dim]`` or ``None``.
        basis: ``[num_kv_heads, head_dim, out_dim]``.
        num_heads: heads of this projection (query heads for ``W_q``, KV
            heads for ``W_k``).

    Returns:
        ``weight: [num_heads * out_dim, hidden]``, ``bias: [num_heads *
        out_dim]`` or ``None``, in ``weight``'s dtype.
    """
    num_kv_heads, head_dim, out_dim = basis.shape
    hidden = weight.shape[1]
    group = num_heads // num_kv_heads
    per_head = basis.repeat_interleave(group, dim=0).to(torch.float64)  # [H, d, o]
    w = weight.to(torch.float64).reshape(num_heads, head_dim, hidden)
    folded_w = torch.einsum("hdo,hdi->hoi", per_head, w)
    folded_b = None
    if bias is not None:
        b = bias.to(torch.float64).reshape(num_heads, head_dim)
        folded_b = torch.einsum("hdo,hd->ho", per_head, b).reshape(-1).to(bias.dtype)
    return folded_w.reshape(num_heads * out_dim, hidden).to(weight.dtype), folded_b
