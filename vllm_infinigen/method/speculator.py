"""The speculative partial query of layer L and the partial keys it is scored on.

Speculation for layer ``L`` runs on layer ``L-1``'s attention input ``x``
(after ``L-1``'s input layernorm): ``q' = (RoPE(norm(x W_q(L)^T + b_q)) A)
[:, channels]``, ``d_partial`` channels per query head. Partial keys are the
same columns of the real post-RoPE keys of layer ``L``: ``k' = (k A)[...,
channels]``.

The channels left out (``head_dim - d_partial`` of them) enter the block
scores through each block's *mean* residual key (``engine`` keeps per block
the sum of ``(k A)[..., residual channels]`` over its tokens): a query's
residual part times that mean is added to every logit of the block, at a
cost per block, not per token (``docs/method.md``, "Residual block means").

Two ways to compute ``q'`` (chosen by :meth:`LayerSpeculator.build`):

* **rotated** (RoPE or a head norm present): RoPE mixes channel pairs ``(i,
  i + head_dim/2)`` with a position-dependent angle, and ``A`` mixes all
  channels, so every skewed channel depends on every row of ``W_q``. The full
  query of each head is computed, normed, rotated, then projected with
  ``A[:, channels]``. Cost per token: ``num_heads * head_dim * hidden`` MACs
  (the same as the layer's own q projection) plus ``num_heads * head_dim *
  d_partial``. For Qwen2.5-0.5B: 0.80 M + 0.01 M MACs per token per layer.
* **folded** (no RoPE, no head norm; OPT-style): ``A[:, channels]`` is folded
  into ``W_q`` and ``b_q`` once (:func:`~.skew.fold_skew_into_projection`),
  so only ``num_heads * d_partial`` rows are computed: ``num_heads *
  d_partial * hidden`` MACs, a ``d_partial / head_dim`` share of the full
  projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rotary import HeadNormFn, RotaryFn
from .skew import LayerSkew, fold_skew_into_projection


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one tensor-parallel rank computes.

    vLLM splits a layer's query heads evenly over the ranks; KV heads too
    when there are at least as many as ranks, else each KV head is
    replicated on ``tp_size / num_kv_heads`` consecutive ranks (one KV head
    per rank). Either way a rank's query heads read only its KV heads.

    Attributes:
        query_heads: the rank's query heads (global indices).
        kv_heads: the rank's KV heads (global indices).
        total_heads, total_kv_heads: the whole layer's.
    """

    query_heads: range
    kv_heads: range
    total_heads: int
    total_kv_heads: int

    @classmethod
    def of_rank(
        cls, num_heads: int, num_kv_heads: int, tp_size: int, rank: int
    ) -> HeadShard:
        """Rank ``rank``'s heads among ``tp_size`` (vLLM's partition)."""
        if not 0 <= rank < tp_size:
            raise ValueError(f"rank {rank} outside 0..{tp_size - 1}")
        if num_heads % tp_size:
            raise ValueError(
                f"tensor_parallel_size={tp_size} does not divide the "
                f"{num_heads} query heads"
            )
        if num_kv_heads % tp_size and tp_size % num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size={tp_size} and the {num_kv_heads} KV heads: "
                "neither divides the other"
            )
        per_rank = num_heads // tp_size
        query = range(rank * per_rank, (rank + 1) * per_rank)
        if num_kv_heads >= tp_size:
            kv_per_rank = num_kv_heads // tp_size
            kv = range(rank * kv_per_rank, (rank + 1) * kv_per_rank)
        else:
            head = rank // (tp_size // num_kv_heads)
            kv = range(head, head + 1)
        return cls(query, kv, num_heads, num_kv_heads)


