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

from vllm_infinigen.config import POLICIES, InfiniGenConfig
from vllm_infinigen.engine.copier import BlockCopier, SwapHandle
from vllm_infinigen.engine.key_layout import read_keys
from vllm_infinigen.engine.staging import StagingPlan, plan_staging
from vllm_infinigen.engine.stats import EngineStats
from vllm_infinigen.method.counters import count_selected_blocks, new_selection_counters
from vllm_infinigen.method.partial_cache import write_partial_keys
from vllm_infinigen.method.policies import (
    attention_block_mass,
    h2o_block_scores,
    new_key_bounds,
    quest_block_scores,
    streaming_block_scores,
    update_key_bounds,
)
from vllm_infinigen.method.scoring import block_scores
from vllm_infinigen.method.selection import (
    BlockSelection,
    SelectionPolicy,
    select_blocks,
    selection_from_mask,
    valid_blocks,
)
from vllm_infinigen.method.speculator import LayerSpeculator

logger = init_logger("vllm.infinigen.runtime")

#: Debug log of the counters every this many decode steps of the first layer.
STATS_LOG_EVERY = 64

#: H2O: query rows of each prefill chunk whose attention mass is accumulated
#: (evenly spaced, the chunk's last row included), so prefill pays a fixed
#: number of extra rows per chunk instead of a second full attention.
H2O_PREFILL_ROWS = 16

#: Options :meth:`InfiniGenRuntime.reconfigure` may change while serving;
#: the others size memory or calibration and are fixed at start-up.
RUNTIME_OPTIONS: tuple[str, ...] = (
    "policy",
    "budget",
    "max_blocks",
    "alpha",
    "sink_blocks",
    "recent_blocks",
    "min_blocks",
)


