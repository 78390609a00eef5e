"""The INFINIGEN attention backend on vLLM's CPU platform.

Shape follows vLLM's ``cpu_attn.py``: a backend class naming the metadata
builder and the implementation, subclasses of the CPU ones (vLLM's own CPU
kernels do all attention math).

* Prefill and chunked prefill: exact, over every earlier block of the host
  tier (vLLM's paged cache).
* Decode on a sparse layer: the blocks chosen one layer ahead
  (:mod:`vllm_infinigen.engine.runtime`) were swapped into a staging buffer;
  the paged kernel runs over a compacted block table of staging slots, the
  newest partly filled block last, so the sparse sequence length stays valid.
* Dense layers (layer 0, ``dense_layers``, sliding-window layers, non-decoder
  attention): exactly vLLM's CPU path.

Decode and prefill rows keep vLLM's batch order (no reordering), and a
mixed batch runs as one kernel call over staging whose scheduler metadata is
computed exactly as dense attention computes it: with a budget covering every
block, the kernel sees the same sequence lengths in the same order and the
output is bit-identical to vLLM's default backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_infinigen.config import InfiniGenConfig
from vllm_infinigen.engine.copier import BlockCopier
from vllm_infinigen.engine.runtime import get_runtime
from vllm_infinigen.engine.startup import announce

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
    """CPU metadata plus the decode/prefill split of the batch."""

    num_decodes: int = 0
    """Requests with one new token this step."""
    decode_req_idx: torch.Tensor | None = None
    """``[num_decodes]`` int64 their rows in the batch."""
    decode_token_idx: torch.Tensor | None = None
    """``[num_decodes]`` int64 their query tokens."""
    prefill_req_idx: torch.Tensor | None = None
    """``[num_prefills]`` int64 rows of the other requests."""
    max_decode_seq_len: int = 0
    prefill_src_block_ids: torch.Tensor | None = None
    """``[num_prefill_blocks]`` int64 host block ids of every block of every
    prefill request (request after request), when the batch also has
    decodes: prefills read their whole context, so it is swapped in whole."""
    prefill_rel_table: torch.Tensor | None = None
    """``[num_prefills, width]`` int32 slots of those blocks relative to the
    first prefill slot (0 past a request's last block)."""
    num_prefill_blocks: int = 0


class InfiniGenCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """Builds one step's metadata for a KV cache group (all its layers)."""

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

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
        query_start_loc = base.query_start_loc[: common_attn_metadata.num_reqs + 1]
        query_lens = query_start_loc[1:] - query_start_loc[:-1]
        is_decode = query_lens == 1
        decode_idx = torch.nonzero(is_decode).flatten()
        meta.num_decodes = int(decode_idx.numel())
        if not meta.num_decodes:
            return meta
        meta.decode_req_idx = decode_idx
        meta.decode_token_idx = query_start_loc[decode_idx].long()
        meta.max_decode_seq_len = int(base.seq_lens[decode_idx].max())
        prefill_idx = torch.nonzero(~is_decode).flatten()
        meta.prefill_req_idx = prefill_idx
        if prefill_idx.numel():
            self._plan_prefill_blocks(meta, prefill_idx)
        return meta

    def _plan_prefill_blocks(
        self, meta: InfiniGenCPUMetadata, rows: torch.Tensor
    ) -> None:
        """Lay the prefill requests' whole contexts out after the decode slots
        (layer-independent, so computed once per step)."""
        seq_lens = meta.seq_lens[rows].long()
        counts = (seq_lens + self.block_size - 1) // self.block_size
        width = int(counts.max())
        table = meta.block_table[rows, :width].long()
        cols = torch.arange(width)[None, :]
        valid = cols < counts[:, None]
        offsets = torch.cumsum(counts, 0) - counts
        meta.prefill_src_block_ids = table[valid]
        meta.prefill_rel_table = torch.where(
            valid, offsets[:, None] + cols, torch.zeros_like(cols)
        ).to(torch.int32)
        meta.num_prefill_blocks = int(counts.sum())


class InfiniGenCPUImpl(CPUAttentionBackendImpl):
    """Per-layer attention of the INFINIGEN backend."""

    supported_modes: ClassVar[tuple[str, ...]] = ("exact", "sparse")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config()
        self.model_dtype: torch.dtype = vllm_config.model_config.dtype  # type: ignore[assignment]
        self.infinigen_config = InfiniGenConfig.from_additional_config(
            vllm_config.additional_config
        )
        mode = (
            "swap-in decode, budget covers every block (exact)"
            if self.infinigen_config.is_exact
            else "sparse swap-in decode"
        )
        announce(vllm_config, self.infinigen_config, mode=mode)

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
        runtime = get_runtime()
        if runtime is None:
            return
        info = runtime.layer_of(str(getattr(layer, "layer_name", "")))
        if info is not None and info.sparse:
            runtime.write_partial_keys(info, key, kv_cache, slot_mapping)

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
        runtime = get_runtime()
        info = None if runtime is None else runtime.layer_of(str(layer.layer_name))
        pending = None
        if (
            runtime is not None
            and info is not None
            and info.sparse
            and isinstance(attn_metadata, InfiniGenCPUMetadata)
        ):
            if attn_metadata.num_decodes > 0:
                pending = runtime.take(info.index)
                if pending is None:  # a policy that chooses at the layer
                    rows = attn_metadata.decode_req_idx
                    assert rows is not None
                    pending = runtime.select_at_attention(
                        info,
                        query[attn_metadata.decode_token_idx],
                        attn_metadata.block_table[rows],
                        attn_metadata.seq_lens[rows],
                        attn_metadata.max_decode_seq_len,
                        extra_slots=attn_metadata.num_prefill_blocks,
                    )
            if "h2o" in runtime.tracked:
                self._observe(runtime, info, layer, query, kv_cache, attn_metadata)
        if pending is None or runtime is None or info is None:
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
        assert isinstance(attn_metadata, InfiniGenCPUMetadata)
        if "h2o" in runtime.tracked:
            rows = attn_metadata.decode_token_idx
            runtime.observe_decode(info, layer.isa, query[rows], pending.plan, kv_cache)
        num_tokens = attn_metadata.num_actual_tokens
        stats = runtime.stats.layer(info.index)

        staging = runtime.finish_swap(info.index, pending)
        plan = pending.plan
        decode_rows = attn_metadata.decode_req_idx
        assert decode_rows is not None
        # Decode rows read their compacted staging slots and sparse lengths;
        # prefill rows (if any) read their whole context, swapped in after.
        seq_lens = attn_metadata.seq_lens.clone()
        seq_lens[decode_rows] = plan.sparse_seq_lens.to(seq_lens.dtype)
        tables = [(decode_rows, plan.compact_block_table)]
        prefill_src = attn_metadata.prefill_src_block_ids
        prefill_rows = attn_metadata.prefill_req_idx
        rel_table = attn_metadata.prefill_rel_table
        if (
            prefill_src is not None
            and prefill_rows is not None
            and rel_table is not None
        ):
            BlockCopier.copy_at(kv_cache, staging, prefill_src, plan.total_blocks)
            stats.prefill_blocks_read += attn_metadata.num_prefill_blocks
            tables.append((prefill_rows, rel_table + plan.total_blocks))
        block_table = _scatter_tables(seq_lens.shape[0], tables)
        staged_k, staged_v = _split_kv(staging)
        start = time.perf_counter()
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.shape[0],
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_size,
            seq_lens=seq_lens,
            dtype=self.model_dtype,
            query_start_loc=attn_metadata.query_start_loc,
            causal=bool(attn_metadata.causal),
            sliding_window_size=-1,
            isa=layer.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        self._attend(
            layer,
            query[:num_tokens],
            staged_k,
            staged_v,
            output[:num_tokens],
            attn_metadata.query_start_loc,
            seq_lens,
            block_table,
            scheduler_metadata,
            causal=bool(attn_metadata.causal),
        )
        stats.attention_s += time.perf_counter() - start
        return output

    @staticmethod
    def _observe(
        runtime: Any,
        info: Any,
        layer: Any,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: InfiniGenCPUMetadata,
    ) -> None:
        """H2O: accumulate the mass prefill rows give their context (decode
        rows are observed over the blocks they read, after selection)."""
        if meta.num_decodes:
            rows = meta.prefill_req_idx
            prefill_rows = [] if rows is None else rows.tolist()
        else:
            prefill_rows = list(range(meta.seq_lens.shape[0]))
        if prefill_rows:
            runtime.observe_prefill(
                info,
                layer.isa,
                query,
                meta.query_start_loc,
                meta.seq_lens,
                meta.block_table,
                prefill_rows,
                kv_cache,
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
