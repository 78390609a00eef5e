"""A small model's INFINIGEN state on CUDA-shaped tensors, for the CUDA tests.

Three attention layers (layer 0 dense, layers 1 and 2 sparse) whose paged
caches are vLLM's own per-layer views in the ``LBNHC`` layout INFINIGEN asks
for (``create_kv_cache_views`` through ``patches/cuda_kv_alloc.py``), a
:class:`~vllm_infinigen.engine.cuda_runtime.CudaRuntime` over them, one
step's metadata built from vLLM's dataclasses, and slow torch references of
paged attention. On CPU ``cuda_swap``'s swap engine copies inline. The
layers' dimensions and speculators are ``tests/engine/tiny_model.py``'s.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    compute_layout_strides,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from tests.engine.tiny_model import BLOCK, DIM, HEADS, KV, speculator
from vllm_infinigen.config import InfiniGenConfig
from vllm_infinigen.engine.cuda_backend import InfiniGenFlashAttnMetadata, split_batch
from vllm_infinigen.engine.cuda_runtime import CudaRuntime, read_paged_keys
from vllm_infinigen.engine.layer_state import LayerInfo
from vllm_infinigen.engine.placement import BlockPlan
from vllm_infinigen.engine.policies.base import PolicyContext
from vllm_infinigen.method.selection import blocks_for
from vllm_infinigen.patches.cuda_kv_alloc import place_views, split_tiers

NUM_BLOCKS = 128
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(3)]
#: Every layer's KV cache spec (float32 pages of ``BLOCK`` tokens).
SPEC = FullAttentionSpec(
    block_size=BLOCK, num_kv_heads=KV, head_size=DIM, dtype=torch.float32
)


def kv_cache_config(num_blocks: int = NUM_BLOCKS) -> KVCacheConfig:
    """vLLM's KV cache configuration of the three layers: one tensor, one
    group, in the ``LBNHC`` layout."""
    layer_stride, block_stride, *_ = compute_layout_strides(
        SPEC, num_blocks, len(NAMES), KVCacheLayout.LBNHC
    )
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[
            KVCacheTensor(
                size=layer_stride * len(NAMES),
                layers=NAMES,
                layer_stride=layer_stride,
                block_stride=block_stride,
            )
        ],
        kv_cache_groups=[KVCacheGroupSpec(NAMES, SPEC)],
    )


def paged_caches(sparse: set[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """vLLM's per-layer LBNHC views, sparse layers in one buffer, dense in
    another (what the KV allocation patch makes, without pinning)."""
    layout = KVCacheLayout.LBNHC
    tiers = split_tiers(kv_cache_config(), layout, sparse)
    host = torch.zeros(tiers.host_bytes, dtype=torch.uint8, device=device)
    dense = torch.zeros(tiers.device_bytes, dtype=torch.int8, device=device)
    return place_views(tiers, layout, host, dense)


def write_kv(
    cache: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> None:
    """What ``reshape_and_cache_flash`` does: token ``i`` at ``slots[i]``."""
    blocks = torch.div(slots, BLOCK, rounding_mode="floor").long()
    offsets = (slots % BLOCK).long()
    cache[blocks, :, offsets, :DIM] = key
    cache[blocks, :, offsets, DIM:] = value


def context_tokens(
    cache: torch.Tensor, table_row: torch.Tensor, length: int
) -> torch.Tensor:
    """A request's first ``length`` tokens ``[length, KV, 2 * DIM]`` read
    through its block table row from a paged cache ``[B, H, N, 2D]``."""
    blocks = table_row[: blocks_for(length, BLOCK)].long()
    return cache[blocks].permute(0, 2, 1, 3).reshape(-1, KV, 2 * DIM)[:length]


def paged_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    table: torch.Tensor,
) -> torch.Tensor:
    """Reference causal attention over a paged cache (what FlashAttention
    computes): request ``r``'s queries are the last ``q_r`` of its
    ``seq_lens[r]`` tokens, each attending to the tokens up to its own.

    Args:
        query: ``[tokens, HEADS, DIM]``.
        query_start_loc: ``[R + 1]`` token offsets of the requests.
    """
    out = torch.zeros_like(query)
    for r in range(seq_lens.shape[0]):
        first, last = int(query_start_loc[r]), int(query_start_loc[r + 1])
        n = int(seq_lens[r])
        tokens = context_tokens(cache, table[r], n)
        for t in range(first, last):
            seen = tokens[: n - (last - t) + 1]
            out[t] = attend(query[t], seen[..., :DIM], seen[..., DIM:])
    return out


def selected_attention(
    query: torch.Tensor, cache: torch.Tensor, plan: BlockPlan
) -> torch.Tensor:
    """Reference decode attention of each row over exactly the blocks a
    plan reads, straight from the paged cache (``query``: ``[R, HEADS,
    DIM]``, one token per row)."""
    out = torch.empty_like(query)
    for r in range(query.shape[0]):
        tokens = context_tokens(cache, plan.host_ids[r], int(plan.sparse_seq_lens[r]))
        out[r] = attend(query[r], tokens[..., :DIM], tokens[..., DIM:])
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query token's attention ``[HEADS, DIM]`` over keys and values
    ``[n, KV, DIM]`` (grouped query heads)."""
    group = HEADS // KV
    k = k.repeat_interleave(group, dim=1)  # [n, heads, D]
    v = v.repeat_interleave(group, dim=1)
    weights = torch.softmax(torch.einsum("hd,nhd->hn", q, k) / DIM**0.5, dim=-1)
    return torch.einsum("hn,nhd->hd", weights, v)


