"""The INFINIGEN attention backend on CUDA, as far as a CPU build can check it.

* It imports and registers on vLLM's CPU build without initialising CUDA.
* Its pure parts on real vLLM dataclasses with CPU tensors: the batch split
  the builder adds, the metadata rewriting of the decode and prefill calls,
  the byte views of paged caches and staging.
* Its orchestration: :meth:`InfiniGenFlashAttnImpl.forward` over the small
  model of ``tests/engine/cuda_world.py``, with FlashAttention replaced by a
  torch reference of paged attention (the only part of the path that needs
  CUDA), against that reference run on the host cache directly: dense layers
  reach the parent unchanged; sparse decode rows read their selected blocks
  from staging, prefill rows their whole context.

The ``gpu`` test runs vLLM's FlashAttention itself over staging; it needs a
GPU with the CUDA build of vLLM.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from tests.engine.cuda_world import (
    NAMES,
    World,
    paged_attention,
    paged_caches,
    selected_attention,
    step_metadata,
    write_kv,
)
from tests.engine.tiny_model import BLOCK, DIM, HEADS, HIDDEN, KV
from vllm_infinigen.engine.cuda_backend import (
    InfiniGenFlashAttnImpl,
    InfiniGenFlashAttnMetadata,
    InfiniGenFlashAttnMetadataBuilder,
    decode_metadata,
    prefill_metadata,
    split_batch,
    staging_kv_view,
    staging_slot_mapping,
)
from vllm_infinigen.engine.cuda_copy import as_block_rows, gather_blocks
from vllm_infinigen.engine.layer_state import LAYER_ATTR
from vllm_infinigen.method.selection import num_blocks_of

REGISTRATION_CHECK = textwrap.dedent(
    """
    from unittest import mock

    import torch
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadataBuilder)
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from vllm_infinigen import plugin

    # Register the member as a CUDA platform would (the class path only).
    with mock.patch.object(type(current_platform), "is_cpu", return_value=False):
        member = plugin.infinigen_backend_member()
    assert member.get_path() == plugin.CUDA_BACKEND_PATH, member.get_path()
    backend = member.get_class()
    assert issubclass(backend, FlashAttentionBackend)
    assert backend.get_name() == "INFINIGEN"
    assert AttentionBackendEnum[backend.get_name()] is member
    impl, builder = backend.get_impl_cls(), backend.get_builder_cls()
    assert issubclass(impl, FlashAttentionImpl)
    assert impl.__name__.startswith("InfiniGen")
    assert issubclass(builder, FlashAttentionMetadataBuilder)
    assert builder.__name__.startswith("InfiniGen")
    assert backend.supported_kv_cache_layouts() == (KVCacheLayout.LBNHC,)
    assert not torch.cuda.is_initialized()
    print("ok")
    """
)


def test_imports_and_registers_on_cpu_build_without_cuda() -> None:
    result = subprocess.run(
        [sys.executable, "-c", REGISTRATION_CHECK],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# ------------------------------------------------------------ batch split
def test_split_batch_finds_decodes_first_and_plans_prefill_gather() -> None:
    table = torch.arange(1, 25, dtype=torch.int32).view(3, 8)
    base, common = step_metadata([9, 30, 22], [1, 1, 6], table)
    meta = split_batch(base, common, BLOCK)
    assert isinstance(meta, InfiniGenFlashAttnMetadata)
    assert meta.seq_lens is base.seq_lens and meta.block_table is base.block_table
    assert meta.num_decode_rows == 2
    assert meta.max_decode_seq_len == 30 and meta.decode_context_tokens == 39
    assert meta.kv_write is not None and meta.kv_write.tokens == 8
    gather = meta.prefill_gather
    assert gather is not None
    # Row 2 holds 22 tokens: blocks 17..22, in slots 0..5.
    assert gather.num_blocks == gather.width == 6
    assert gather.src_ids.tolist() == list(range(17, 23))
    assert gather.block_table.tolist() == [list(range(6))]


def test_split_batch_without_decodes_or_prefills() -> None:
    table = torch.arange(1, 17, dtype=torch.int32).view(2, 8)
    decode = split_batch(*step_metadata([9, 30], [1, 1], table), BLOCK)
    assert decode.num_decode_rows == 2 and decode.prefill_gather is None
    prefill = split_batch(*step_metadata([5, 12], [5, 12], table), BLOCK)
    assert prefill.num_decode_rows == 0
    assert prefill.prefill_gather is not None
    assert prefill.prefill_gather.num_blocks == 2 + 3
    assert prefill.prefill_gather.block_table.tolist() == [[0, 1, 0], [2, 3, 4]]


def test_split_batch_treats_padded_decode_rows_as_prefill() -> None:
    """A padded request (query length 0) among one-token rows: the decode
    rows do not hold one token each, so the step reads every block whole."""
    table = torch.arange(1, 17, dtype=torch.int32).view(2, 8)
    base, common = step_metadata([9, 1], [1, 1], table)
    common.query_start_loc_cpu[-1] = 1
    common.num_actual_tokens = 1
    meta = split_batch(base, common, BLOCK)
    assert meta.num_decode_rows == 0 and meta.prefill_gather is not None


# ----------------------------------------------------- metadata rewriting
def _mixed_metadata() -> Any:
    table = torch.arange(1, 25, dtype=torch.int32).view(3, 8)
    base, _ = step_metadata([9, 30, 22], [1, 1, 6], table)
    base.scheduler_metadata = torch.ones(9, dtype=torch.int32)
    base.causal = torch.tensor([1, 1, 1], dtype=torch.int32)
    base.rswa_prefix_lens = torch.tensor([3, 4, 5], dtype=torch.int32)
    base.mm_prefix_query_range_tensor = torch.arange(16).view(8, 2)
    return base


def test_decode_metadata_restricts_to_decode_rows_over_staging() -> None:
    meta = _mixed_metadata()
    before = dict(vars(meta))
    table = torch.tensor([[0, 1, 0], [3, 4, 5]], dtype=torch.int32)
    lens = torch.tensor([5, 11], dtype=torch.int32)
    out = decode_metadata(meta, 2, table, lens, 3 * BLOCK)
    assert vars(meta) == before  # a copy: the shared metadata is untouched
    assert out.num_actual_tokens == 2 and out.max_query_len == 1
    assert out.query_start_loc.tolist() == [0, 1, 2]
    assert out.seq_lens is lens and out.block_table is table
    assert out.max_seq_len == 12  # the staging bound, below the batch's 30
    assert out.scheduler_metadata is None and out.max_num_splits == 0
    assert out.slot_mapping.tolist() == meta.slot_mapping[:2].tolist()
    assert out.causal.tolist() == [1, 1]
    assert out.rswa_prefix_lens.tolist() == [3, 4]
    assert out.mm_prefix_query_range_tensor.shape == (2, 2)
    meta.max_num_splits = 1  # batch-invariant mode pins one split
    assert decode_metadata(meta, 2, table, lens, 12).max_num_splits == 1


def test_prefill_metadata_shifts_to_the_prefill_rows() -> None:
    meta = _mixed_metadata()
    table = torch.tensor([[0, 1, 2, 3, 4, 5]], dtype=torch.int32)
    out = prefill_metadata(meta, 2, table, 6 * BLOCK)
    assert out.query_start_loc.tolist() == [0, 6]
    assert out.num_actual_tokens == 6 and out.max_query_len == 6
    assert out.seq_lens.tolist() == [22]
    assert out.max_seq_len == 24 and out.block_table is table
    assert out.slot_mapping.tolist() == meta.slot_mapping[2:].tolist()
    assert out.scheduler_metadata is None
    assert out.causal.tolist() == [1] and out.rswa_prefix_lens.tolist() == [5]
    assert out.mm_prefix_query_range_tensor.tolist()[0] == [4, 5]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 8]  # untouched


# ---------------------------------------------------------- byte views
def test_kv_cache_rows_and_staging_view_round_trip() -> None:
    """vLLM's LBNHC view of a layer is one byte row per block (a view), and
    staging rows gathered from it read back as that layout."""
    cache = paged_caches({NAMES[1]})[NAMES[1]]
    cache.copy_(torch.randn(cache.shape, generator=torch.Generator().manual_seed(0)))
    rows = as_block_rows(cache)
    assert rows.dtype == torch.uint8
    assert rows.shape == (cache.shape[0], KV * BLOCK * 2 * DIM * 4)
    assert rows.data_ptr() == cache.data_ptr()  # a view, no copy
    ids = torch.tensor([7, -1, 3, 12])
    staging = torch.zeros(4, rows.shape[1], dtype=torch.uint8)
    gather_blocks(rows, ids, staging)
    view = staging_kv_view(staging, cache)
    assert view.shape == (4, KV, BLOCK, 2 * DIM) and view.stride() == cache.stride()
    for slot, block in ((0, 7), (2, 3), (3, 12)):
        torch.testing.assert_close(view[slot], cache[block])
    assert not view[1].any()  # skipped slot untouched


def test_staging_slot_mapping_keeps_the_offset_in_the_newest_block() -> None:
    slots = torch.tensor([4 * 9 + 2, 4 * 30 + 0, 4 * 5 + 3])
    newest = torch.tensor([2, 7, 12])
    assert staging_slot_mapping(slots, newest, 4).tolist() == [10, 28, 51]


# ------------------------------------------------------------ builder
def test_builder_asks_for_decodes_first_and_splits(monkeypatch: Any) -> None:
    table = torch.arange(1, 17, dtype=torch.int32).view(2, 8)
    base, common = step_metadata([9, 13], [1, 4], table)
    monkeypatch.setattr(
        FlashAttentionMetadataBuilder, "__init__", lambda self, *a: None
    )
    monkeypatch.setattr(FlashAttentionMetadataBuilder, "build", lambda *a: base)
    builder = object.__new__(InfiniGenFlashAttnMetadataBuilder)
    builder.vllm_config = SimpleNamespace(  # type: ignore[assignment]
        speculative_config=None,
        parallel_config=SimpleNamespace(decode_context_parallel_size=1),
    )
    InfiniGenFlashAttnMetadataBuilder.__init__(builder, None, [], None, None)  # type: ignore[arg-type]
    assert builder.reorder_batch_threshold == 1
    builder.block_size = BLOCK
    meta = builder.build(0, common)
    assert meta.num_decode_rows == 1 and meta.prefill_gather is not None


# --------------------------------------------------- forward orchestration
class _Kernel:
    """Stand-in for FlashAttention (the parent's forward and KV update):
    the torch reference over whatever cache and metadata it is handed."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def forward(
        self,
        impl: Any,
        layer: Any,
        q: Any,
        k: Any,
        v: Any,
        cache: Any,
        meta: Any,
        output: Any,
        *rest: Any,
    ) -> Any:
        self.calls.append((layer, q, cache, meta, output))
        n = meta.num_actual_tokens
        output[:n] = paged_attention(
            q[:n], cache, meta.query_start_loc, meta.seq_lens, meta.block_table
        )
        return output

    def update(
        self, impl: Any, layer: Any, key: Any, value: Any, cache: Any, slots: Any
    ) -> None:
        write_kv(cache, slots, key[: slots.shape[0]], value[: slots.shape[0]])


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> _Kernel:
    stand_in = _Kernel()
    # Functions (not bound methods), so that super() binds them to the impl.
    monkeypatch.setattr(
        FlashAttentionImpl, "forward", lambda *args: stand_in.forward(*args)
    )
    monkeypatch.setattr(
        FlashAttentionImpl, "do_kv_cache_update", lambda *a: stand_in.update(*a)
    )
    return stand_in


