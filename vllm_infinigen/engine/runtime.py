"""The worker-side state of INFINIGEN: one runtime per worker process.

Created after the model is loaded (``patches/model_load.py``), it owns, for
every sparse layer: the calibrated speculator, the device-tier partial-key
cache (allocated on the first KV write, indexed by vLLM's block ids), the
selection counters, and this step's pending swap-in. Speculation for layer
``L`` runs in a forward pre-hook on layer ``L-1``'s ``qkv_proj`` (whose input
is ``L-1``'s attention input, after its input layernorm); the swap-in it
starts is consumed by layer ``L``'s attention.

On the CPU build the host tier is vLLM's own paged KV cache (host RAM, sized
by ``host_pool_gib``), so vLLM's scheduler admits requests by host capacity;
the device tier (partial keys, staging) is separate memory of ours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from vllm.logger import init_logger

from vllm_infinigen.config import InfiniGenConfig
from vllm_infinigen.engine.copier import BlockCopier, SwapHandle
from vllm_infinigen.engine.staging import StagingPlan, plan_staging
from vllm_infinigen.engine.stats import EngineStats
from vllm_infinigen.method.counters import count_selected_blocks, new_selection_counters
from vllm_infinigen.method.partial_cache import write_partial_keys
from vllm_infinigen.method.scoring import block_scores
from vllm_infinigen.method.selection import (
    SelectionPolicy,
    select_blocks,
    selection_from_mask,
    valid_blocks,
)
from vllm_infinigen.method.speculator import LayerSpeculator

logger = init_logger("vllm.infinigen.runtime")

#: Debug log of the counters every this many decode steps of the first layer.
STATS_LOG_EVERY = 64


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
class PendingSwap:
    """One sparse layer's swap-in for the current step."""

    plan: StagingPlan
    handle: SwapHandle
    host: torch.Tensor


