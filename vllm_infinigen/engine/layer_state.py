"""What the runtime keeps for one attention layer of one worker.

:class:`LayerInfo` says what a layer is (sparse or dense, and why);
:class:`SparseLayer` owns a sparse layer's device tier (the partial-key
cache, indexed by vLLM's block ids, and the selection counters), a reference
to its host-tier cache, its counters and this step's prepared read. The
setup attaches each :class:`SparseLayer` to its vLLM attention module, where
the backend finds it (no module-level state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vllm_infinigen.engine.copier import SwapHandle
from vllm_infinigen.engine.placement import BlockPlan, StagingPlan
from vllm_infinigen.engine.stats import LayerStats
from vllm_infinigen.method.counters import new_selection_counters
from vllm_infinigen.method.partial_cache import (
    new_block_fill,
    new_partial_key_cache,
    new_residual_sums,
)
from vllm_infinigen.method.speculator import LayerSpeculator

if TYPE_CHECKING:
    from vllm_infinigen.engine.runtime import InfiniGenRuntime

#: Attribute of vLLM's attention module that holds its :class:`SparseLayer`.
LAYER_ATTR = "infinigen_layer"


@dataclass(frozen=True)
class LayerInfo:
    """What the runtime knows of one attention layer of the model."""

    index: int
    name: str
    scale: float
    sparse: bool
    reason: str
    """Why the layer is dense (empty when sparse)."""


@dataclass
class PreparedRead:
    """One sparse layer's read for the current decode step: the plan, and
    for the staging placement the copy that fills the staging buffer."""

    plan: BlockPlan
    handle: SwapHandle | None = None

    @property
    def staging(self) -> StagingPlan:
        assert isinstance(self.plan, StagingPlan)
        return self.plan


class SparseLayer:
    """Device tier, counters and pending read of one sparse layer."""

    def __init__(
        self,
        runtime: InfiniGenRuntime,
        info: LayerInfo,
        speculator: LayerSpeculator,
        block_size: int,
    ) -> None:
        self.runtime = runtime
        """The worker's runtime (options, policies, placement)."""
        self.info = info
        self.speculator = speculator
        self.block_size = block_size
        self.partial_cache: torch.Tensor | None = None
        """``[num_blocks, block_size, num_kv_heads, d_partial]`` (allocated
        at the first KV write, when vLLM's block count is known)."""
        self.residual_sums: torch.Tensor | None = None
        """``[num_blocks, num_kv_heads, d_residual]`` float32 per block sums
        of the residual keys (``None`` when the partial keys hold every
        channel)."""
        self.residual_fill: torch.Tensor | None = None
        """``[num_blocks]`` int32: per block, the first slots its residual
        sum counts (a slot written twice is counted once)."""
        self.counters: torch.Tensor | None = None
        """``[num_blocks]`` int64 times each block was selected."""
        self.host_cache: torch.Tensor | None = None
        """vLLM's paged cache of this layer (the host tier)."""
        self.tallies = torch.zeros(3, dtype=torch.long)
        """Blocks available, blocks read and decode requests, summed over
        decode steps (device tensor: updated without a host sync)."""
        self.dense_tallies = [0, 0]
        """Blocks and decode requests of dense-path steps, counted from host
        ints (each block is both available and read)."""
        self.stats = LayerStats()
        self.pending: PreparedRead | None = None

    @property
    def index(self) -> int:
        return self.info.index

    @property
    def num_kv_heads(self) -> int:
        return self.speculator.num_kv_heads

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of this layer's host cache (0 before the first
        KV write)."""
        cache = self.host_cache
        return 0 if cache is None else cache[0].numel() * cache.element_size()

    def allocate(self, kv_cache: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The partial-key cache, made on first use for ``kv_cache``'s blocks."""
        if self.partial_cache is None or self.host_cache is not kv_cache:
            num_blocks = kv_cache.shape[0]
            self.partial_cache = new_partial_key_cache(
                num_blocks,
                self.block_size,
                self.num_kv_heads,
                self.speculator.d_partial,
                dtype=self.runtime.partial_dtype(key.dtype),
                device=key.device,
            )
            self.residual_sums = None
            self.residual_fill = None
            if self.speculator.d_residual > 0:
                self.residual_sums = new_residual_sums(
                    num_blocks,
                    self.num_kv_heads,
                    self.speculator.d_residual,
                    device=key.device,
                )
                self.residual_fill = new_block_fill(num_blocks, key.device)
            self.counters = new_selection_counters(num_blocks, key.device)
            self.tallies = self.tallies.to(key.device)
            self.host_cache = kv_cache
        return self.partial_cache

    def tally(self, dense_counts: torch.Tensor, counts: torch.Tensor) -> None:
        """Count one decode step's blocks (no host sync)."""
        self.tallies[0].add_(dense_counts.sum())
        self.tallies[1].add_(counts.sum())
        self.tallies[2].add_(counts.shape[0])

    def tally_dense(self, blocks: int, requests: int) -> None:
        """Count one dense-path decode step from host ints (no tensor op)."""
        self.dense_tallies[0] += blocks
        self.dense_tallies[1] += requests

    def counts(self) -> tuple[int, int, int]:
        """Blocks available, blocks read, decode requests (a host read)."""
        total, selected, requests = (int(v) for v in self.tallies.tolist())
        blocks, dense_requests = self.dense_tallies
        return total + blocks, selected + blocks, requests + dense_requests

    def reset_stats(self) -> None:
        self.stats = LayerStats()
        self.tallies.zero_()
        self.dense_tallies = [0, 0]