def _impl() -> InfiniGenFlashAttnImpl:
    return object.__new__(InfiniGenFlashAttnImpl)  # FlashAttention's init needs CUDA


def test_dense_layer_runs_the_parent_unchanged(kernel: _Kernel) -> None:
    layer = torch.nn.Module()  # no INFINIGEN state: a dense layer
    table = torch.arange(1, 17, dtype=torch.int32).view(2, 8)
    meta = split_batch(*step_metadata([9, 13], [1, 4], table), BLOCK)
    cache = paged_caches(set())[NAMES[0]]
    q = torch.randn(5, HEADS, DIM)
    out = torch.zeros_like(q)
    _impl().forward(layer, q, q, q, cache, meta, out)
    assert len(kernel.calls) == 1
    assert kernel.calls[0][1:] == (q, cache, meta, out)


@pytest.mark.parametrize(
    ("seq_lens", "query_lens", "options"),
    [
        ([61, 100, 7], [1, 1, 1], {"budget": 0.3, "min_blocks": 2}),
        ([61, 100, 29], [1, 1, 9], {"budget": 0.3, "min_blocks": 2}),
        ([40, 23], [40, 5], {}),
        ([61, 100, 29], [1, 1, 9], {"policy": "dense"}),
    ],
)
def test_sparse_layer_forward(
    kernel: _Kernel,
    seq_lens: list[int],
    query_lens: list[int],
    options: dict[str, Any],
) -> None:
    """Decode rows attend to their selected blocks (through staging), prefill
    rows to their whole context (through the prefill region); the result is
    the reference attention over the host cache itself."""
    cached = [n - q for n, q in zip(seq_lens, query_lens, strict=True)]
    world = World(seq_lens, cached=cached, **options)
    runtime, index = world.runtime, 2
    state = world.layer(index)
    layer = torch.nn.Module()
    setattr(layer, LAYER_ATTR, state)
    cache = world.caches[NAMES[index]]
    meta = split_batch(*step_metadata(seq_lens, query_lens, world.table), BLOCK)
    tokens = sum(query_lens)
    gen = torch.Generator().manual_seed(5)
    x, q, k, v = (
        torch.randn(tokens, *shape, generator=gen)
        for shape in ((HIDDEN,), (HEADS, DIM), (KV, DIM), (KV, DIM))
    )
    if meta.num_decode_rows:
        runtime.prefetch(state, x, meta)  # layer L-1's pre-hook
    reads = []
    decode_read = runtime.decode_read

    def record(*args: Any) -> Any:
        reads.append(decode_read(*args))
        return reads[-1]

    runtime.decode_read = record  # type: ignore[method-assign]
    impl = _impl()
    impl.do_kv_cache_update(layer, k, v, cache, meta.slot_mapping)
    out = torch.zeros_like(q)
    impl.forward(layer, q, k, v, cache, meta, out)
    nd = meta.num_decode_rows
    assert len(kernel.calls) == (nd > 0) + (meta.prefill_gather is not None)
    want = paged_attention(q, cache, meta.query_start_loc, meta.seq_lens, world.table)
    if nd:
        # Decode rows: the reference over exactly the blocks they read.
        read, _ = reads[0]
        plan = read.plan
        want[:nd] = selected_attention(q[:nd], cache, plan)
        if options.get("policy") == "dense":
            counts = num_blocks_of(torch.tensor(seq_lens[:nd]), BLOCK)
            assert plan.counts.tolist() == counts.tolist()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not runtime.swap._inflight


