"""Run one offline vLLM engine (``vllm.LLM``) and dump greedy token ids as JSON.

Tests start this in a subprocess per engine so that every engine gets a fresh
process, as a user's script would:

    python tests/engine/generate_script.py --model DIR --backend infinigen \\
        --prompts prompts.json --out result.json [--option k=v ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="default", help="'default' or a name")
    parser.add_argument("--prompts", required=True, help="JSON list of strings")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument(
        "--dtype", default="float32", help="float32: no native bf16 on AVX2 CPUs"
    )
    parser.add_argument(
        "--block-size", type=int, default=32, help="same for every engine compared"
    )
    parser.add_argument("--infinigen", default="{}", help="JSON infinigen options")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="vLLM's compilation as users get it (else --enforce-eager)",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="include vLLM's counters (preemptions, ...) in the JSON",
    )
    parser.add_argument(
        "--stats", action="store_true", help="include the INFINIGEN counters"
    )
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    prompts = json.loads(Path(args.prompts).read_text())
    kwargs: dict[str, object] = {}
    if args.backend != "default":
        kwargs["attention_backend"] = args.backend
        kwargs["additional_config"] = {"infinigen": json.loads(args.infinigen)}
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=True,
        enable_prefix_caching=False,
        enforce_eager=not args.compile,
        block_size=args.block_size,
        seed=0,
        tensor_parallel_size=args.tensor_parallel_size,
        disable_log_stats=not args.metrics,
        **kwargs,  # type: ignore[arg-type]
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    result = {
        "prompt_token_counts": [len(o.prompt_token_ids or []) for o in outputs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
        "seconds": elapsed,
    }
    if args.metrics:
        result["metrics"] = {
            m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")
        }
    if args.stats:
        # One result per worker (tensor-parallel rank).
        ranks = llm.collective_rpc("infinigen_stats")
        result["stats"] = ranks[0]
        result["rank_stats"] = ranks
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