@dataclass(frozen=True, eq=False)
class LayerSpeculator:
    """Frozen per-layer speculation state.

    Attributes:
        layer_skew: the calibrated skew and channels.
        num_heads: query heads (``num_kv_heads`` and ``head_dim`` come from
            ``layer_skew``).
        query_weight: rotated mode ``[num_heads * head_dim, hidden]`` (``W_q``);
            folded mode ``[num_heads * d_partial, hidden]``.
        query_bias: ``[rows]`` matching ``query_weight`` or ``None``.
        key_basis: ``[num_kv_heads, head_dim, d_partial]`` = ``A[:, :,
            channels]`` in the speculation dtype.
        rope: the layer's rotary embedding, ``None`` without RoPE.
        q_norm: the layer's per-head query norm, ``None`` if it has none.
        folded: ``True`` if ``query_weight`` already includes ``A[:,
            channels]``.
    """

    layer_skew: LayerSkew
    num_heads: int
    query_weight: torch.Tensor
    query_bias: torch.Tensor | None
    key_basis: torch.Tensor
    rope: RotaryFn | None
    q_norm: HeadNormFn | None
    folded: bool
    residual_basis: torch.Tensor | None = None
    """``[num_kv_heads, head_dim, head_dim - d_partial]`` = ``A[:, :,
    residual channels]``; ``None``: scores use the partial channels only."""

    @classmethod
    def build(
        cls,
        layer_skew: LayerSkew,
        *,
        q_weight: torch.Tensor,
        q_bias: torch.Tensor | None,
        num_heads: int,
        rope: RotaryFn | None = None,
        q_norm: HeadNormFn | None = None,
    ) -> LayerSpeculator:
        """Assemble a speculator from a layer's skew and its query projection.

        Args:
            q_weight: ``[num_heads * head_dim, hidden]`` the layer's ``W_q``.
            q_bias: ``[num_heads * head_dim]`` or ``None``.
            num_heads: query heads.
            rope: rotary embedding of this layer (``None``: no RoPE).
            q_norm: per-head query norm applied before RoPE (``None``: none).
        """
        if num_heads % layer_skew.num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} not a multiple of "
                f"num_kv_heads={layer_skew.num_kv_heads}"
            )
        expected_rows = num_heads * layer_skew.head_dim
        if q_weight.shape[0] != expected_rows:
            raise ValueError(
                f"q_weight has {q_weight.shape[0]} rows, expected {expected_rows}"
            )
        basis = layer_skew.partial_basis()
        folded = rope is None and q_norm is None
        weight, bias = q_weight, q_bias
        if folded:
            weight, bias = fold_skew_into_projection(q_weight, q_bias, basis, num_heads)
        return cls(
            layer_skew=layer_skew,
            num_heads=num_heads,
            query_weight=weight.detach(),
            query_bias=None if bias is None else bias.detach(),
            key_basis=basis.to(q_weight.dtype),
            rope=rope,
            q_norm=q_norm,
            folded=folded,
            residual_basis=layer_skew.residual_basis().to(q_weight.dtype),
        )

    def shard(self, heads: HeadShard) -> LayerSpeculator:
        """This layer's speculator for one tensor-parallel rank: its query
        heads' rows of the query projection and its KV heads' skew, channels
        and bases (queries read the same KV head as in the whole layer)."""
        if heads.total_heads != self.num_heads or (
            heads.total_kv_heads != self.num_kv_heads
        ):
            raise ValueError(
                f"shard of {heads.total_heads} query / {heads.total_kv_heads} KV "
                f"heads for a layer of {self.num_heads} / {self.num_kv_heads}"
            )
        rows_per_head = self.d_partial if self.folded else self.head_dim
        rows = slice(
            heads.query_heads.start * rows_per_head,
            heads.query_heads.stop * rows_per_head,
        )
        skew = self.layer_skew.kv_heads(heads.kv_heads)
        kv = slice(heads.kv_heads.start, heads.kv_heads.stop)
        residual = self.residual_basis
        return LayerSpeculator(
            layer_skew=skew,
            num_heads=len(heads.query_heads),
            query_weight=self.query_weight[rows].contiguous(),
            query_bias=None
            if self.query_bias is None
            else self.query_bias[rows].contiguous(),
            key_basis=self.key_basis[kv].contiguous(),
            rope=self.rope,
            q_norm=self.q_norm,
            folded=self.folded,
            residual_basis=None if residual is None else residual[kv].contiguous(),
        )

    @property
    def num_kv_heads(self) -> int:
        return self.layer_skew.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layer_skew.head_dim

    @property
    def d_partial(self) -> int:
        return self.layer_skew.d_partial

    @property
    def d_residual(self) -> int:
        """Skewed channels left out of the partial keys (0: none, or no
        residual basis)."""
        basis = self.residual_basis
        return 0 if basis is None else int(basis.shape[2])

    def speculate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Speculated partial queries of this layer.

        Args:
            x: ``[tokens, hidden]`` the previous layer's attention input.
            positions: ``[tokens]`` int64 positions of the tokens.

        Returns:
            ``[tokens, num_heads, d_partial]`` in ``query_weight``'s dtype.
        """
        full = self.speculate_full(x, positions)
        if full is not None:
            return self.partial_query(full)
        q = torch.nn.functional.linear(
            x.to(self.query_weight.dtype), self.query_weight, self.query_bias
        )
        return q.view(x.shape[0], self.num_heads, self.d_partial)

    def speculate_full(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor | None:
        """The whole speculated query ``[tokens, num_heads, head_dim]`` (rotated
        mode), or ``None`` in folded mode, where only the partial channels are
        computed (:meth:`speculate`)."""
        if self.folded:
            return None
        tokens = x.shape[0]
        q = torch.nn.functional.linear(
            x.to(self.query_weight.dtype), self.query_weight, self.query_bias
        ).view(tokens, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.rope is not None:
            q = self.rope(positions, q)
        return q

    def partial_query(self, query: torch.Tensor) -> torch.Tensor:
        """The partial channels of this layer's real (post-RoPE) queries.

        Args:
            query: ``[tokens, num_heads, head_dim]``.

        Returns:
            ``[tokens, num_heads, d_partial]`` in ``query``'s dtype.
        """
        return self._project_queries(query, self.key_basis)

    def residual_query(self, query: torch.Tensor) -> torch.Tensor:
        """The residual channels of real (post-RoPE) queries: ``[tokens,
        num_heads, head_dim] -> [tokens, num_heads, d_residual]``."""
        assert self.residual_basis is not None
        return self._project_queries(query, self.residual_basis)

    def residual_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """The residual channels of post-RoPE keys: ``[tokens, num_kv_heads,
        head_dim] -> [tokens, num_kv_heads, d_residual]``."""
        assert self.residual_basis is not None
        return self._project_keys(keys, self.residual_basis)

    def _project_queries(
        self, query: torch.Tensor, basis: torch.Tensor
    ) -> torch.Tensor:
        """``[tokens, num_heads, head_dim]`` queries onto a ``[num_kv_heads,
        head_dim, c]`` basis (each query head its KV head's): ``[tokens,
        num_heads, c]``."""
        tokens = query.shape[0]
        group = self.num_heads // self.num_kv_heads
        q = query.reshape(tokens, self.num_kv_heads, group, self.head_dim)
        out = torch.einsum("tkgd,kdp->tkgp", q, basis.to(query.dtype))
        return out.reshape(tokens, self.num_heads, basis.shape[2])

    @staticmethod
    def _project_keys(keys: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """``[tokens, num_kv_heads, head_dim]`` keys onto a ``[num_kv_heads,
        head_dim, c]`` basis: ``[tokens, num_kv_heads, c]``. One batched
        matmul per KV head (einsum's planning costs more than the product
        for the one or few tokens of a decode step)."""
        basis = basis.to(keys.dtype)
        return torch.bmm(keys.transpose(0, 1), basis).transpose(0, 1)

    def partial_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Partial keys to store in the partial key cache.

        Args:
            keys: ``[tokens, num_kv_heads, head_dim]`` post-RoPE keys of this
                layer (what the layer writes to its KV cache).

        Returns:
            ``[tokens, num_kv_heads, d_partial]`` in ``keys``' dtype.
        """
        return self._project_keys(keys, self.key_basis)
