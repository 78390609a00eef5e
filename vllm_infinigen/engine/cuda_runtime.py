"""INFINIGEN's worker state on CUDA: selection from the shared runtime,
movement through ``engine/cuda_swap.py`` and ``engine/cuda_copy.py``.

:class:`CudaRuntime` is the platform-neutral :class:`~.runtime.InfiniGenRuntime`
(selection, placement bookkeeping, counters, reconfiguration) with the CPU
copier replaced (:meth:`~.runtime.InfiniGenRuntime.place`): the kernel never
reads in place on CUDA, and the selected blocks move by :class:`CudaSwap`, a
thin layer over :class:`~.cuda_swap.SwapEngine` (two fixed-capacity parity
staging buffers, a side stream, one event per layer), its Triton gather and
its device counters. The runtime plans each read as host block ids
(:func:`~.placement.plan_in_place`: no host sync); :class:`CudaSwap` turns
that into a fixed-capacity staging layout
(:func:`~.cuda_copy.plan_fixed_capacity`) and starts the copy.

One decode step, sparse layer ``L`` (eager):

1. The forward pre-hook on layer ``L-1``'s ``qkv_proj`` (installed by
   :func:`setup_cuda_runtime`) runs :meth:`CudaRuntime.prefetch`: the
   runtime scores and selects ``L``'s blocks from ``L-1``'s input (or, for
   the ``dense`` policy and whole steps, takes every block), and the
   swap-in starts: on a side stream (``swap_mode: thread``) or inline on
   the compute stream (``sync``).
2. ``L``'s attention (``engine/cuda_backend.py``) calls
   :meth:`CudaRuntime.decode_read`: the prepared read and its staging
   buffer, after the compute stream waited for the copy. A policy that
   chooses from the layer's own query chooses there and copies at once.

``policy: dense`` therefore copies every block of every decode request at
every step and layer: the full-offload baseline on the same path.

The planning glue, widths, key reading and speculator placement are
tested on CPU (``tests/engine/test_cuda_runtime.py``, where
:class:`~.cuda_swap.SwapEngine` copies inline); the side stream and the
Triton gather over a UVA view need a GPU (``docs/cuda.md``, "What ran
where").
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.config import VllmConfig

from vllm_infinigen.config import InfiniGenConfig
from vllm_infinigen.engine.backend_hooks import step_metadata
from vllm_infinigen.engine.cuda_copy import (
    FixedPlan,
    as_block_rows,
    gather_blocks,
    plan_fixed_capacity,
)
from vllm_infinigen.engine.cuda_swap import DeviceCounters, SwapEngine
from vllm_infinigen.engine.layer_state import LayerInfo, PreparedRead
from vllm_infinigen.engine.placement import BlockPlan, PrefillGather, plan_in_place
from vllm_infinigen.engine.policies.base import PolicyContext
from vllm_infinigen.engine.runtime import InfiniGenRuntime
from vllm_infinigen.method.selection import (
    SelectionPolicy,
    blocks_for,
    budget_blocks,
    selection_from_mask,
    valid_blocks,
)
from vllm_infinigen.method.speculator import LayerSpeculator
from vllm_infinigen.patches.cuda_config import (
    check_cuda_policies,
    check_cuda_swap_mode,
)

if TYPE_CHECKING:
    from vllm_infinigen.engine.cuda_backend import InfiniGenFlashAttnMetadata
    from vllm_infinigen.engine.cuda_pool import PinnedHostPool
    from vllm_infinigen.engine.layer_state import SparseLayer
    from vllm_infinigen.engine.setup import PreHook

#: Default ``sparse_min_tokens`` on CUDA: select at every length. No CUDA
#: measurement of selection's cost against FlashAttention's exists yet
#: (``benchmarks/speculation_cost.py`` measured the CPU build's 8192); on
#: CUDA every step moves its blocks over PCIe, so reading fewer pays sooner.
CUDA_SPARSE_MIN_TOKENS = 0


# ---------------------------------------------------------------- widths
def staging_width(selection: SelectionPolicy, max_blocks: int, whole: bool) -> int:
    """Staging slots per request that hold any row's selection, for a step
    whose longest request has ``max_blocks`` blocks (a host int).

    A row of ``n`` blocks selects at most ``max(budget(n), min(n, sink +
    recent))`` blocks (:func:`~vllm_infinigen.method.selection.select_blocks`:
    its forced blocks, topped up to the budget), which grows with ``n``;
    a whole read takes every block.
    """
    if max_blocks <= 0:
        raise ValueError(f"max_blocks must be positive, got {max_blocks}")
    if whole:
        return max_blocks
    budget = int(budget_blocks(torch.tensor([max_blocks]), selection)[0])
    forced = min(max_blocks, selection.sink_blocks + selection.recent_blocks)
    return min(max_blocks, max(budget, forced, 1))


def whole_plan(
    block_table: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, block_size: int
) -> BlockPlan:
    """Every block of every row, as a plan of host block ids (what a layer
    reads when nothing was prepared: a profiling or first step)."""
    width = min(block_table.shape[1], blocks_for(max_seq_len, block_size))
    table = block_table[:, :width]
    selection = selection_from_mask(valid_blocks(seq_lens, block_size, width))
    return plan_in_place(selection, table, seq_lens, block_size)


# ------------------------------------------------------------- movement
@dataclass(frozen=True, eq=False)
class StagedRead:
    """A swap-in in flight (or done): the staging buffer it fills, its
    layout and the engine that runs it (kept until the read is used, so a
    grown engine never frees a buffer a layer still reads)."""

    buffer: torch.Tensor
    plan: FixedPlan
    engine: SwapEngine
    source: BlockPlan
    """The runtime's plan this copy serves."""


