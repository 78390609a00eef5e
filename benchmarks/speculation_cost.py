"""What one sparse layer's decode costs on CPU, stage by stage, against
vLLM's own CPU attention kernel.

Times, per layer and decode step on Qwen2.5-Coder-0.5B's shapes (14 query
heads, 2 KV heads, head_dim 64, hidden 896, 20 partial channels, 32-token
blocks, float32), single-threaded like vLLM's CPU worker:

- InfiniGen's selection stages: speculated query, the residual block term
  (``residual_block_bias``: the query's residual channels against each
  block's residual sum), block scores (the fused
  CPU scorer the runtime uses, ``engine/cpu_scoring.py``; the torch ops of
  ``method/scoring.py`` with a reused workspace are timed next to it),
  selection, in-place plan, counters;
- the staging copy of the selected blocks (the GPU-shaped placement), and
  its GB/s;
- vLLM's CPU kernel (``cpu_attention_with_kv_cache``) over every block, and
  over the selected 20% through a compacted block table (in place).

Every stage cycles through ``--layers`` distinct layers' tensors, as a decode
step does, so their data is not left in the CPU cache by the previous call.
From the per-token costs it fits ``selection ~ a + b * tokens`` and
``kernel ~ k * tokens`` and prints the decode context (tokens of the whole
batch) above which reading ``--budget`` of the blocks pays for the selection:
the source of the CPU default of ``sparse_min_tokens``. Writes
``benchmarks/results/speculation_cost.json``::

    python benchmarks/speculation_cost.py
    python benchmarks/speculation_cost.py --contexts 2048 16384 --batches 1 4
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from workloads import cpu_model

from vllm_infinigen.engine.copier import BlockCopier
from vllm_infinigen.engine.cost_probe import CPUKernel
from vllm_infinigen.engine.cpu_scoring import load_block_scorer
from vllm_infinigen.engine.placement import plan_in_place, plan_staging
from vllm_infinigen.method.counters import count_selected_blocks
from vllm_infinigen.method.quant4 import pack_int4
from vllm_infinigen.method.rotary import NeoxRotary
from vllm_infinigen.method.scoring import Workspace, block_scores, residual_block_bias
from vllm_infinigen.method.selection import SelectionPolicy, select_blocks
from vllm_infinigen.method.skew import LayerSkew
from vllm_infinigen.method.speculator import LayerSpeculator

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, D_PARTIAL = 896, 14, 2, 64, 20


def _time_ms(fn: Callable[[int], Any], layers: int, repeats: int) -> float:
    """Mean ms of ``fn(layer)`` over ``repeats`` sweeps of every layer."""
    for layer in range(layers):
        fn(layer)
    start = time.perf_counter()
    for _ in range(repeats):
        for layer in range(layers):
            fn(layer)
    return (time.perf_counter() - start) / (repeats * layers) * 1e3


def measure(args: argparse.Namespace, context: int, batch: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(context + batch)
    block_size, layers, repeats = args.block_size, args.layers, args.repeats
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
    shape = (num_blocks, block_size, KV_HEADS, D_PARTIAL)
    partial = [torch.randn(shape, generator=gen) for _ in range(layers)]
    residual_shape = (num_blocks, KV_HEADS, speculator.d_residual)
    sums = [torch.randn(residual_shape, generator=gen) for _ in range(layers)]
    # vLLM's CPU cache layout: [num_blocks, kv_heads, block_size, 2 * head_dim].
    host_shape = (num_blocks, KV_HEADS, block_size, 2 * HEAD_DIM)
    host = [torch.randn(host_shape, generator=gen) for _ in range(layers)]
    table = torch.randperm(num_blocks, generator=gen)[: blocks * batch]
    table = table.view(batch, blocks).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    x = torch.randn(batch, HIDDEN, generator=gen)
    positions = (seq_lens - 1).long()
    policy = SelectionPolicy(budget_fraction=args.budget)
    counters = torch.zeros(num_blocks, dtype=torch.long)
    space = Workspace()
    scale = HEAD_DIM**-0.5

    whole = speculator.speculate_full(x, positions)
    assert whole is not None
    query = speculator.partial_query(whole)
    q_residual = speculator.residual_query(whole)

    def residual(i: int) -> torch.Tensor:
        return residual_block_bias(
            q_residual, sums[i], table, seq_lens, block_size, scale
        )

    bias = residual(0)
    fused = load_block_scorer(print)
    scores = block_scores(
        query, partial[0], table, seq_lens, scale, workspace=space, block_bias=bias
    )
    if fused is not None:
        torch.testing.assert_close(
            fused(query, partial[0], table, seq_lens, scale, block_bias=bias),
            scores,
            rtol=1e-4,
            atol=1e-4,
        )
    selection = select_blocks(scores, seq_lens, block_size, policy)
    plan = plan_in_place(selection, table, seq_lens, block_size)
    staged = plan_staging(selection, table, seq_lens, block_size)
    stages = {
        "query_ms": _time_ms(lambda i: speculator.speculate(x, positions), 1, repeats),
        "residual_ms": _time_ms(residual, layers, repeats),
        "scores_ms": _time_ms(
            lambda i: (fused or block_scores)(
                query, partial[i], table, seq_lens, scale, block_bias=bias
            ),
            layers,
            repeats,
        ),
        "select_ms": _time_ms(
            lambda i: select_blocks(scores, seq_lens, block_size, policy), 1, repeats
        ),
        "plan_ms": _time_ms(
            lambda i: plan_in_place(selection, table, seq_lens, block_size), 1, repeats
        ),
        "counters_ms": _time_ms(
            lambda i: count_selected_blocks(counters, table, selection), 1, repeats
        ),
    }
    selection_ms = sum(stages.values())
    # The same scores from bfloat16 partial keys (option partial_dtype): half
    # the bytes read.
    half = [p.to(torch.bfloat16) for p in partial]
    scores_bf16_ms = _time_ms(
        lambda i: (fused or block_scores)(query, half[i], table, seq_lens, scale),
        layers,
        repeats,
    )
    torch_scores_ms = _time_ms(
        lambda i: block_scores(
            query, partial[i], table, seq_lens, scale, workspace=space
        ),
        layers,
        repeats,
    )
    # Every key channel packed at 4 bits (partial_ratio 1.0, partial_dtype
    # int4): no residual term, the whole query scored.
    whole_shape = (num_blocks, block_size, KV_HEADS, HEAD_DIM)
    packed = [pack_int4(torch.randn(whole_shape, generator=gen)) for _ in range(layers)]
    scores_int4_whole_ms = _time_ms(
        lambda i: (fused or block_scores)(whole, packed[i], table, seq_lens, scale),
        layers,
        repeats,
    )
    # Every key channel in bfloat16 (partial_ratio 1.0, partial_dtype
    # bfloat16): exact keys at half their float32 bytes.
    whole_bf16 = [
        torch.randn(whole_shape, generator=gen).to(torch.bfloat16)
        for _ in range(layers)
    ]
    scores_bf16_whole_ms = _time_ms(
        lambda i: (fused or block_scores)(whole, whole_bf16[i], table, seq_lens, scale),
        layers,
        repeats,
    )
    copier = BlockCopier("sync")
    copy_ms = _time_ms(
        lambda i: copier.submit(i % 2, host[i], staged.src_block_ids).wait(),
        layers,
        repeats,
    )
    copier.shutdown()
    copied = staged.total_blocks * host[0][0].numel() * 4
    kernel = CPUKernel(HEADS, KV_HEADS, HEAD_DIM, block_size, torch.float32, batch)
    dense_ms = _time_ms(
        lambda i: kernel(host[i], table, seq_lens, kernel.metadata(seq_lens)),
        layers,
        repeats,
    )
    sparse_table = plan.compact_block_table.to(torch.int32)
    sparse_lens = plan.sparse_seq_lens.to(torch.int32)
    sparse_ms = _time_ms(
        lambda i: kernel(
            host[i], sparse_table, sparse_lens, kernel.metadata(sparse_lens)
        ),
        layers,
        repeats,
    )
    return {
        "context": context,
        "batch": batch,
        "tokens": context * batch,
        **stages,
        "selection_ms": selection_ms,
        "fused_scorer": fused is not None,
        "scores_bf16_ms": scores_bf16_ms,
        "scores_int4_whole_ms": scores_int4_whole_ms,
        "scores_bf16_whole_ms": scores_bf16_whole_ms,
        "partial_mb": sum(p.numel() for p in partial) * 4 / layers / 1e6,
        "scores_torch_ops_ms": torch_scores_ms,
        "selected_fraction": staged.total_blocks / max(blocks * batch, 1),
        "copy_ms": copy_ms,
        "copy_gb_s": copied / max(copy_ms, 1e-9) / 1e6,
        "kernel_dense_ms": dense_ms,
        "kernel_selected_ms": sparse_ms,
        "selection_over_kernel_saved": selection_ms / max(dense_ms - sparse_ms, 1e-9),
    }


def fit(rows: list[dict[str, Any]], budget: float) -> dict[str, float]:
    """Least-squares ``selection ~ a + b * tokens``, ``kernel ~ k * tokens``
    and the token count above which the saved kernel time pays for selection."""
    tokens = torch.tensor([float(r["tokens"]) for r in rows], dtype=torch.float64)
    selection = torch.tensor([r["selection_ms"] for r in rows], dtype=torch.float64)
    kernel = torch.tensor([r["kernel_dense_ms"] for r in rows], dtype=torch.float64)
    design = torch.stack([torch.ones_like(tokens), tokens], dim=1)
    a, b = torch.linalg.lstsq(design, selection[:, None]).solution[:, 0].tolist()
    k = float((tokens * kernel).sum() / (tokens * tokens).sum())
    saved = k * (1.0 - budget) - b  # ms per token the sparse step saves
    return {
        "selection_fixed_ms": a,
        "selection_us_per_token": b * 1e3,
        "kernel_us_per_token": k * 1e3,
        "break_even_tokens": a / saved if saved > 0 else float("inf"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[2048, 4096, 8192, 16384]
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--layers", type=int, default=8, help="distinct layers cycled")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "speculation_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            row = measure(args, context, batch)
            rows.append(row)
            print(
                f"{context:>6} x{batch}: selection {row['selection_ms']:.2f} ms "
                f"(scores {row['scores_ms']:.2f}, bf16 partial keys "
                f"{row['scores_bf16_ms']:.2f}, whole keys at 4 bits "
                f"{row['scores_int4_whole_ms']:.2f}, whole keys in bfloat16 "
                f"{row['scores_bf16_whole_ms']:.2f}, torch ops "
                f"{row['scores_torch_ops_ms']:.2f}); kernel dense "
                f"{row['kernel_dense_ms']:.2f} ms, selected "
                f"{row['kernel_selected_ms']:.2f} ms; staging copy "
                f"{row['copy_ms']:.2f} ms ({row['copy_gb_s']:.1f} GB/s)",
                flush=True,
            )
    model = fit(rows, args.budget)
    print(
        f"selection ~ {model['selection_fixed_ms']:.2f} ms + "
        f"{model['selection_us_per_token']:.3f} us/token; kernel "
        f"{model['kernel_us_per_token']:.3f} us/token; reading {args.budget:.0%} "
        f"pays from {model['break_even_tokens']:.0f} tokens per step"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/speculation_cost.py "
                + " ".join(
                    f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"  # noqa: E501
                    for k, v in vars(args).items()
                    if k != "out"
                ),
                "machine": f"{cpu_model()}, {args.threads} thread(s)",
                "torch": torch.__version__,
                "rows": rows,
                "model": model,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
