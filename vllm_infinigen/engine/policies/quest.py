"""Quest: per-block element-wise key bounds and the layer's real query.

Device metadata per sparse layer: ``[num_blocks, 2, num_kv_heads, head_dim]``
minimum and maximum of each block's keys (``1 / block_size`` of the KV
bytes), updated at every KV write and restarted when a block is reused. The
query is known only at the layer's attention, so the read cannot be prepared
one layer ahead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_infinigen.method.policies import (
    new_key_bounds,
    quest_block_scores,
    update_key_bounds,
)
from vllm_infinigen.method.selection import SelectionPolicy

from .base import BlockPolicy, PolicyContext, tensor_bytes

if TYPE_CHECKING:
    from vllm_infinigen.engine.layer_state import SparseLayer


class QuestPolicy(BlockPolicy):
    name = "quest"
    ahead = False

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self.bounds: dict[int, torch.Tensor] = {}
        """Per layer index ``[num_blocks, 2, num_kv_heads, head_dim]``."""

    def _layer_bounds(self, layer: SparseLayer, like: torch.Tensor) -> torch.Tensor:
        """The layer's bounds, made empty (every block unknown) on first use."""
        bounds = self.bounds.get(layer.index)
        if bounds is None:
            assert layer.partial_cache is not None
            bounds = new_key_bounds(
                layer.partial_cache.shape[0],
                layer.num_kv_heads,
                layer.speculator.head_dim,
                dtype=like.dtype,
                device=like.device,
            )
            self.bounds[layer.index] = bounds
        return bounds

    def on_kv_write(
        self,
        layer: SparseLayer,
        key: torch.Tensor,
        slots: torch.Tensor,
        fresh_blocks: torch.Tensor,
    ) -> None:
        bounds = self._layer_bounds(layer, key)
        update_key_bounds(bounds, key, slots, self.context.block_size, fresh_blocks)

    def metadata_bytes(self) -> dict[str, int]:
        return {"key_bounds_bytes": tensor_bytes(self.bounds)}

    def scores_at_attention(
        self,
        layer: SparseLayer,
        query: torch.Tensor,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        selection: SelectionPolicy,
    ) -> torch.Tensor:
        bounds = self._layer_bounds(layer, query)  # new if tracking began now
        return quest_block_scores(
            query, bounds, table, seq_lens, self.context.block_size, layer.info.scale
        )