class CudaSwap:
    """Host pool -> device staging for the sparse layers of one worker.

    Owns the :class:`~.cuda_swap.SwapEngine` (made at the first swap, grown
    when a step needs more slots than it holds: eager attention allows
    it), the prefill region (grown on demand), the device counters and the
    pinned host pool the KV allocation made (``patches/cuda_kv_alloc.py``).
    """

    def __init__(self, mode: str, num_layers: int) -> None:
        self.mode = mode
        self.num_layers = max(1, num_layers)
        self.engine: SwapEngine | None = None
        self.counters: DeviceCounters | None = None
        self.pool: PinnedHostPool | None = None
        self._region: torch.Tensor | None = None
        self._inflight: dict[int, StagedRead] = {}

    def set_mode(self, mode: str) -> None:
        """Switch ``sync`` / ``thread`` (between steps: the next swap makes
        an engine of the new kind)."""
        if mode != self.mode:
            self.mode = mode
            self.engine = None

    def _engine_for(
        self, slots: int, block_bytes: int, device: torch.device
    ) -> SwapEngine:
        engine = self.engine
        if (
            engine is None
            or engine.capacity < slots
            or engine.block_bytes != block_bytes
            or engine.device.type != device.type
        ):
            grown = 0 if engine is None else 2 * engine.capacity
            engine = SwapEngine(
                max(slots, grown, 1),
                block_bytes,
                self.num_layers,
                device,
                side_stream=self.mode == "thread",
            )
            self.engine = engine
        return engine

    def start(self, layer: SparseLayer, plan: BlockPlan, width: int) -> None:
        """Start copying ``plan``'s blocks of ``layer`` into staging, at
        ``width`` slots per request (``>=`` every row's count)."""
        assert layer.host_cache is not None
        rows = as_block_rows(layer.host_cache)
        fixed = plan_fixed_capacity(plan.host_ids[:, :width], plan.counts, width)
        engine = self._engine_for(fixed.num_slots, rows.shape[1], rows.device)
        buffer = engine.start(layer.index, rows, fixed)
        if self.counters is None:
            self.counters = DeviceCounters(rows.device)
        self.counters.add(fixed.counts, rows.shape[1])
        self._inflight[layer.index] = StagedRead(buffer, fixed, engine, plan)

    def finish(self, layer: SparseLayer) -> StagedRead | None:
        """The layer's swap-in, once the current stream waited for it
        (``None`` if none was started)."""
        staged = self._inflight.pop(layer.index, None)
        if staged is not None:
            staged.engine.wait(layer.index)
        return staged

    def gather_prefill(
        self, kv_cache: torch.Tensor, gather: PrefillGather
    ) -> torch.Tensor:
        """Copy the prefill rows' whole contexts of one layer into the
        prefill region on the current stream; ``[num_blocks, block_bytes]``
        uint8."""
        rows = as_block_rows(kv_cache)
        n = gather.num_blocks
        region = self._region
        if (
            region is None
            or region.shape[0] < n
            or region.shape[1] != rows.shape[1]
            or region.device != rows.device
        ):
            region = torch.empty(
                (n, rows.shape[1]), dtype=torch.uint8, device=rows.device
            )
            self._region = region
        gather_blocks(rows, gather.src_ids, region[:n])
        return region[:n]

    @property
    def staging_bytes(self) -> int:
        """Device bytes of the staging buffers and the prefill region."""
        engine_bytes = 0 if self.engine is None else self.engine.nbytes
        region = self._region
        return engine_bytes + (0 if region is None else region.numel())

    def adopt_pool(self, pool: PinnedHostPool) -> None:
        """Keep the host pool the KV cache lives in (releasing a previous
        one: vLLM re-allocates the KV cache on re-initialisation)."""
        if self.pool is not None and self.pool is not pool:
            self.pool.release()
        self.pool = pool

    def counter_values(self) -> dict[str, int]:
        """Blocks and bytes swapped in (reads the device counters)."""
        return {} if self.counters is None else self.counters.snapshot()

    def release(self) -> None:
        self._inflight.clear()
        self.engine = None
        self._region = None
        if self.pool is not None:
            self.pool.release()
            self.pool = None


