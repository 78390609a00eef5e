"""The INFINIGEN attention backend on vLLM's CPU platform.

Shape follows vLLM's ``cpu_attn.py``: a backend class naming the metadata
builder and the implementation, subclasses of the CPU ones (vLLM's own CPU
kernels do all attention math). This module is the *attention* piece; which
blocks are read (selection, placement) and their copy (movement) belong to
the runtime (``engine/runtime.py``), which it finds on the layer.

* Prefill and chunked prefill: exact, over every earlier block of the host
  tier (vLLM's paged cache).
* Decode on a sparse layer, ``in_place`` placement (the CPU default): the
  kernel reads the selected host blocks where they lie, through a compacted
  block table of host block ids (the newest, partly filled block last) and
  sparse sequence lengths for the decode rows; prefill rows of a mixed batch
  keep their whole table. A step whose every request fits its budget runs
  vLLM's dense path unchanged.
* Decode on a sparse layer, staging placement (``sync`` / ``thread``, the
  GPU shape): the kernel reads a staging buffer the selected blocks were
  copied into; prefill rows of a mixed batch are copied in after them.
* Dense layers (layer 0, ``dense_layers``, sliding-window layers, non-decoder
  attention): exactly vLLM's CPU path.

Decode and prefill rows keep vLLM's batch order (no reordering), and a
mixed batch runs as one kernel call whose scheduler metadata is computed
exactly as dense attention computes it: with a budget covering every block,
the kernel sees the same sequence lengths in the same order and the output
is bit-identical to vLLM's default backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_infinigen.engine.backend_hooks import after_kv_write
from vllm_infinigen.engine.copier import BlockCopier
from vllm_infinigen.engine.layer_state import LAYER_ATTR, PreparedRead, SparseLayer
from vllm_infinigen.engine.placement import plan_prefill_gather
from vllm_infinigen.engine.policies.base import BlockPolicy
from vllm_infinigen.engine.runtime import InfiniGenRuntime, KVWrite, plan_kv_write
from vllm_infinigen.engine.startup import start_backend
from vllm_infinigen.method.selection import num_blocks_of

BACKEND_NAME = "INFINIGEN"


class InfiniGenCPUBackend(CPUAttentionBackend):
    """Backend registered as ``INFINIGEN`` on the CPU platform."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[InfiniGenCPUImpl]:
        return InfiniGenCPUImpl

    @staticmethod
    def get_builder_cls() -> type[InfiniGenCPUMetadataBuilder]:
        return InfiniGenCPUMetadataBuilder


@dataclass
class InfiniGenCPUMetadata(CPUAttentionMetadata):
    """CPU metadata plus the decode/prefill split of the batch (computed
    once per step, shared by every layer of the KV cache group)."""

    num_decodes: int = 0
    """Requests with one new token this step."""
    decode_req_idx: torch.Tensor | None = None
    """``[num_decodes]`` int64 their rows in the batch."""
    decode_token_idx: torch.Tensor | None = None
    """``[num_decodes]`` int64 their query tokens."""
    decode_block_table: torch.Tensor | None = None
    """``[num_decodes, max_blocks]`` their rows of the block table."""
    decode_seq_lens: torch.Tensor | None = None
    """``[num_decodes]`` their sequence lengths."""
    prefill_req_idx: torch.Tensor | None = None
    """``[num_prefills]`` int64 rows of the other requests."""
    max_decode_seq_len: int = 0
    decode_tokens: int = 0
    """Context tokens of the decode requests (``sum(decode_seq_lens)``)."""
    decode_blocks: int = 0
    """Blocks of the decode requests (``sum(ceil(seq_len / block_size))``)."""
    kv_write: KVWrite | None = None
    """Where this step's new tokens go (valid slots, fresh blocks): the same
    for every layer, so planned once here."""
    prefill_src_block_ids: torch.Tensor | None = None
    """For the staging placement: ``[num_prefill_blocks]`` int64 host block ids
    of every block of every prefill request (request after request), when
    the batch also has decodes: prefills read their whole context, so it is
    copied in whole."""
    prefill_rel_table: torch.Tensor | None = None
    """``[num_prefills, width]`` int32 slots of those blocks relative to the
    first prefill slot (0 past a request's last block)."""
    num_prefill_blocks: int = 0


class InfiniGenCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """Builds one step's metadata for a KV cache group (all its layers)."""

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> InfiniGenCPUMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        fields = {name: getattr(base, name) for name in base.__dataclass_fields__}
        meta = InfiniGenCPUMetadata(**fields)
        if self.is_cross_attention or self.is_encoder_only_attention:
            return meta
        # CPU tensors: these index ops and host reads cost no device sync.
        meta.kv_write = plan_kv_write(base.slot_mapping, self.block_size)
        query_start_loc = base.query_start_loc[: common_attn_metadata.num_reqs + 1]
        query_lens = query_start_loc[1:] - query_start_loc[:-1]
        is_decode = query_lens == 1
        decode_idx = torch.nonzero(is_decode).flatten()
        meta.num_decodes = int(decode_idx.numel())
        if not meta.num_decodes:
            return meta
        meta.decode_req_idx = decode_idx
        meta.decode_token_idx = query_start_loc[decode_idx].long()
        meta.decode_block_table = base.block_table[decode_idx]
        meta.decode_seq_lens = base.seq_lens[decode_idx]
        meta.max_decode_seq_len = int(meta.decode_seq_lens.max())
        meta.decode_tokens = int(meta.decode_seq_lens.sum())
        meta.decode_blocks = int(
            num_blocks_of(meta.decode_seq_lens, self.block_size).sum()
        )
        prefill_idx = torch.nonzero(~is_decode).flatten()
        meta.prefill_req_idx = prefill_idx
        if prefill_idx.numel():  # read by the staging placement only
            # The prefill requests' whole contexts, after the decode slots.
            lens = base.seq_lens[prefill_idx]
            gather = plan_prefill_gather(
                base.block_table, prefill_idx, lens, self.block_size
            )
            meta.prefill_src_block_ids = gather.src_ids
            meta.prefill_rel_table = gather.block_table
            meta.num_prefill_blocks = gather.num_blocks
        return meta