def selection_policy(config: InfiniGenConfig) -> SelectionPolicy:
    """The block-selection parameters of a configuration.

    InfiniGen keeps its ``alpha`` threshold; the peer policies take pure
    top-k by their scores, so every policy reads the same number of blocks
    per request per layer (equal budget).
    """
    threshold = config.policy == "infinigen" and not config.is_exact
    return SelectionPolicy(
        # A budget covering every block fetches every block: exact.
        alpha=config.alpha if threshold else math.inf,
        budget_fraction=config.budget,
        max_blocks=config.max_blocks,
        sink_blocks=config.sink_blocks,
        recent_blocks=config.recent_blocks,
        min_blocks=config.min_blocks,
    )


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
        self.policy = selection_policy(config)
        self.tracked: set[str] = {config.policy}
        """Policies whose device metadata is maintained (the configured one
        plus any named by :meth:`track`)."""
        self.key_bounds: dict[int, torch.Tensor] = {}
        """Quest: per layer ``[num_blocks, 2, num_kv_heads, head_dim]``."""
        self.mass: dict[int, torch.Tensor] = {}
        """H2O: per layer ``[num_blocks, num_kv_heads]`` accumulated mass."""
        self.prefill_mass: dict[int, torch.Tensor] = {}
        """H2O: the part of :attr:`mass` that prefill queries gave, without
        the rows of each chunk's last block (which a request that reuses the
        prompt from the prefix cache computes, and observes, again)."""
        self.key_order: torch.Tensor | None = None
        """H2O: packed order of a key tile (engine/key_layout.py)."""
        self.key_check: Callable[[], None] | None = None
        """Raises when the host tier's keys cannot be read back (H2O)."""
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
        fresh = (slots[slots % self.block_size == 0] // self.block_size).long()
        self.counters[layer.index].index_fill_(0, fresh, 0)
        if "quest" in self.tracked:
            bounds = self.key_bounds.get(layer.index)
            if bounds is None:
                bounds = new_key_bounds(
                    cache.shape[0],
                    speculator.num_kv_heads,
                    speculator.head_dim,
                    dtype=key.dtype,
                    device=key.device,
                )
                self.key_bounds[layer.index] = bounds
            update_key_bounds(bounds, key[:tokens][keep], slots, self.block_size)
        if "h2o" in self.tracked:
            if layer.index not in self.mass:
                shape = (cache.shape[0], speculator.num_kv_heads)
                self.mass[layer.index] = torch.zeros(shape, device=key.device)
                self.prefill_mass[layer.index] = torch.zeros(shape, device=key.device)
            self.mass[layer.index].index_fill_(0, fresh, 0.0)
            self.prefill_mass[layer.index].index_fill_(0, fresh, 0.0)

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
        elif self.config.policy == "quest":
            return  # Quest needs this layer's own query: chosen at attention
        else:
            scores = self._scores_ahead(layer, x, table, seq_lens, width)
            selection = select_blocks(scores, seq_lens, self.block_size, self.policy)
        self._submit(layer, selection, table, seq_lens, extra_slots, start)

    def select_at_attention(
        self,
        layer: LayerInfo,
        query: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        max_seq_len: int,
        extra_slots: int = 0,
    ) -> PendingSwap | None:
        """Quest: choose this layer's blocks from its real decode queries
        (``[num_decodes, num_heads, head_dim]``) and swap them in now.

        Returns the swap-in, or None when this layer chose one layer ahead or
        has no metadata yet (profiling run).
        """
        bounds = self.key_bounds.get(layer.index)
        if self.config.policy != "quest" or bounds is None:
            return None
        start = time.perf_counter()
        width = (max_seq_len + self.block_size - 1) // self.block_size
        table = block_table[:, :width]
        scores = quest_block_scores(
            query, bounds, table, seq_lens, self.block_size, layer.scale
        )
        selection = select_blocks(scores, seq_lens, self.block_size, self.policy)
        self._submit(layer, selection, table, seq_lens, extra_slots, start)
        return self.take(layer.index)

    def _scores_ahead(
        self,
        layer: LayerInfo,
        x: torch.Tensor,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        width: int,
    ) -> torch.Tensor:
        """Block scores of the policies that choose one layer ahead."""
        policy = self.config.policy
        speculator = self.speculators[layer.index]
        if policy == "streaming":
            return streaming_block_scores(
                seq_lens, self.block_size, width, speculator.num_kv_heads
            )
        if policy == "h2o":
            mass = self.mass.get(layer.index)
            if mass is None:  # tracking began this step: no mass yet
                mass = torch.zeros(
                    self.partial_caches[layer.index].shape[0],
                    speculator.num_kv_heads,
                    device=x.device,
                )
            return h2o_block_scores(mass, table, seq_lens, self.block_size, self.policy)
        query = speculator.speculate(x, (seq_lens - 1).long())
        cache = self.partial_caches[layer.index]
        return block_scores(
            query, cache, table, seq_lens, layer.scale, self.policy.score_rule
        )

    def _submit(
        self,
        layer: LayerInfo,
        selection: BlockSelection,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        extra_slots: int,
        start: float,
    ) -> None:
        """Place a selection in staging, count it and start its copy."""
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

    # ------------------------------------------------------- H2O observation
    def _key_order(self, isa: str, kv_cache: torch.Tensor) -> torch.Tensor:
        if self.key_order is None:
            from vllm_infinigen.engine.key_layout import key_tile_order

            _, _, block_size, two_head = kv_cache.shape
            self.key_order = key_tile_order(
                isa, block_size, two_head // 2, kv_cache.dtype, "auto"
            )
        return self.key_order

    def observe_decode(
        self,
        layer: LayerInfo,
        isa: str,
        query: torch.Tensor,
        plan: StagingPlan,
        kv_cache: torch.Tensor,
    ) -> None:
        """H2O: add the attention mass of this step's decode queries over the
        blocks they read (``query``: ``[num_decodes, num_heads, head_dim]``)."""
        mass = self.mass.get(layer.index)
        if mass is None:
            return
        order = self._key_order(isa, kv_cache)
        counts = plan.counts.tolist()
        sparse_lens = plan.sparse_seq_lens.tolist()
        start = 0
        for r, count in enumerate(counts):
            ids = plan.src_block_ids[start : start + count]
            start += count
            keys = read_keys(kv_cache, ids, order)
            length = int(sparse_lens[r])
            position = torch.tensor([length - 1], device=query.device)
            got = attention_block_mass(
                query[r : r + 1], keys, position, length, self.block_size, layer.scale
            )
            mass.index_add_(0, ids.long(), got)

    def observe_prefill(
        self,
        layer: LayerInfo,
        isa: str,
        query: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        rows: list[int],
        kv_cache: torch.Tensor,
    ) -> None:
        """H2O: add the attention mass of up to :data:`H2O_PREFILL_ROWS`
        query rows of each prefill request in ``rows`` over its context."""
        mass = self.mass.get(layer.index)
        if mass is None:
            return
        order = self._key_order(isa, kv_cache)
        for r in rows:
            begin, end = int(query_start_loc[r]), int(query_start_loc[r + 1])
            seq_len = int(seq_lens[r])
            query_len = end - begin
            picks = (
                torch.linspace(0, query_len - 1, min(query_len, H2O_PREFILL_ROWS))
                .round()
                .long()
                .unique()
            )
            positions = seq_len - query_len + picks
            n_blocks = (seq_len + self.block_size - 1) // self.block_size
            ids = block_table[r, :n_blocks].long()
            keys = read_keys(kv_cache, ids, order)
            # Rows of the chunk's last block go to the live mass only: when
            # the prompt ends in this chunk, a later request with the same
            # prompt recomputes that block (the prefix cache keeps full
            # blocks and always recomputes the prompt's last one), and the
            # mass that reconfigure restores must count each row once.
            tail = positions >= (seq_len - 1) // self.block_size * self.block_size
            for part, to_prefill in ((~tail, True), (tail, False)):
                if not bool(part.any()):
                    continue
                got = attention_block_mass(
                    query[begin + picks[part]],
                    keys,
                    positions[part],
                    seq_len,
                    self.block_size,
                    layer.scale,
                )
                mass.index_add_(0, ids, got)
                if to_prefill:
                    self.prefill_mass[layer.index].index_add_(0, ids, got)

    # ------------------------------------------------------- reconfiguration
    def track(self, policies: list[str] | tuple[str, ...]) -> list[str]:
        """Maintain these policies' device metadata from now on (blocks
        written earlier have none: Quest ranks them first, H2O as massless),
        so a later :meth:`reconfigure` to them finds it ready."""
        unknown = [p for p in policies if p not in POLICIES]
        if unknown:
            raise ValueError(
                f"infinigen option 'policy' must be one of {list(POLICIES)}, "
                f"got {unknown[0]!r}"
            )
        if "h2o" in policies and self.key_check is not None:
            self.key_check()
        self.tracked.update(policies)
        return sorted(self.tracked)

    def reconfigure(self, options: dict[str, Any]) -> dict[str, Any]:
        """Change selection options between requests (benchmarks sweep
        policies and budgets on one engine). Validated like start-up options;
        H2O's decode-time mass is cleared (each run starts from prefill's).

        Returns the effective options.
        """
        fixed = [
            key
            for key in options
            if key.replace("-", "_") in InfiniGenConfig.option_names()
            and key.replace("-", "_") not in RUNTIME_OPTIONS
        ]
        if fixed:
            raise ValueError(
                f"infinigen option {fixed[0]!r} is fixed at start-up; options "
                f"that can change while serving: {', '.join(RUNTIME_OPTIONS)}"
            )
        merged = self.config.to_dict()
        merged.update({key.replace("-", "_"): value for key, value in options.items()})
        config = InfiniGenConfig.from_dict(merged)
        if self.pending:
            raise RuntimeError("INFINIGEN: reconfigure called during a step")
        self.config = config
        self.policy = selection_policy(config)
        self.track([config.policy])
        with torch.inference_mode():  # the tensors were made in a forward
            for index, mass in self.mass.items():
                mass.copy_(self.prefill_mass[index])
        return config.to_dict()

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
    snapshot["partial_cache_bytes"] = _nbytes(runtime.partial_caches)
    snapshot["key_bounds_bytes"] = _nbytes(runtime.key_bounds)
    snapshot["h2o_mass_bytes"] = _nbytes(runtime.mass) + _nbytes(runtime.prefill_mass)
    snapshot["h2o_prefill_mass"] = float(
        sum(float(t.sum()) for t in runtime.prefill_mass.values())
    )
    snapshot["host_kv_bytes"] = _nbytes(runtime.host_caches)
    snapshot["policy"] = runtime.config.policy
    snapshot["budget"] = runtime.config.budget
    return snapshot


def _nbytes(tensors: dict[int, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def configure(options: dict[str, Any]) -> dict[str, Any]:
    """Reconfigure this worker's runtime (see :meth:`InfiniGenRuntime.reconfigure`)."""
    runtime = get_runtime()
    if runtime is None:
        raise RuntimeError("INFINIGEN is not set up in this worker")
    return runtime.reconfigure(options)


def track(policies: list[str]) -> list[str]:
    """Maintain these policies' metadata in this worker (see
    :meth:`InfiniGenRuntime.track`)."""
    runtime = get_runtime()
    if runtime is None:
        raise RuntimeError("INFINIGEN is not set up in this worker")
    return runtime.track(policies)


def reset_stats() -> bool:
    """Zero the counters of this worker process."""
    runtime = get_runtime()
    if runtime is not None:
        runtime.stats.reset()
        runtime._steps_logged = 0
    return True


PreHook = Callable[[torch.nn.Module, tuple[Any, ...]], None]
