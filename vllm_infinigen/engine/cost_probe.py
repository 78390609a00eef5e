"""What a decode step's attention costs each way on this CPU, measured at
start-up: the source of ``sparse_min_tokens`` when it is left unset.

Sparse decode pays where reading a budget's share of the blocks saves more
of vLLM's kernel time than choosing them costs. Both sides depend on the
machine (vector width, cache sizes, memory bandwidth, VNNI for the 4-bit
scorer) and on the block size, so a fixed threshold is right on one CPU at
most. :func:`probe_step_costs` times, on synthetic tensors of the model's
own shapes (this rank's heads, the engine's block size, the partial-key
cache's type and width) and with the engine's own parts:

- dense: vLLM's CPU kernel over every block (the scheduler metadata is
  built once per step by vLLM's metadata builder, so it is not counted);
- sparse: InfiniGen's block scores (the fused scorer when built), the
  selection, the in-place read plan, the selection counters, the kernel's
  scheduler metadata for the sparse lengths and the kernel over the
  selected blocks through the compacted table;

each at a few context lengths of a batch of requests, cycling through a few
copies of the tensors so that a layer's data is not left in the CPU cache
by the previous call (a decode step walks every layer), the three timed in
turn within each sweep and the best sweep kept (the machine's drift falls
on all three alike; the best sweep is the least disturbed by the rest of
the host). Fitted per layer:
``dense ~ d * tokens``, ``choose ~ a + c * tokens``, ``read ~ r * tokens``
(at the probe's budget; other budgets scale it). :meth:`StepCosts.threshold`
is the decode context (tokens of the step's decode requests) above which
``choose + read`` stays below ``(1 - margin) * dense``.

:func:`probe_block_size` times the same kernel at each candidate block size
and gives the CPU block size INFINIGEN uses when the user sets none.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vllm_infinigen.engine.placement import plan_in_place
from vllm_infinigen.method.counters import count_selected_blocks, new_selection_counters
from vllm_infinigen.method.partial_cache import (
    new_partial_key_cache,
    write_partial_keys,
)
from vllm_infinigen.method.selection import SelectionPolicy, select_blocks

#: ``sparse_min_tokens`` where sparse decode never pays on this machine.
NEVER = sys.maxsize

#: Share of the dense kernel's time a sparse step must save beyond its
#: predicted cost before the engine takes it: the probe times each part
#: alone, while in a step the other layers' work evicts their data from
#: the CPU cache, and the backend adds per-layer bookkeeping the probe does
#: not run.
MARGIN = 0.1

#: Context tokens per request the probe times (a batch of
#: :data:`PROBE_BATCH` requests each).
PROBE_CONTEXTS = (1024, 4096, 16384)
PROBE_BATCH = 4
#: Copies of the tensors cycled through, and timed sweeps over them.
PROBE_COPIES = 3
PROBE_REPEATS = 3


@dataclass(frozen=True)
class StepCosts:
    """Measured per-layer decode attention costs (one sparse layer, one step)."""

    dense_us_per_token: float
    """vLLM's kernel reading every block, per context token."""
    choose_fixed_ms: float
    """Choosing blocks and planning the read, per layer and step."""
    choose_us_per_token: float
    """Their part that grows with the context."""
    read_us_per_token: float
    """The kernel over the selected blocks, per context token, at
    :attr:`budget`."""
    budget: float
    """The budget the probe selected with."""
    margin: float = MARGIN

    def threshold(self, budget: float) -> int:
        """Decode context (all decode requests' tokens) from which reading
        ``budget`` of the blocks is predicted to pay; :data:`NEVER` where
        it never does."""
        read = self.read_us_per_token * budget / self.budget
        saved = self.dense_us_per_token * (1.0 - self.margin) - (
            self.choose_us_per_token + read
        )
        if budget >= 1.0 or saved <= 0.0:
            return NEVER
        return math.ceil(self.choose_fixed_ms * 1e3 / saved)

    def pays(self, total_tokens: int, read_tokens: int, budget: float) -> bool:
        """Whether a sparse step over ``total_tokens`` of context that reads
        ``read_tokens`` of them (the budget's blocks and every request's
        floor) is predicted to cost less than ``(1 - margin)`` of the dense
        step. At ``read_tokens = budget * total_tokens`` this holds exactly
        from :meth:`threshold` on."""
        if budget >= 1.0:
            return False
        read_rate = self.read_us_per_token / self.budget  # per token read
        sparse = (
            self.choose_fixed_ms * 1e3
            + self.choose_us_per_token * total_tokens
            + read_rate * read_tokens
        )
        return sparse < (1.0 - self.margin) * self.dense_us_per_token * total_tokens

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class CPUKernel:
    """vLLM's CPU paged-attention kernel for one layer shape, called as the
    INFINIGEN CPU backend calls it."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        batch: int,
    ) -> None:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.ops = ops
        self.shape = (num_heads, num_kv_heads, head_dim)
        self.dtype = dtype
        self.isa = _get_attn_isa(dtype, block_size, head_dim, "auto")
        self.query = torch.randn(batch, num_heads, head_dim).to(dtype)
        self.out = torch.empty_like(self.query)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32)

    def metadata(self, seq_lens: torch.Tensor) -> torch.Tensor:
        num_heads, num_kv_heads, head_dim = self.shape
        return self.ops.cpu_attn_get_scheduler_metadata(  # type: ignore[no-any-return]
            num_reqs=seq_lens.shape[0],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            seq_lens=seq_lens,
            dtype=self.dtype,
            query_start_loc=self.query_start_loc,
            causal=True,
            sliding_window_size=-1,
            isa=self.isa,
            enable_kv_split=False,
        )

    def __call__(
        self,
        cache: torch.Tensor,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        metadata: torch.Tensor,
    ) -> None:
        blocks, kv, block_size, _ = cache.shape
        key, value = cache.view(blocks, kv, 2 * block_size, -1).chunk(2, dim=2)
        head_dim = self.shape[2]
        self.ops.cpu_attention_with_kv_cache(
            query=self.query,
            key_cache=key,
            value_cache=value,
            output=self.out,
            query_start_loc=self.query_start_loc,
            seq_lens=seq_lens,
            scale=head_dim**-0.5,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=table,
            softcap=0.0,
            scheduler_metadata=metadata,
            s_aux=None,
        )


def _time_interleaved(
    fns: list[Callable[[int], Any]], copies: int, repeats: int
) -> list[float]:
    """Per function, the best over ``repeats`` sweeps of the mean ms of
    ``fn(copy)``: every sweep runs each function over every copy in turn, so
    that the machine's drift falls on all of them alike, and the best sweep
    is the one the least disturbed by the rest of the host."""
    for fn in fns:  # warm-up
        for copy in range(copies):
            fn(copy)
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for copy in range(copies):
                fn(copy)
            best[i] = min(best[i], (time.perf_counter() - start) / copies * 1e3)
    return best


def _fit(tokens: list[float], times: list[float]) -> tuple[float, float]:
    """Least squares ``time ~ a + b * tokens``."""
    n = len(tokens)
    mean_t, mean_y = sum(tokens) / n, sum(times) / n
    var = sum((t - mean_t) ** 2 for t in tokens)
    b = sum((t - mean_t) * (y - mean_y) for t, y in zip(tokens, times, strict=True))
    b = b / var if var else 0.0
    return mean_y - b * mean_t, b


@dataclass(frozen=True)
class _Layer:
    """What the probe knows of the engine's sparse layers."""

    kernel: CPUKernel
    num_kv_heads: int
    head_dim: int
    d_partial: int
    block_size: int
    dtype: torch.dtype
    partial_dtype: torch.dtype
    score: Callable[..., torch.Tensor]
    selection: SelectionPolicy


