"""The decode hot path never syncs with the host: the method's functions
(speculate, score, select, count) and the engine's per-layer path (the
runtime preparing a layer's read)."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_runtime import World
from vllm_infinigen.method.counters import count_selected_blocks
from vllm_infinigen.method.quant4 import pack_int4
from vllm_infinigen.method.rotary import NeoxRotary
from vllm_infinigen.method.scoring import BlockScoreRule, block_scores
from vllm_infinigen.method.selection import (
    HeadReduction,
    SelectionPolicy,
    select_blocks,
    selected_block_ids,
)
from vllm_infinigen.method.skew import fit_layer_skew
from vllm_infinigen.method.speculator import LayerSpeculator


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rule", list(BlockScoreRule))
@pytest.mark.parametrize("reduction", list(HeadReduction))
def test_decode_path_has_no_host_sync(
    rule: BlockScoreRule, reduction: HeadReduction, packed: bool
) -> None:
    device = torch.device("cuda")
    heads, kv, dim, hidden, block_size = 8, 2, 64, 128, 16
    layer = fit_layer_skew(
        torch.randn(256, heads, dim), torch.randn(256, kv, dim), partial_ratio=0.3
    )
    w_q = torch.randn(heads * dim, hidden, device=device)
    b_q = torch.randn(heads * dim, device=device)
    on_device = type(layer)(
        skew=layer.skew.to(device), channels=layer.channels.to(device)
    )
    spec = LayerSpeculator.build(
        on_device, q_weight=w_q, q_bias=b_q, num_heads=heads, rope=NeoxRotary(dim)
    )
    cache = torch.randn(64, block_size, kv, layer.d_partial, device=device)
    if packed:  # partial keys at 4 bits (option partial_dtype: int4)
        cache = pack_int4(cache)
    table = torch.randperm(64, device=device)[:40].view(4, 10).to(torch.int32)
    seq_lens = torch.tensor([1, 17, 100, 160], device=device)
    x = torch.randn(4, hidden, device=device)
    counters = torch.zeros(64, dtype=torch.long, device=device)
    policy = SelectionPolicy(head_reduction=reduction, score_rule=rule, max_blocks=6)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q = spec.speculate(x, seq_lens - 1)
        scores = block_scores(q, cache, table, seq_lens, dim**-0.5, rule)
        selection = select_blocks(scores, seq_lens, block_size, policy)
        ids = selected_block_ids(table, selection)
        count_selected_blocks(counters, table, selection)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids.shape == (4, 6)
    assert int(counters.sum()) == int(selection.counts.sum())


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("policy", "partial_dtype"),
    [
        ("infinigen", "auto"),
        ("infinigen", "int4"),
        ("streaming", "auto"),
        ("h2o", "auto"),
    ],
)
def test_layer_path_has_no_host_sync(policy: str, partial_dtype: str) -> None:
    """The per-layer decode path (score, select, count, plan in place) never
    waits for the device."""
    world = World(
        [61, 100, 7],
        device="cuda",
        budget=0.3,
        min_blocks=2,
        policy=policy,
        partial_dtype=partial_dtype,
    )
    layer = world.layer(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        world.prepare(1)
        read = world.runtime.take(layer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert read is not None
    assert read.plan.compact_block_table.device.type == "cuda"
    assert int(layer.tallies[1]) == int(read.plan.counts.sum()) > 0
