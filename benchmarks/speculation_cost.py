"""Where one sparse layer's speculation time goes, stage by stage.

Times the stages ``InfiniGenRuntime.speculate_and_swap`` runs for one layer
and one decode step (speculated query, block scores, selection, staging plan,
counters, block copy into staging) on Qwen2.5-Coder-0.5B's shapes (14 query
heads, 2 KV heads, head_dim 64, hidden 896, 20 partial channels) with random
tensors, single-threaded like vLLM's CPU worker, next to one pass of reading
the layer's whole K/V of the batch (what dense attention must at least do).
Writes ``benchmarks/results/speculation_cost.json``:

    python benchmarks/speculation_cost.py
    python benchmarks/speculation_cost.py --contexts 4096 16384 --batches 1 4
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vllm_infinigen.engine.copier import BlockCopier
from vllm_infinigen.engine.placement import plan_staging
from vllm_infinigen.method.counters import count_selected_blocks
from vllm_infinigen.method.rotary import NeoxRotary
from vllm_infinigen.method.scoring import block_scores
from vllm_infinigen.method.selection import SelectionPolicy, select_blocks
from vllm_infinigen.method.skew import LayerSkew
from vllm_infinigen.method.speculator import LayerSpeculator

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, D_PARTIAL = 896, 14, 2, 64, 20


def _time_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def measure(context: int, batch: int, block_size: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(context + batch)
    basis, _ = torch.linalg.qr(torch.randn(KV_HEADS, HEAD_DIM, HEAD_DIM, generator=gen))
    channels = torch.arange(D_PARTIAL).repeat(KV_HEADS, 1)
    speculator = LayerSpeculator.build(
        LayerSkew(basis, channels),
        q_weight=torch.randn(HEADS * HEAD_DIM, HIDDEN, generator=gen),
        q_bias=torch.randn(HEADS * HEAD_DIM, generator=gen),
        num_heads=HEADS,
        rope=NeoxRotary(HEAD_DIM, base=1e6),
    )
    blocks = (context + block_size - 1) // block_size
    num_blocks = blocks * batch + 8
    partial = torch.randn(num_blocks, block_size, KV_HEADS, D_PARTIAL, generator=gen)
    # vLLM's CPU cache layout: [num_blocks, kv_heads, block_size, 2 * head_dim].
    host = torch.randn(num_blocks, KV_HEADS, block_size, 2 * HEAD_DIM, generator=gen)
    table = torch.randperm(num_blocks, generator=gen)[: blocks * batch]
    table = table.view(batch, blocks).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    x = torch.randn(batch, HIDDEN, generator=gen)
    positions = (seq_lens - 1).long()
    policy = SelectionPolicy()
    counters = torch.zeros(num_blocks, dtype=torch.int32)
    copier = BlockCopier("sync")

    query = speculator.speculate(x, positions)
    scores = block_scores(query, partial, table, seq_lens, HEAD_DIM**-0.5)
    selection = select_blocks(scores, seq_lens, block_size, policy)
    plan = plan_staging(selection, table, seq_lens, block_size)
    stages = {
        "query_ms": _time_ms(lambda: speculator.speculate(x, positions), repeats),
        "scores_ms": _time_ms(
            lambda: block_scores(query, partial, table, seq_lens, HEAD_DIM**-0.5),
            repeats,
        ),
        "select_ms": _time_ms(
            lambda: select_blocks(scores, seq_lens, block_size, policy), repeats
        ),
        "plan_ms": _time_ms(
            lambda: plan_staging(selection, table, seq_lens, block_size), repeats
        ),
        "counters_ms": _time_ms(
            lambda: count_selected_blocks(counters, table, selection), repeats
        ),
        "copy_ms": _time_ms(
            lambda: copier.submit(0, host, plan.src_block_ids).wait(), repeats
        ),
    }
    copier.shutdown()
    speculation = sum(v for k, v in stages.items() if k != "copy_ms")
    used = host.index_select(0, table.reshape(-1).long())
    read_all = _time_ms(lambda: used.sum(), repeats)
    return {
        "context": context,
        "batch": batch,
        "block_size": block_size,
        **stages,
        "speculation_ms": speculation,
        "selected_fraction": plan.total_blocks / max(int(plan.dense_counts.sum()), 1),
        "read_full_kv_ms": read_all,
        "speculation_over_full_read": speculation / read_all,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "speculation_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            row = measure(context, batch, args.block_size, args.repeats)
            rows.append(row)
            print(
                f"{context:>6} x{batch}: speculation {row['speculation_ms']:.2f} ms "
                f"(scores {row['scores_ms']:.2f}), copy {row['copy_ms']:.2f} ms, "
                f"full K/V read {row['read_full_kv_ms']:.2f} ms",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": f"{platform.machine()} {args.threads} thread(s)",
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