class InfiniGenRuntime:
    """Speculation, selection and swap-in for every sparse layer of a model."""

    def __init__(
        self,
        config: InfiniGenConfig,
        layers: dict[int, LayerInfo],
        speculators: dict[int, LayerSpeculator],
        block_size: int,
        swap_mode: str,
    ) -> None:
        self.config = config
        self.layers = layers
        self.by_name = {info.name: info for info in layers.values()}
        self.speculators = speculators
        self.block_size = block_size
        self.policy = SelectionPolicy(
            # A budget covering every block fetches every block: exact.
            alpha=math.inf if config.is_exact else config.alpha,
            budget_fraction=config.budget,
            max_blocks=config.max_blocks,
            sink_blocks=config.sink_blocks,
            recent_blocks=config.recent_blocks,
            min_blocks=config.min_blocks,
        )
        self.copier = BlockCopier(swap_mode)
        self.partial_caches: dict[int, torch.Tensor] = {}
        self.counters: dict[int, torch.Tensor] = {}
        self.pending: dict[int, PendingSwap] = {}
        self.host_caches: dict[int, torch.Tensor] = {}
        self.stats = EngineStats()
        self._steps_logged = 0

    # ----------------------------------------------------------------- layers
    def layer_of(self, layer_name: str) -> LayerInfo | None:
        return self.by_name.get(layer_name)

    def sparse_layer_indices(self) -> list[int]:
        return sorted(i for i, info in self.layers.items() if info.sparse)

    # -------------------------------------------------------- KV write (tier)
    def write_partial_keys(
        self,
        layer: LayerInfo,
        key: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store the new tokens' partial keys of a sparse layer (device tier).

        Args:
            key: ``[tokens, num_kv_heads, head_dim]`` post-RoPE keys.
            kv_cache: the layer's host-tier cache (for its block count).
            slot_mapping: ``[tokens]`` slots (``-1`` for padding).
        """
        speculator = self.speculators[layer.index]
        cache = self.partial_caches.get(layer.index)
        if cache is None:
            num_blocks = kv_cache.shape[0]
            cache = torch.zeros(
                num_blocks,
                self.block_size,
                speculator.num_kv_heads,
                speculator.d_partial,
                dtype=key.dtype,
                device=key.device,
            )
            self.partial_caches[layer.index] = cache
            self.counters[layer.index] = new_selection_counters(num_blocks, key.device)
            self.host_caches[layer.index] = kv_cache
            self.stats.block_bytes = kv_cache[0].numel() * kv_cache.element_size()
        tokens = slot_mapping.shape[0]
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        partial = speculator.partial_keys(key[:tokens])
        write_partial_keys(cache, partial[keep], slots)
        # A block written from its first slot is new to its request: its
        # selection counter starts again (no stale counts after free/reuse).
        fresh = slots[slots % self.block_size == 0] // self.block_size
        self.counters[layer.index].index_fill_(0, fresh.long(), 0)

    # ------------------------------------------------------------ speculation
    def speculate_and_swap(
        self,
        layer: LayerInfo,
        x: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        max_seq_len: int,
        extra_slots: int = 0,
    ) -> None:
        """Choose layer ``layer``'s blocks for the decode requests and start
        their swap-in.

        Args:
            x: ``[num_decodes, hidden]`` the previous layer's attention input
                of the decode tokens (one per request).
            block_table: ``[num_decodes, max_blocks]`` physical block ids.
            seq_lens: ``[num_decodes]`` tokens per request, this step's
                token included.
            max_seq_len: ``max(seq_lens)`` (host int; sizes the score table).
            extra_slots: staging room to keep for this step's prefill blocks.
        """
        cache = self.partial_caches.get(layer.index)
        if cache is None:  # no KV written yet (profiling run)
            return
        stale = self.pending.pop(layer.index, None)
        if stale is not None:  # an aborted step left it: finish before reuse
            stale.handle.wait()
        start = time.perf_counter()
        width = (max_seq_len + self.block_size - 1) // self.block_size
        table = block_table[:, :width]
        if self._selects_everything(width):
            # Every block would be chosen (full budget, or no request longer
            # than its forced blocks): skip the scoring.
            selection = selection_from_mask(
                valid_blocks(seq_lens, self.block_size, width)
            )
        else:
            speculator = self.speculators[layer.index]
            query = speculator.speculate(x, (seq_lens - 1).long())
            scores = block_scores(
                query, cache, table, seq_lens, layer.scale, self.policy.score_rule
            )
            selection = select_blocks(scores, seq_lens, self.block_size, self.policy)
        plan = plan_staging(selection, table, seq_lens, self.block_size)
        count_selected_blocks(self.counters[layer.index], table, selection)
        host = self.host_caches[layer.index]
        spec_s = time.perf_counter() - start
        handle = self.copier.submit(
            layer.index, host, plan.src_block_ids, extra_slots=extra_slots
        )
        self.pending[layer.index] = PendingSwap(plan, handle, host)
        stats = self.stats.layer(layer.index)
        stats.speculation_s += spec_s
        stats.steps += 1
        stats.decode_requests += int(seq_lens.shape[0])
        stats.blocks_total += plan.dense_blocks
        stats.blocks_selected += plan.total_blocks
        stats.bytes_swapped += plan.total_blocks * self.stats.block_bytes

    def _selects_everything(self, width: int) -> bool:
        """Whether selection keeps every block of requests ``width`` blocks
        long or shorter (``width``: the longest decode request's blocks)."""
        policy = self.policy
        if self.config.is_exact:
            return True
        return width <= max(
            policy.sink_blocks + policy.recent_blocks, policy.effective_min_blocks
        )

    def take(self, layer_index: int) -> PendingSwap | None:
        """This step's swap-in for a layer (removed: each is used once)."""
        return self.pending.pop(layer_index, None)

    def finish_swap(self, layer_index: int, pending: PendingSwap) -> torch.Tensor:
        """Wait for a layer's swap-in, re-copy the newest blocks (written this
        step, after the swap-in started) and return the staging buffer."""
        staging = pending.handle.wait()
        BlockCopier.refresh(
            pending.host, staging, pending.plan.newest_src, pending.plan.newest_slot
        )
        stats = self.stats.layer(layer_index)
        stats.swap_s += pending.handle.copy_s
        stats.wait_s += pending.handle.wait_s
        return staging

    def end_of_step_check(self) -> None:
        """Drop swap-ins no attention consumed (never expected; logged)."""
        if self.pending:
            logger.warning(
                "INFINIGEN: dropping unused swap-ins for layers %s",
                sorted(self.pending),
            )
            for pending in self.pending.values():
                pending.handle.wait()
            self.pending.clear()

    def maybe_log_stats(self) -> None:
        first = self.sparse_layer_indices()[:1]
        if not first:
            return
        steps = self.stats.layer(first[0]).steps
        if steps - self._steps_logged >= STATS_LOG_EVERY:
            self._steps_logged = steps
            logger.debug("INFINIGEN stats: %s", self.stats.snapshot()["total"])


_RUNTIME: InfiniGenRuntime | None = None


def get_runtime() -> InfiniGenRuntime | None:
    """The runtime of this worker process, if the model has been set up."""
    return _RUNTIME


def set_runtime(runtime: InfiniGenRuntime | None) -> None:
    global _RUNTIME
    if _RUNTIME is not None and _RUNTIME is not runtime:
        _RUNTIME.copier.shutdown()
    _RUNTIME = runtime


def stats_snapshot() -> dict[str, object]:
    """Counters of this worker process (JSON-ready)."""
    runtime = get_runtime()
    if runtime is None:
        return {}
    snapshot = runtime.stats.snapshot()
    snapshot["staging_peak_blocks"] = runtime.copier.staging.peak_blocks
    snapshot["pending_swaps"] = len(runtime.pending)
    snapshot["partial_cache_bytes"] = sum(
        c.numel() * c.element_size() for c in runtime.partial_caches.values()
    )
    return snapshot


def reset_stats() -> bool:
    """Zero the counters of this worker process."""
    runtime = get_runtime()
    if runtime is not None:
        runtime.stats.reset()
        runtime._steps_logged = 0
    return True


PreHook = Callable[[torch.nn.Module, tuple[Any, ...]], None]