class InfiniGenCPUImpl(CPUAttentionBackendImpl):
    """Per-layer attention of the INFINIGEN backend."""

    supported_modes: ClassVar[tuple[str, ...]] = ("exact", "sparse")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        vllm_config, _ = start_backend("staging")
        self.model_dtype: torch.dtype = vllm_config.model_config.dtype  # type: ignore[assignment]

    # --------------------------------------------------------------- KV write
    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        after_kv_write(layer, key, kv_cache, slot_mapping, InfiniGenCPUMetadata)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CPUAttentionMetadata | None,  # type: ignore[override]
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        state: SparseLayer | None = getattr(layer, LAYER_ATTR, None)
        read = None
        if state is not None and isinstance(attn_metadata, InfiniGenCPUMetadata):
            runtime = state.runtime
            meta = attn_metadata
            if meta.num_decodes > 0:
                if not runtime.hooked:  # compiled model: no pre-hook ran
                    prepare_decode_step(runtime, state, meta, None)
                read = runtime.take(state)
                if read is None and not runtime.ahead:
                    assert meta.decode_block_table is not None
                    assert meta.decode_seq_lens is not None
                    read = runtime.prepare_at_attention(
                        state,
                        query[meta.decode_token_idx],
                        meta.decode_block_table,
                        meta.decode_seq_lens,
                        meta.max_decode_seq_len,
                        meta.decode_tokens,
                        extra_slots=meta.num_prefill_blocks,
                    )
            for observer in runtime.observers:
                active = observer is runtime.policy
                self._observe(observer, state, query, meta, read, active)
        if read is None or state is None:
            result = super().forward(
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
            if (
                state is not None
                and isinstance(attn_metadata, InfiniGenCPUMetadata)
                and attn_metadata.num_decodes
            ):
                state.runtime.layer_done(state)
            return result
        assert isinstance(attn_metadata, InfiniGenCPUMetadata)
        meta = attn_metadata
        decode_rows = meta.decode_req_idx
        assert decode_rows is not None
        plan = read.plan
        # Decode rows read their compacted table and sparse lengths; prefill
        # rows (if any) read their whole context.
        seq_lens = meta.seq_lens.clone()
        seq_lens[decode_rows] = plan.sparse_seq_lens.to(seq_lens.dtype)
        if read.handle is None:  # in place: host block ids
            cache = kv_cache
            block_table = meta.block_table.clone()
            width = plan.compact_block_table.shape[1]
            block_table[decode_rows, :width] = plan.compact_block_table.to(
                block_table.dtype
            )
        else:  # staging slots
            cache = state.runtime.finish_staging(state, read)
            block_table = self._staging_table(meta, kv_cache, cache, read)
        staged_k, staged_v = _split_kv(cache)
        start = time.perf_counter()
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.shape[0],
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_size,
            seq_lens=seq_lens,
            dtype=self.model_dtype,
            query_start_loc=meta.query_start_loc,
            causal=bool(meta.causal),
            sliding_window_size=-1,
            isa=layer.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        num_tokens = meta.num_actual_tokens
        self._attend(
            layer,
            query[:num_tokens],
            staged_k,
            staged_v,
            output[:num_tokens],
            meta.query_start_loc,
            seq_lens,
            block_table,
            scheduler_metadata,
            causal=bool(meta.causal),
        )
        state.stats.attention_s += time.perf_counter() - start
        runtime = state.runtime
        if runtime.recall_due(state):
            assert meta.decode_block_table is not None
            assert meta.decode_seq_lens is not None
            runtime.sample_recall(
                state,
                query[meta.decode_token_idx],
                meta.decode_block_table,
                meta.decode_seq_lens,
                read,
            )
        runtime.layer_done(state)
        return output

    @staticmethod
    def _staging_table(
        meta: InfiniGenCPUMetadata,
        kv_cache: torch.Tensor,
        staging: torch.Tensor,
        read: PreparedRead,
    ) -> torch.Tensor:
        """Block table over the staging buffer: decode rows' slots, then
        (mixed batches) the prefill rows' whole contexts copied in after."""
        plan = read.staging
        assert meta.decode_req_idx is not None
        tables = [(meta.decode_req_idx, plan.compact_block_table)]
        prefill_src = meta.prefill_src_block_ids
        prefill_rows = meta.prefill_req_idx
        rel_table = meta.prefill_rel_table
        if (
            prefill_src is not None
            and prefill_rows is not None
            and rel_table is not None
        ):
            BlockCopier.copy_at(kv_cache, staging, prefill_src, plan.total_blocks)
            tables.append((prefill_rows, rel_table + plan.total_blocks))
        return _scatter_tables(meta.seq_lens.shape[0], tables)

    @staticmethod
    def _observe(
        observer: BlockPolicy,
        state: SparseLayer,
        query: torch.Tensor,
        meta: InfiniGenCPUMetadata,
        read: PreparedRead | None,
        active: bool,
    ) -> None:
        """Hand a policy that observes attention what this layer attended:
        prefill rows over their whole context (every tracked observer: a
        later switch to it finds the prompts' evidence), decode rows over
        the blocks they read (the active policy only: what an inactive one
        saw of decode would be cleared by the reconfigure that activates
        it)."""
        if meta.num_decodes:
            rows = meta.prefill_req_idx
            prefill_rows = [] if rows is None else rows.tolist()
        else:
            prefill_rows = list(range(meta.seq_lens.shape[0]))
        if prefill_rows:
            observer.observe_prefill(
                state,
                query,
                meta.query_start_loc,
                meta.seq_lens,
                meta.block_table,
                prefill_rows,
            )
        if meta.num_decodes and active:
            assert meta.decode_token_idx is not None
            if read is not None:
                plan = read.plan
                host_ids, counts, lens = (
                    plan.host_ids,
                    plan.counts,
                    plan.sparse_seq_lens,
                )
            else:  # the dense path: every block
                assert meta.decode_block_table is not None
                assert meta.decode_seq_lens is not None
                lens = meta.decode_seq_lens
                counts = num_blocks_of(lens, state.block_size)
                host_ids = meta.decode_block_table.long()
            observer.observe_decode(
                state, query[meta.decode_token_idx], host_ids, counts, lens
            )

    def _attend(
        self,
        layer: Any,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        output: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        scheduler_metadata: torch.Tensor | None,
        causal: bool,
    ) -> None:
        ops.cpu_attention_with_kv_cache(
            query=query,
            key_cache=key_cache,
            value_cache=value_cache,
            output=output,  # type: ignore[arg-type]
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            scale=self.scale,
            causal=causal,
            alibi_slopes=self.alibi_slopes,  # type: ignore[arg-type]
            sliding_window=self.sliding_window,
            block_table=block_table,
            softcap=self.logits_soft_cap,
            scheduler_metadata=scheduler_metadata,  # type: ignore[arg-type]
            s_aux=self.sinks,
            dynamic_causal=None,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )


def prepare_decode_step(
    runtime: InfiniGenRuntime,
    layer: SparseLayer,
    meta: InfiniGenCPUMetadata,
    hidden: torch.Tensor | None,
) -> None:
    """Layer ``layer``'s ahead step of a decode step: from the pre-hook of
    the previous layer's ``qkv_proj`` (``hidden``: that layer's attention
    input, eager mode), or first thing in the layer's own attention
    (``None``: a compiled model, where nothing runs between the graph's
    ops). Nothing for a step without decode requests."""
    if not meta.num_decodes:
        return
    assert meta.decode_block_table is not None
    assert meta.decode_seq_lens is not None
    x = None
    if hidden is not None and runtime.needs_input(meta.decode_tokens):
        x = hidden[meta.decode_token_idx]
    runtime.prepare_ahead(
        layer,
        x,
        meta.decode_block_table,
        meta.decode_seq_lens,
        meta.max_decode_seq_len,
        meta.decode_tokens,
        extra_slots=meta.num_prefill_blocks,
        total_blocks=meta.decode_blocks,
    )


def _scatter_tables(
    num_reqs: int, parts: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """One int32 block table from ``(rows, table)`` parts, zero-padded."""
    width = max(table.shape[1] for _, table in parts)
    out = torch.zeros((num_reqs, width), dtype=torch.int32)
    for rows, table in parts:
        out[rows, : table.shape[1]] = table.to(torch.int32)
    return out


def _split_kv(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[blocks, heads, block_size, 2 * head]`` -> key and value planes."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.size()
    view = kv_cache.view((num_blocks, num_kv_heads, block_size * 2, -1))
    key_cache, value_cache = view.chunk(2, dim=2)
    return key_cache, value_cache
