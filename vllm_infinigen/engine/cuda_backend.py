"""The INFINIGEN attention backend on CUDA (vLLM's FlashAttention kernels).

Registered instead of the CPU backend when the platform is not CPU. Shape
follows vLLM 0.32's ``flash_attn.py``: subclasses of its backend, metadata
builder and implementation, and every attention computation is vLLM's own
FlashAttention call (``FlashAttentionImpl.forward``), handed a different KV
tensor and a shallow copy of the metadata. This module is the *attention*
piece; which blocks are read and their copy belong to the CUDA runtime
(``engine/cuda_runtime.py``), found on the layer.

Where the KV lives (``patches/cuda_kv_alloc.py``): a sparse layer's paged
cache is a UVA view of INFINIGEN's pinned host pool (one block of one layer
is one contiguous byte run, layout ``LBNHC``); dense layers keep theirs in
GPU memory. vLLM's ``reshape_and_cache_flash`` writes new K/V into either
(plain stores through the UVA pointer). FlashAttention never reads the host
pool: vLLM has no path that runs it over host memory (FA3/FA4 load KV with
TMA), so a sparse layer's attention reads device staging only:

* Decode rows (the batch's first ``num_decode_rows`` requests, one query
  token each: the builder asks vLLM to put decodes first): the selected blocks
  were gathered into a staging buffer one layer ahead (the runtime's
  pre-hook on layer ``L-1``); attention waits for that copy, writes this
  step's K/V into the newest block's staging slot too (it was written to
  the host after the copy started), and runs FlashAttention over the
  staging buffer with a compacted block table of staging slots and sparse
  sequence lengths (:func:`decode_metadata`).
* Prefill rows (prefill, chunked prefill, and the prefills of a mixed
  batch): their whole context is gathered into a device region on the
  compute stream after this step's KV write, and a second FlashAttention
  call reads it (:func:`prefill_metadata`): exact, like vLLM's dense path.
* Dense layers (layer 0, ``dense_layers``, sliding-window layers,
  non-decoder attention) and profiling runs: vLLM's FlashAttention path
  unchanged.

Eager only (the platform hook forces it): the runtime runs Python between
layers and plans shapes from host ints (``docs/cuda.md``, "A decode step").

This module imports on vLLM's CPU build without touching CUDA, and its pure
parts (the decode/prefill split, metadata rewriting, staging views and slot
mappings) are tested there on CPU tensors and real vLLM dataclasses
(``tests/engine/test_cuda_backend.py``); the FlashAttention calls over
staging and the UVA writes need a GPU with vLLM (the ``gpu``-marked tests;
``docs/cuda.md``, "What ran where").
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec
from vllm.v1.kv_cache_layout import KVCacheLayout

from vllm_infinigen.engine.backend_hooks import after_kv_write
from vllm_infinigen.engine.layer_state import LAYER_ATTR, SparseLayer
from vllm_infinigen.engine.placement import PrefillGather, plan_prefill_gather
from vllm_infinigen.engine.runtime import KVWrite, plan_kv_write
from vllm_infinigen.engine.startup import start_backend

if TYPE_CHECKING:
    from vllm_infinigen.engine.cuda_runtime import CudaRuntime

BACKEND_NAME = "INFINIGEN"


class InfiniGenFlashAttnBackend(FlashAttentionBackend):
    """Backend registered as ``INFINIGEN`` on CUDA platforms."""

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[InfiniGenFlashAttnImpl]:
        return InfiniGenFlashAttnImpl

    @staticmethod
    def get_builder_cls() -> type[InfiniGenFlashAttnMetadataBuilder]:
        return InfiniGenFlashAttnMetadataBuilder

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Layer-compact with block-contiguous pages: one block of one layer
        # is one byte run (a block copy is one run, and the host pool holds
        # the sparse layers apart from the dense ones). FlashAttention's own
        # default preference puts LBNHC first too.
        return (KVCacheLayout.LBNHC,)


# ----------------------------------------------------------------- metadata
@dataclass
class InfiniGenFlashAttnMetadata(FlashAttentionMetadata):
    """FlashAttention metadata plus the decode/prefill split of the batch
    (computed once per step by the builder, shared by the group's layers).
    Decode rows come first (the builder's reorder threshold)."""

    num_decode_rows: int = 0
    """Requests with one new token, rows ``[0, num_decode_rows)``; their
    query tokens are tokens ``[0, num_decode_rows)``."""
    max_decode_seq_len: int = 0
    """Host upper bound of the decode rows' sequence lengths."""
    decode_context_tokens: int = 0
    """Host upper bound of their sum."""
    kv_write: KVWrite | None = None
    """Where this step's new tokens go (the same for every layer)."""
    prefill_gather: PrefillGather | None = None
    """The prefill rows' context gather, ``None`` without prefill rows."""


def split_batch(
    base: FlashAttentionMetadata,
    common: CommonAttentionMetadata,
    block_size: int,
) -> InfiniGenFlashAttnMetadata:
    """``base`` plus the decode/prefill split INFINIGEN's sparse layers use.

    Host reads only (CPU copies of the query starts and of the sequence
    lengths' upper bound); the KV write plan reads the slot mapping.
    A batch whose decode rows do not hold one token each (request padding)
    is treated as all prefill: exact, only not sparse.
    """
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    meta = InfiniGenFlashAttnMetadata(**fields)
    meta.kv_write = plan_kv_write(base.slot_mapping, block_size)
    num_decodes, num_prefills, decode_tokens, _ = split_decodes_and_prefills(
        common, decode_threshold=1
    )
    if decode_tokens != num_decodes:
        num_decodes, num_prefills = 0, common.num_reqs
    upper = common.seq_lens_cpu_upper_bound
    if upper is None:  # no host copy: the batch's bound for every row
        upper = torch.full((common.num_reqs,), common.max_seq_len)
    if num_decodes:
        meta.num_decode_rows = num_decodes
        decode_lens = upper[:num_decodes]
        meta.max_decode_seq_len = int(decode_lens.max())
        meta.decode_context_tokens = int(decode_lens.sum())
    if num_prefills:
        rows = torch.arange(num_decodes, num_decodes + num_prefills)
        meta.prefill_gather = plan_prefill_gather(
            base.block_table, rows, upper[rows], block_size
        )
    return meta


class InfiniGenFlashAttnMetadataBuilder(FlashAttentionMetadataBuilder):
    """FlashAttention's builder, asking vLLM to put decode rows first and
    adding the decode/prefill split."""

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Model runner V1 reorders the persistent batch (decode -> prefill)
        # only for builders that ask; V2 always sorts it that way.
        self._init_reorder_batch_threshold(1)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> InfiniGenFlashAttnMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return split_batch(base, common_attn_metadata, self.block_size)


# ------------------------------------------------------- metadata rewriting
def _splits(value: int) -> int:
    """FlashAttention's split count over staging: its own heuristics (0),
    unless the batch-invariant mode pinned it to 1 (the builder's two
    values in eager mode)."""
    return 1 if value == 1 else 0


def _rows(value: Any, rows: slice) -> Any:
    return value[rows] if isinstance(value, torch.Tensor) else value


def decode_metadata(
    meta: FlashAttentionMetadata,
    num_decodes: int,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
) -> FlashAttentionMetadata:
    """The metadata of the decode rows' attention over staging: rows
    ``[0, num_decodes)`` of ``meta``, one query token each (see
    :func:`_sub_batch`), with the sparse lengths ``seq_lens``.

    Args:
        block_table: ``[num_decodes, width]`` int32 staging slots.
        seq_lens: ``[num_decodes]`` int32 tokens each row attends to.
        max_seq_len: ``>= max(seq_lens)`` (e.g. ``width * block_size``).
    """
    out = _sub_batch(meta, slice(0, num_decodes), block_table, max_seq_len)
    out.num_actual_tokens = num_decodes
    out.max_query_len = 1
    out.query_start_loc = meta.query_start_loc[: num_decodes + 1]
    out.seq_lens = seq_lens
    return out


def prefill_metadata(
    meta: FlashAttentionMetadata,
    num_decodes: int,
    block_table: torch.Tensor,
    max_seq_len: int,
) -> FlashAttentionMetadata:
    """The metadata of the prefill rows' attention over their gathered
    contexts: rows and tokens ``[num_decodes, ...)`` of ``meta`` (the decode
    rows before them hold one token each; see :func:`_sub_batch`), query
    starts shifted to 0.

    Args:
        block_table: ``[num_prefill_rows, width]`` int32 region slots.
        max_seq_len: a host bound on the rows' lengths (``width *
            block_size``).
    """
    rows = slice(num_decodes, None)
    out = _sub_batch(meta, rows, block_table, max_seq_len)
    starts = meta.query_start_loc[rows]
    out.query_start_loc = starts - num_decodes if num_decodes else starts
    out.num_actual_tokens = meta.num_actual_tokens - num_decodes
    out.seq_lens = meta.seq_lens[rows]
    return out


def _sub_batch(
    meta: FlashAttentionMetadata,
    rows: slice,
    block_table: torch.Tensor,
    max_seq_len: int,
) -> FlashAttentionMetadata:
    """A shallow copy of ``meta`` (the precedent: the FlashAttention
    builder's ``update_block_table``) for ``rows`` of the batch, which are
    also its tokens (every decode row holds one): their slots, causal flags
    and prefix ranges, ``block_table``, ``max_seq_len`` capped, and the
    ahead-of-time scheduler metadata (computed for the dense lengths)
    dropped. The caller sets the query starts, token count and lengths."""
    out = copy.copy(meta)
    out.max_seq_len = min(meta.max_seq_len, max_seq_len)
    out.block_table = block_table
    out.slot_mapping = meta.slot_mapping[rows]
    out.scheduler_metadata = None
    out.max_num_splits = _splits(meta.max_num_splits)
    out.causal = _rows(meta.causal, rows)
    out.mm_prefix_query_range_tensor = _rows(meta.mm_prefix_query_range_tensor, rows)
    out.rswa_prefix_lens = _rows(meta.rswa_prefix_lens, rows)
    return out


# ------------------------------------------------------------ staging views
def staging_kv_view(buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Staging rows ``[capacity, block_bytes]`` uint8 seen as a paged cache
    with ``like``'s block layout (``[capacity, H, N, 2D]`` in ``like``'s
    dtype, strides of ``[capacity, N, H, 2D]``), the tensor FlashAttention's
    forward splits into key and value planes."""
    _, heads, block, content = like.shape
    typed = buffer.view(like.dtype)
    return typed.view(buffer.shape[0], block, heads, content).transpose(1, 2)


def staging_slot_mapping(
    slot_mapping: torch.Tensor, newest_slot: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Where each decode row's new token goes in staging: its offset in its
    newest block, in that block's staging slot.

    Args:
        slot_mapping: ``[num_decodes]`` the tokens' host slots.
        newest_slot: ``[num_decodes]`` staging slot of each row's newest
            block (``FixedPlan.newest_slot``).
    """
    offset = torch.remainder(slot_mapping.long(), block_size)
    return newest_slot.long() * block_size + offset


# ------------------------------------------------------------- attention
class InfiniGenFlashAttnImpl(FlashAttentionImpl):
    """Per-layer attention of the INFINIGEN backend on CUDA."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        start_backend("device staging")

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        after_kv_write(layer, key, kv_cache, slot_mapping, InfiniGenFlashAttnMetadata)

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: FlashAttentionMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        state: SparseLayer | None = getattr(layer, LAYER_ATTR, None)
        if (
            state is None
            or output_scale is not None
            or output_block_scale is not None
            or not isinstance(attn_metadata, InfiniGenFlashAttnMetadata)
        ):
            return super().forward(
                layer,
                query,
                key,
                value,
                kv_cache,
                attn_metadata,
                output,
                output_scale,
                output_block_scale,
            )
        meta = attn_metadata
        runtime: CudaRuntime = state.runtime  # type: ignore[assignment]
        nd = meta.num_decode_rows  # rows and query tokens [0, nd)
        if nd:
            self._decode(layer, state, query, key, value, kv_cache, meta, output)
        gather = meta.prefill_gather
        if gather is not None and gather.num_blocks:
            region = runtime.swap.gather_prefill(kv_cache, gather)
            bound = gather.width * state.block_size
            super().forward(
                layer,
                query[nd:],
                key[nd:],
                value[nd:],
                staging_kv_view(region, kv_cache),
                prefill_metadata(meta, nd, gather.block_table, bound),
                output[nd:],
            )
        if nd:
            runtime.layer_done(state)
        return output

    def _decode(
        self,
        layer: torch.nn.Module,
        state: SparseLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: InfiniGenFlashAttnMetadata,
        output: torch.Tensor,
    ) -> None:
        """The decode rows' attention over their swapped-in blocks (the
        batch's tensors; decode rows first)."""
        runtime: CudaRuntime = state.runtime  # type: ignore[assignment]
        rows = slice(0, meta.num_decode_rows)
        read, staged = runtime.decode_read(state, query[rows], meta)
        plan = staged.plan
        staging = staging_kv_view(staged.buffer, kv_cache)
        # This step's token was written to the host after the swap-in began:
        # write it into its newest block's staging slot as well.
        slots = staging_slot_mapping(
            meta.slot_mapping[rows], plan.newest_slot, state.block_size
        )
        super().do_kv_cache_update(layer, key[rows], value[rows], staging, slots)
        sub = decode_metadata(
            meta,
            meta.num_decode_rows,
            plan.compact_block_table,
            read.plan.sparse_seq_lens,
            plan.width * state.block_size,
        )
        super().forward(
            layer, query[rows], key[rows], value[rows], staging, sub, output[rows]
        )
        if runtime.recall_due(state):
            runtime.sample_recall(
                state, query[rows], meta.block_table[rows], meta.seq_lens[rows], read
            )