# --------------------------------------------------------------- runtime
class CudaRuntime(InfiniGenRuntime):
    """The runtime with CUDA movement: every read goes through staging
    (never in place), copied by :class:`CudaSwap` instead of the CPU
    copier."""

    @functools.cached_property
    def swap(self) -> CudaSwap:
        """This worker's movement (made by the first :meth:`place`, which
        the base constructor calls)."""
        return CudaSwap(self.config.swap_mode, max(self.layers, default=0) + 1)

    @property
    def in_place(self) -> bool:
        """FlashAttention cannot read the host pool: never in place."""
        return False

    def place(self, swap_mode: str) -> None:
        """Staging on CUDA, copied inline (``sync``) or on a side stream
        (``thread``)."""
        check_cuda_swap_mode(swap_mode)
        self.swap.set_mode(swap_mode)

    def track(self, policies: list[str] | tuple[str, ...]) -> list[str]:
        check_cuda_policies(policies)
        return super().track(policies)

    def read_width(
        self, read: PreparedRead, max_seq_len: int, total_tokens: int
    ) -> int:
        """Staging slots per request for a read prepared this step."""
        whole = self.reads_everything(max_seq_len, total_tokens)
        width = staging_width(
            self.selection, blocks_for(max_seq_len, self.block_size), whole
        )
        return max(1, min(width, read.plan.host_ids.shape[1]))

    def prefetch(
        self,
        layer: SparseLayer,
        x: torch.Tensor,
        meta: InfiniGenFlashAttnMetadata,
    ) -> None:
        """Layer ``L-1``'s pre-hook: choose layer ``layer``'s blocks for the
        decode rows and start their swap-in.

        Args:
            x: ``[tokens, hidden]`` layer ``L-1``'s attention input (the
                decode rows' tokens first).
        """
        nd = meta.num_decode_rows
        total = meta.decode_context_tokens
        self.prepare_ahead(
            layer,
            x[:nd] if self.needs_input(total) else None,
            meta.block_table[:nd],
            meta.seq_lens[:nd],
            meta.max_decode_seq_len,
            total,
        )
        read = layer.pending
        if read is not None:
            width = self.read_width(read, meta.max_decode_seq_len, total)
            self.swap.start(layer, read.plan, width)

    def decode_read(
        self,
        layer: SparseLayer,
        query: torch.Tensor,
        meta: InfiniGenFlashAttnMetadata,
    ) -> tuple[PreparedRead, StagedRead]:
        """Layer ``L``'s attention: the decode rows' read and its filled
        staging buffer (the current stream waits for the copy).

        Args:
            query: ``[num_decodes, num_heads, head_dim]`` the real queries.
        """
        nd = meta.num_decode_rows
        table, lens = meta.block_table[:nd], meta.seq_lens[:nd]
        max_len, total = meta.max_decode_seq_len, meta.decode_context_tokens
        read = self.take(layer)
        staged = self.swap.finish(layer)
        if read is None:
            read = self.prepare_at_attention(layer, query, table, lens, max_len, total)
        if read is None:  # nothing prepared (no KV written before this step)
            read = PreparedRead(whole_plan(table, lens, max_len, self.block_size))
            width = read.plan.host_ids.shape[1]
        else:
            width = self.read_width(read, max_len, total)
        if staged is None or staged.source is not read.plan:
            self.swap.start(layer, read.plan, width)
            staged = self.swap.finish(layer)
            assert staged is not None
        return read, staged

    def stats_snapshot(self) -> dict[str, Any]:
        out = super().stats_snapshot()
        out["swap_in"] = self.swap.counter_values()
        out["staging_bytes"] = self.swap.staging_bytes
        out["device_tier_bytes"] += self.swap.staging_bytes
        return out

    def reset_stats(self) -> None:
        super().reset_stats()
        if self.swap.counters is not None:
            self.swap.counters.reset()

    def shutdown(self) -> None:
        super().shutdown()
        self.swap.release()