def _measure(
    layer: _Layer, context: int, batch: int, copies: int, repeats: int
) -> tuple[float, float, float]:
    """ms per layer at ``batch`` requests of ``context`` tokens: the dense
    kernel, choosing the blocks (scores, selection, counters, plan, the
    kernel's metadata), the kernel over the chosen blocks."""
    gen = torch.Generator().manual_seed(context)
    block_size, kv = layer.block_size, layer.num_kv_heads
    blocks = -(-context // block_size)
    num_blocks = blocks * batch + 1
    host = [
        torch.randn(num_blocks, kv, block_size, 2 * layer.head_dim, generator=gen).to(
            layer.dtype
        )
        for _ in range(copies)
    ]
    partial = []
    for _ in range(copies):
        cache = new_partial_key_cache(
            num_blocks, block_size, kv, layer.d_partial, dtype=layer.partial_dtype
        )
        keys = torch.randn(num_blocks * block_size, kv, layer.d_partial, generator=gen)
        write_partial_keys(cache, keys, torch.arange(num_blocks * block_size))
        partial.append(cache)
    table = torch.randperm(num_blocks, generator=gen)[: blocks * batch]
    table = table.view(batch, blocks).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    heads = layer.kernel.shape[0]
    query = torch.randn(batch, heads, layer.d_partial, generator=gen)
    counters = new_selection_counters(num_blocks, torch.device("cpu"))
    scale = layer.head_dim**-0.5
    kernel = layer.kernel

    def choose(copy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = layer.score(
            query, partial[copy], table, seq_lens, scale, layer.selection.score_rule
        )
        chosen = select_blocks(scores, seq_lens, block_size, layer.selection)
        count_selected_blocks(counters, table, chosen)
        plan = plan_in_place(chosen, table, seq_lens, block_size)
        lens = plan.sparse_seq_lens.to(torch.int32)
        return plan.compact_block_table.to(torch.int32), lens, kernel.metadata(lens)

    dense_meta = kernel.metadata(seq_lens)
    sparse_table, sparse_lens, sparse_meta = choose(0)
    dense, chosen, read = _time_interleaved(
        [
            lambda c: kernel(host[c], table, seq_lens, dense_meta),
            choose,
            lambda c: kernel(host[c], sparse_table, sparse_lens, sparse_meta),
        ],
        copies,
        repeats,
    )
    return dense, chosen, read


def probe_step_costs(
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    d_partial: int,
    block_size: int,
    dtype: torch.dtype,
    partial_dtype: torch.dtype,
    score: Callable[..., torch.Tensor],
    selection: SelectionPolicy,
    contexts: tuple[int, ...] = PROBE_CONTEXTS,
    batch: int = PROBE_BATCH,
    copies: int = PROBE_COPIES,
    repeats: int = PROBE_REPEATS,
) -> StepCosts:
    """Time one sparse layer's decode both ways on this machine (module
    docstring) and fit the per-layer costs.

    Args:
        num_heads, num_kv_heads, head_dim: this rank's attention shape.
        d_partial: channels per partial key.
        dtype: the KV cache's type; ``partial_dtype``: the partial keys'.
        score: the engine's block scorer (``block_scores``' contract).
        selection: the engine's selection parameters (its budget is the
            probe's).
    """
    kernel = CPUKernel(num_heads, num_kv_heads, head_dim, block_size, dtype, batch)
    layer = _Layer(
        kernel,
        num_kv_heads,
        head_dim,
        d_partial,
        block_size,
        dtype,
        partial_dtype,
        score,
        selection,
    )
    tokens, dense, choose, read = [], [], [], []
    for context in contexts:
        times = _measure(layer, context, batch, copies, repeats)
        tokens.append(float(context * batch))
        dense.append(times[0])
        choose.append(times[1])
        read.append(times[2])
    dense_fixed, dense_slope = _fit(tokens, dense)
    choose_fixed, choose_slope = _fit(tokens, choose)
    read_fixed, read_slope = _fit(tokens, read)
    # The dense side as a pure per-token cost, its fixed part (a kernel
    # call) netted out of the sparse side's, which makes the same call.
    dense_rate = dense_slope if dense_slope > 0 else sum(dense) / sum(tokens)
    return StepCosts(
        dense_us_per_token=dense_rate * 1e3,
        choose_fixed_ms=max(choose_fixed + read_fixed - dense_fixed, 0.0),
        choose_us_per_token=max(choose_slope, 0.0) * 1e3,
        read_us_per_token=max(read_slope, 0.0) * 1e3,
        budget=selection.budget_fraction,
    )


# ------------------------------------------------------------- block size

#: Block sizes INFINIGEN chooses among on CPU when the user sets no
#: ``--block-size`` (multiples of 32: vLLM's vectorised CPU kernels; 16
#: takes its slower ``vec16`` path). Smaller blocks select more precisely
#: (``docs/results.md``, "Block size").
CPU_BLOCK_SIZES = (32, 64, 128)

#: A smaller block size is kept while vLLM's kernel at it is within this
#: share of the fastest candidate's time.
BLOCK_SIZE_TOLERANCE = 0.03

#: Decode batches the block-size probe times: (context tokens, requests).
BLOCK_PROBE_SHAPES = ((2048, 1), (8192, 4))


@dataclass(frozen=True)
class BlockSizeChoice:
    """vLLM's kernel over every block, timed at each candidate block size."""

    block_size: int
    ms: dict[int, float]
    """Per candidate, the kernel's ms summed over :data:`BLOCK_PROBE_SHAPES`
    (one layer; best of the interleaved sweeps)."""
    tolerance: float

    def describe(self) -> str:
        fastest = min(self.ms.values())
        parts = ", ".join(
            f"{size}: {ms:.2f} ms ({ms / fastest:.2f}x)" for size, ms in self.ms.items()
        )
        return (
            f"block_size={self.block_size}, the smallest within "
            f"{self.tolerance:.0%} of the fastest (vLLM's CPU kernel, one "
            f"layer at {' + '.join(f'{c}x{b}' for c, b in BLOCK_PROBE_SHAPES)}: "
            f"{parts})"
        )


def choose_block_size(ms: dict[int, float], tolerance: float) -> int:
    """The smallest block size whose kernel time is within ``tolerance`` of
    the fastest's."""
    fastest = min(ms.values())
    return min(size for size, t in ms.items() if t <= fastest * (1.0 + tolerance))


@functools.lru_cache(maxsize=8)
def probe_block_size(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    candidates: tuple[int, ...] = CPU_BLOCK_SIZES,
    tolerance: float = BLOCK_SIZE_TOLERANCE,
    copies: int = PROBE_COPIES,
    repeats: int = 5,
) -> BlockSizeChoice:
    """Time vLLM's CPU kernel over every block of :data:`BLOCK_PROBE_SHAPES`
    at each candidate block size, on one thread, and choose.

    The same KV bytes serve every block size (a block is ``[kv heads,
    block, 2 * head_dim]``, so one buffer views as blocks of any size), the
    blocks of a request are scattered as in a long-running cache, and the
    candidates are timed in turn within each sweep so that the machine's
    drift falls on all of them alike; the best sweep is kept. Cached per
    process and shape: one engine configuration probes once.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        totals = dict.fromkeys(candidates, 0.0)
        for context, batch in BLOCK_PROBE_SHAPES:
            tokens = -(-context // max(candidates)) * max(candidates)
            flat = [
                torch.randn(
                    tokens * batch, num_kv_heads, 2 * head_dim, generator=gen
                ).to(dtype)
                for _ in range(copies)
            ]
            calls: list[Callable[[int], Any]] = []
            for size in candidates:
                kernel = CPUKernel(
                    num_heads, num_kv_heads, head_dim, size, dtype, batch
                )
                blocks = tokens // size
                caches = [
                    f.view(blocks * batch, num_kv_heads, size, 2 * head_dim)
                    for f in flat
                ]
                order = torch.randperm(blocks * batch, generator=gen)
                table = order.view(batch, blocks).to(torch.int32)
                lens = torch.full((batch,), context, dtype=torch.int32)
                calls.append(
                    functools.partial(
                        _kernel_on_copy,
                        kernel,
                        caches,
                        table,
                        lens,
                        kernel.metadata(lens),
                    )
                )
            times = _time_interleaved(calls, copies, repeats)
            for size, ms in zip(candidates, times, strict=True):
                totals[size] += ms
        return BlockSizeChoice(
            block_size=choose_block_size(totals, tolerance),
            ms=totals,
            tolerance=tolerance,
        )
    finally:
        torch.set_num_threads(threads)


def _kernel_on_copy(
    kernel: CPUKernel,
    caches: list[torch.Tensor],
    table: torch.Tensor,
    lens: torch.Tensor,
    meta: torch.Tensor,
    copy: int,
) -> None:
    kernel(caches[copy], table, lens, meta)