def step_metadata(
    seq_lens: list[int],
    query_lens: list[int],
    table: torch.Tensor,
) -> tuple[FlashAttentionMetadata, CommonAttentionMetadata]:
    """One step's FlashAttention metadata as vLLM's builder makes it (no
    scheduler metadata), and the common metadata it was built from."""
    device = table.device
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    slots = []
    for r, (n, q) in enumerate(zip(seq_lens, query_lens, strict=True)):
        pos = torch.arange(n - q, n)
        slots.append(table[r, pos // BLOCK].cpu().long() * BLOCK + pos % BLOCK)
    slot_mapping = torch.cat(slots).to(device)
    common = CommonAttentionMetadata(
        query_start_loc=starts.to(device, torch.int32),
        query_start_loc_cpu=starts.to(torch.int32),
        seq_lens=lens.to(device),
        num_reqs=len(seq_lens),
        num_actual_tokens=sum(query_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_table_tensor=table,
        slot_mapping=slot_mapping,
        seq_lens_cpu_upper_bound=lens,
    )
    base = FlashAttentionMetadata(
        num_actual_tokens=sum(query_lens),
        max_query_len=max(query_lens),
        query_start_loc=common.query_start_loc,
        max_seq_len=max(seq_lens),
        seq_lens=common.seq_lens,
        block_table=table,
        slot_mapping=slot_mapping,
    )
    return base, common


class World:
    """A CUDA runtime over paged caches holding a batch of requests."""

    def __init__(
        self,
        seq_lens: list[int],
        device: str = "cpu",
        cached: list[int] | None = None,
        **options: Any,
    ) -> None:
        """``cached``: tokens of each request already in the cache (default:
        all but the last)."""
        infos = {
            0: LayerInfo(0, NAMES[0], DIM**-0.5, False, "first layer"),
            1: LayerInfo(1, NAMES[1], DIM**-0.5, True, ""),
            2: LayerInfo(2, NAMES[2], DIM**-0.5, True, ""),
        }
        options.setdefault("swap_mode", "sync")
        self.runtime = CudaRuntime(
            InfiniGenConfig(**options),
            infos,
            {1: speculator(1, device), 2: speculator(2, device)},
            PolicyContext(block_size=BLOCK, key_reader=read_paged_keys),
        )
        self.device = device
        self.caches = paged_caches({NAMES[1], NAMES[2]}, device)
        gen = torch.Generator().manual_seed(7)
        self.seq_lens = seq_lens
        width = (max(seq_lens) + BLOCK) // BLOCK + 1
        ids = torch.randperm(NUM_BLOCKS - 1, generator=gen)[: len(seq_lens) * width]
        self.table = (ids + 1).view(len(seq_lens), width).to(device, torch.int32)
        self.cached = [n - 1 for n in seq_lens] if cached is None else cached
        for index in (1, 2):
            for r, n in enumerate(self.cached):
                if n:
                    self.write(index, r, n, gen)
        self.gen = gen

    def layer(self, index: int) -> Any:
        return self.runtime.sparse[index]

    def write(
        self, index: int, r: int, count: int, gen: torch.Generator, start: int = 0
    ) -> torch.Tensor:
        """Write tokens ``start..start+count`` of request ``r`` (keys and
        values random) and tell the runtime, as the KV update does."""
        pos = torch.arange(start, start + count)
        slots = (self.table[r, pos // BLOCK].cpu().long() * BLOCK + pos % BLOCK).to(
            self.device
        )
        key = torch.randn(count, KV, DIM, generator=gen).to(self.device)
        value = torch.randn(count, KV, DIM, generator=gen).to(self.device)
        cache = self.caches[NAMES[index]]
        write_kv(cache, slots, key, value)
        self.runtime.on_kv_write(self.layer(index), key, cache, slots)
        return slots

    def decode_step(self) -> InfiniGenFlashAttnMetadata:
        base, common = step_metadata(
            self.seq_lens, [1] * len(self.seq_lens), self.table
        )
        return split_batch(base, common, BLOCK)

    def finish_token(self, index: int, meta: InfiniGenFlashAttnMetadata) -> None:
        """This step's token of every request, written after the swap-in
        started (as layer ``index``'s KV update does)."""
        nd = meta.num_decode_rows
        gen = torch.Generator().manual_seed(100 + index)
        key = torch.randn(nd, KV, DIM, generator=gen).to(self.device)
        value = torch.randn(nd, KV, DIM, generator=gen).to(self.device)
        cache = self.caches[NAMES[index]]
        write_kv(cache, meta.slot_mapping[:nd], key, value)
        self.runtime.on_kv_write(
            self.layer(index), key, cache, meta.slot_mapping[:nd], meta.kv_write
        )
        self.new_kv = (key, value)