# ----------------------------------------------------------------- set-up
def read_paged_keys(host_cache: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Keys of blocks ``ids`` of a paged cache ``[B, H, N, 2 * D]`` (keys in
    the first half of the last dimension, any block layout), in position
    order: ``[len(ids) * N, H, D]``."""
    head_dim = host_cache.shape[-1] // 2
    blocks = host_cache.index_select(0, ids.long())[..., :head_dim]
    return blocks.permute(0, 2, 1, 3).reshape(-1, host_cache.shape[1], head_dim)


def cuda_policy_context(vllm_config: VllmConfig) -> PolicyContext:
    """What the CUDA platform offers the policies: keys read back from the
    host pool (recall sampling) unless the KV cache is quantised."""
    from vllm.utils.torch_utils import is_quantized_kv_cache

    cache_dtype = str(vllm_config.cache_config.cache_dtype)

    def check() -> None:
        if is_quantized_kv_cache(cache_dtype):
            raise ValueError(
                f"keys of a {cache_dtype} KV cache are stored quantised and "
                "are not read back (selection recall is not sampled)"
            )

    return PolicyContext(
        block_size=vllm_config.cache_config.block_size,
        key_reader=read_paged_keys,
        key_reader_check=check,
        sparse_min_tokens=CUDA_SPARSE_MIN_TOKENS,
    )


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor it holds on ``device``: tensors are
    moved, modules moved in place, frozen dataclasses (a speculator, its
    skew, a rotary wrapper) rebuilt with moved fields; anything else is
    returned as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, torch.nn.Module):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for field in dataclasses.fields(value):
            if not field.init:
                continue
            old = getattr(value, field.name)
            new = to_device(old, device)
            if new is not old:
                changes[field.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    return value


def prefetch_hook(runtime: CudaRuntime, target: SparseLayer) -> PreHook:
    """Forward pre-hook for layer ``L-1``'s ``qkv_proj`` that prefetches
    layer ``L`` (``target``)."""
    from vllm_infinigen.engine.cuda_backend import InfiniGenFlashAttnMetadata

    name = target.info.name

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        meta = step_metadata(name, InfiniGenFlashAttnMetadata)
        if meta is not None and meta.num_decode_rows:
            runtime.prefetch(target, args[0], meta)

    return hook


def setup_cuda_runtime(vllm_config: VllmConfig, model: torch.nn.Module) -> CudaRuntime:
    """Build this worker's CUDA runtime for ``model`` and install its hooks
    (``engine/setup.py``'s :func:`~.setup.install_runtime`, as on CPU, with
    the speculators moved to the worker's device)."""
    from vllm_infinigen.engine.setup import install_runtime

    device = torch.device(str(vllm_config.device_config.device))
    context = cuda_policy_context(vllm_config)

    def make_runtime(
        config: InfiniGenConfig,
        infos: dict[int, LayerInfo],
        speculators: dict[int, LayerSpeculator],
    ) -> CudaRuntime:
        moved = {i: to_device(s, device) for i, s in speculators.items()}
        return CudaRuntime(config, infos, moved, context)

    return install_runtime(vllm_config, model, make_runtime, prefetch_hook)
