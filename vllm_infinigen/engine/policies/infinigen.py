"""InfiniGen: speculated partial query against the device partial keys.

One layer ahead, layer ``L-1``'s attention input becomes layer ``L``'s
speculated partial query (:class:`~vllm_infinigen.method.speculator.
LayerSpeculator`), scored against ``L``'s partial keys (which the runtime
writes for every sparse layer, whatever the policy, so the engine can switch
to InfiniGen while serving). The ``alpha`` threshold applies. With the
option ``query_source: real`` it scores at the layer's attention from the
layer's own query instead (no lead time, which in-place reads do not need).
Each block's residual term (the channels the partial keys leave out, at the
block's mean key; option ``residual_means``) is added to its scores whenever
the whole query is known (the real query, or a speculated one in rotated
mode). Scoring uses
the platform's fused scorer where it has one (the CPU's, ``engine/
cpu_scoring.py``), else the torch ops of ``method/scoring.py``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

from vllm_infinigen.method.scoring import Workspace, block_scores, residual_block_bias
from vllm_infinigen.method.selection import SelectionPolicy

from .base import BlockPolicy, PolicyContext

if TYPE_CHECKING:
    from vllm_infinigen.engine.layer_state import SparseLayer


class InfiniGenPolicy(BlockPolicy):
    name = "infinigen"
    uses_alpha = True
    scores_either_way = True
    uses_layer_input = True

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self.workspace = Workspace()
        """Scoring scratch, reused by every layer and step of this worker."""

    def scores_ahead(
        self,
        layer: SparseLayer,
        x: torch.Tensor | None,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        selection: SelectionPolicy,
    ) -> torch.Tensor:
        assert x is not None
        speculator = layer.speculator
        positions = (seq_lens - 1).long()
        full = speculator.speculate_full(x, positions)
        if full is None:  # folded: the partial channels only
            query = speculator.speculate(x, positions)
            return self._score(layer, query, None, table, seq_lens, selection)
        return self._score(
            layer, speculator.partial_query(full), full, table, seq_lens, selection
        )

    def scores_at_attention(
        self,
        layer: SparseLayer,
        query: torch.Tensor,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        selection: SelectionPolicy,
    ) -> torch.Tensor:
        """The layer's real queries against the partial keys (option
        ``query_source: real``): no speculation error, but no lead time."""
        partial = layer.speculator.partial_query(query)
        return self._score(layer, partial, query, table, seq_lens, selection)

    def _score(
        self,
        layer: SparseLayer,
        partial: torch.Tensor,
        query: torch.Tensor | None,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        selection: SelectionPolicy,
    ) -> torch.Tensor:
        """Block scores of the partial queries, plus each block's residual
        term when the selection asks for it and the whole query is known."""
        assert layer.partial_cache is not None
        bias = None
        if selection.residual and query is not None and layer.residual_sums is not None:
            bias = residual_block_bias(
                layer.speculator.residual_query(query),
                layer.residual_sums,
                table,
                seq_lens,
                self.context.block_size,
                layer.info.scale,
            )
        if self.context.block_scorer is not None:
            score: Any = self.context.block_scorer
        else:
            score = functools.partial(block_scores, workspace=self.workspace)
        return score(  # type: ignore[no-any-return]
            partial,
            layer.partial_cache,
            table,
            seq_lens,
            layer.info.scale,
            selection.score_rule,
            block_bias=bias,
        )
