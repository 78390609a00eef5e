"""StreamingLLM: the sink blocks plus the newest blocks (no metadata)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_infinigen.method.policies import streaming_block_scores
from vllm_infinigen.method.selection import SelectionPolicy

from .base import BlockPolicy

if TYPE_CHECKING:
    from vllm_infinigen.engine.layer_state import SparseLayer


class StreamingPolicy(BlockPolicy):
    name = "streaming"

    def scores_ahead(
        self,
        layer: SparseLayer,
        x: torch.Tensor | None,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        selection: SelectionPolicy,
    ) -> torch.Tensor:
        return streaming_block_scores(
            seq_lens, self.context.block_size, table.shape[1], layer.num_kv_heads
        )