@pytest.mark.gpu
def test_flash_attention_over_staging_matches_the_paged_cache() -> None:
    """vLLM's own FlashAttention over a staging buffer and rewritten
    metadata equals it over the paged cache with the same blocks (every
    block, then a sparse choice given as a compacted table of cache ids)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backends.fa_utils import (
        is_flash_attn_varlen_func_available,
    )
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheTensor,
        compute_layout_strides,
        create_kv_cache_views,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from vllm_infinigen.engine.cuda_copy import plan_fixed_capacity
    from vllm_infinigen.engine.cuda_runtime import whole_plan
    from vllm_infinigen.engine.placement import plan_in_place
    from vllm_infinigen.method.selection import SelectionPolicy, select_blocks

    if not is_flash_attn_varlen_func_available():
        pytest.skip("needs the CUDA build of vLLM (vllm_flash_attn)")
    block, kv, heads, dim, blocks = 16, 2, 8, 64, 64
    spec = FullAttentionSpec(
        block_size=block, num_kv_heads=kv, head_size=dim, dtype=torch.bfloat16
    )
    layout = KVCacheLayout.LBNHC
    layer_stride, block_stride, *_ = compute_layout_strides(spec, blocks, 1, layout)
    raw = torch.zeros(layer_stride, dtype=torch.int8, device="cuda")
    tensor = KVCacheTensor(layer_stride, ["l"], layer_stride, block_stride)
    (cache,) = create_kv_cache_views(raw, spec, blocks, layout, tensor)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache.copy_(torch.randn(cache.shape, generator=gen, device="cuda"))
    seq_lens = torch.tensor([37, 300, 5], dtype=torch.int32, device="cuda")
    table = torch.randperm(blocks - 1, device="cuda")[:60].view(3, 20) + 1
    table = table.to(torch.int32)
    query = torch.randn(3, heads, dim, generator=gen, device="cuda").bfloat16()
    meta = FlashAttentionMetadata(
        num_actual_tokens=3,
        max_query_len=1,
        query_start_loc=torch.arange(4, dtype=torch.int32, device="cuda"),
        max_seq_len=300,
        seq_lens=seq_lens,
        block_table=table,
        slot_mapping=torch.zeros(3, dtype=torch.int64, device="cuda"),
    )
    ones = torch.ones(1, device="cuda")
    layer = SimpleNamespace(_q_scale=ones, _k_scale=ones, _v_scale=ones)
    with set_current_vllm_config(VllmConfig()):
        impl = FlashAttentionImpl(heads, dim, dim**-0.5, kv, None, None, "auto")

    def attention(cache_: torch.Tensor, meta_: Any) -> torch.Tensor:
        out = torch.empty_like(query)
        return impl.forward(layer, query, query, query, cache_, meta_, out)  # type: ignore[arg-type]

    scores = torch.randn(3, kv, 20, generator=gen, device="cuda")
    sparse = plan_in_place(
        select_blocks(scores, seq_lens, block, SelectionPolicy(budget_fraction=0.3)),
        table,
        seq_lens,
        block,
    )
    for plan, reference in (
        (whole_plan(table, seq_lens, 300, block), meta),
        (
            sparse,
            decode_metadata(
                meta, 3, sparse.compact_block_table, sparse.sparse_seq_lens, 300
            ),
        ),
    ):
        width = plan.host_ids.shape[1]
        fixed = plan_fixed_capacity(plan.host_ids, plan.counts, width)
        rows = as_block_rows(cache)
        staging = torch.zeros(fixed.num_slots, rows.shape[1], dtype=torch.uint8)
        staging = staging.cuda()
        gather_blocks(rows, fixed.src_ids, staging)
        sub = decode_metadata(
            meta, 3, fixed.compact_block_table, plan.sparse_seq_lens, width * block
        )
        got = attention(staging_kv_view(staging, cache), sub)
        torch.testing.assert_close(got, attention(cache, reference))
