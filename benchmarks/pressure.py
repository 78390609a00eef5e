"""Greedy outputs under KV-pool pressure against the same batch with room.

When running requests outgrow vLLM's KV pool, vLLM preempts some, frees
their blocks and later recomputes them: the prompt and the tokens generated
so far are prefilled again, and decode resumes. The recomputed KV comes
from a prefill, not from the decode steps that first wrote it, so even dense
vLLM's greedy continuations may part from those of an unpressured run. This
benchmark measures how far, for dense vLLM and for INFINIGEN, each engine in
its own fresh process (``--engine`` is the child mode):

    python benchmarks/pressure.py                  # dense and INFINIGEN
    python benchmarks/pressure.py --series dense infinigen infinigen_budget_1
    python benchmarks/pressure.py --quick          # 4 requests of 96 tokens

Per series (dense vLLM; INFINIGEN at its default budget, selecting at every
length; optionally INFINIGEN at budget 1.0, exact) one batch of
code-completion requests runs with a roomy pool and with a pool too small
for the batch's outputs (the same ``num_gpu_blocks_override`` for every
engine). It reports vLLM's preemption
count and, per request, the share of the roomy run's tokens that the
pressured run repeats before their first difference, with the same measure
between dense and each INFINIGEN series with room, for scale. Writes
``benchmarks/results/pressure.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vllm_infinigen.method.agreement import prefix_agreement

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODULES = (
    "textwrap",
    "argparse",
    "shlex",
    "fractions",
    "calendar",
    "difflib",
    "heapq",
    "bisect",
)
BLOCK_SIZE = 32

#: Series: name -> INFINIGEN options (None: vLLM's default backend).
SERIES: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "infinigen": {"sparse_min_tokens": 0},
    "infinigen_budget_1": {"budget": 1.0, "sparse_min_tokens": 0},
}


def code_prompts(count: int, chars: int) -> list[str]:
    """The first ``chars`` characters of standard-library modules' sources
    (read in place), one per request."""
    import importlib
    import inspect

    return [
        inspect.getsource(importlib.import_module(name))[:chars]
        for name in MODULES[:count]
    ]


def run_child(args: argparse.Namespace) -> None:
    """One engine: generate the batch, print a JSON line."""
    from vllm import LLM, SamplingParams

    options = json.loads(args.options)
    kwargs: dict[str, Any] = {}
    if options is not None:
        kwargs["attention_backend"] = "infinigen"
        kwargs["additional_config"] = {"infinigen": options}
    if args.blocks:
        kwargs["num_gpu_blocks_override"] = args.blocks
    llm = LLM(
        model=args.model,
        dtype="float32",
        max_model_len=args.max_model_len,
        max_num_batched_tokens=256,
        enable_prefix_caching=False,
        enforce_eager=True,
        block_size=BLOCK_SIZE,
        seed=0,
        disable_log_stats=False,
        **kwargs,
    )
    prompts = code_prompts(args.requests, args.prompt_chars)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    metrics = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    result: dict[str, Any] = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_tokens": [len(o.prompt_token_ids or []) for o in outputs],
        "preemptions": int(metrics.get("vllm:num_preemptions", 0)),
        "num_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "seconds": seconds,
    }
    if options is not None:
        total = llm.collective_rpc("infinigen_stats")[0]["total"]
        result["selection_fraction"] = total["selection_fraction"]
    print("RESULT " + json.dumps(result), flush=True)


def launch(args: argparse.Namespace, series: str, blocks: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--engine",
        "--model",
        args.model,
        "--options",
        json.dumps(SERIES[series]),
        "--blocks",
        str(blocks),
        "--requests",
        str(args.requests),
        "--prompt-chars",
        str(args.prompt_chars),
        "--tokens",
        str(args.tokens),
        "--max-model-len",
        str(args.max_model_len),
    ]
    # In-process engine core: the batch reaches the scheduler the same way
    # in every run, so the runs differ only by the pool.
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = dict(json.loads(line[len("RESULT ") :]))
            pool = blocks or "roomy"
            seconds = time.perf_counter() - started
            print(
                f"[{seconds:6.1f}s] {series} pool={pool}: "
                f"{out['preemptions']} preemptions",
                flush=True,
            )
            return out
    raise RuntimeError(
        f"{series} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    )


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """Per request and summarised: prefix agreement of ``other`` with
    ``reference``."""
    shares = [prefix_agreement(a, b) for a, b in zip(reference, other, strict=True)]
    return {
        "per_request": shares,
        "mean": sum(shares) / len(shares),
        "identical": sum(a == b for a, b in zip(reference, other, strict=True)),
        "requests": len(shares),
    }


def summarise(runs: dict[str, dict[str, Any]], series: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in series:
        roomy, tight = runs[f"{name}/roomy"], runs[f"{name}/tight"]
        out[name] = {
            "preemptions_roomy": roomy["preemptions"],
            "preemptions_tight": tight["preemptions"],
            "tight_vs_roomy": agreement(roomy["token_ids"], tight["token_ids"]),
            "selection_fraction": tight.get("selection_fraction"),
        }
        if name != "dense":
            out[name]["roomy_vs_dense_roomy"] = agreement(
                runs["dense/roomy"]["token_ids"], roomy["token_ids"]
            )
    return out


def print_table(summary: dict[str, Any]) -> None:
    print(
        "| series | preemptions (tight) | pressured vs roomy: mean agreement "
        "| identical |"
    )
    print("| --- | --- | --- | --- |")
    for name, row in summary.items():
        agree = row["tight_vs_roomy"]
        print(
            f"| {name} | {row['preemptions_tight']} | {agree['mean']:.3f} | "
            f"{agree['identical']} / {agree['requests']} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Arguments with the ``--quick`` or full defaults filled in; a value out
    of its range stops with a message naming the option."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--engine", action="store_true", help=argparse.SUPPRESS)
    add("--options", default="null", help=argparse.SUPPRESS)
    add("--blocks", type=int, default=0, help=argparse.SUPPRESS)
    add("--model", default=None, help="a model folder (default: Qwen2.5-Coder-0.5B)")
    add("--quick", action="store_true", help="4 requests of 96 tokens")
    add("--requests", type=int, default=None, help="batch size (4 | 8)")
    add("--prompt-chars", type=int, default=2000, help="characters per prompt")
    add("--tokens", type=int, default=None, help="generated per request (96 | 160)")
    add(
        "--pool-tokens",
        type=int,
        default=None,
        help="tokens of the small pool (default: a third of the batch's need)",
    )
    add("--max-model-len", type=int, default=768)
    add(
        "--series",
        nargs="+",
        default=["dense", "infinigen"],
        choices=list(SERIES),
        help="dense is required (the scale); infinigen_budget_1 is exact",
    )
    add("--out", default=None)
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 4 if args.quick else 8
    if args.tokens is None:
        args.tokens = 96 if args.quick else 160
    if not 1 <= args.requests <= len(MODULES):
        parser.error(f"--requests must be in 1..{len(MODULES)}, got {args.requests}")
    for option, value in (
        ("--tokens", args.tokens),
        ("--prompt-chars", args.prompt_chars),
    ):
        if value < 1:
            parser.error(f"{option} must be >= 1, got {value}")
    # vLLM refuses a pool that cannot hold one request at the longest.
    least = args.max_model_len + BLOCK_SIZE
    if args.pool_tokens is not None and args.pool_tokens < least:
        parser.error(
            f"--pool-tokens must be >= --max-model-len + {BLOCK_SIZE} = {least}, "
            f"got {args.pool_tokens}"
        )
    if "dense" not in args.series:
        parser.error("--series must include dense (the scale of comparison)")
    return args


def main() -> None:
    args = parse_args()
    if args.engine:
        run_child(args)
        return
    if args.model is None:
        from vllm_infinigen.models import DEFAULT_MODEL, build_model

        args.model = str(build_model(DEFAULT_MODEL))

    # A pool of about a third of what the batch needs at its end, never less
    # than one request at the longest (vLLM refuses a pool smaller); code is
    # about 3.5 characters per token.
    need = args.requests * (args.prompt_chars * 2 // 7 + args.tokens)
    pool_tokens = args.pool_tokens or max(need // 3, args.max_model_len + BLOCK_SIZE)
    tight = math.ceil(pool_tokens / BLOCK_SIZE)
    started = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    for name in args.series:
        runs[f"{name}/roomy"] = launch(args, name, 0)
        runs[f"{name}/tight"] = launch(args, name, tight)
    summary = summarise(runs, args.series)
    result = {
        "command": "python benchmarks/pressure.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "model": Path(args.model).name,
        "requests": args.requests,
        "prompt_chars": args.prompt_chars,
        "tokens": args.tokens,
        "tight_blocks": tight,
        "block_size": BLOCK_SIZE,
        "series_options": {name: SERIES[name] for name in args.series},
        "summary": summary,
        "runs": runs,
        "minutes": (time.perf_counter() - started) / 60,
    }
    out = (
        Path(args.out)
        if args.out
        else RESULTS / ("pressure_quick.json" if args.quick else "pressure.json")
    )
    out.write_text(json.dumps(result, indent=1))
    print_table(summary)
    print(f"{result['minutes']:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
