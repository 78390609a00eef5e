"""Decode one probe request per policy, optionally right after another request,
in one INFINIGEN engine, and dump what the probe did.

Per policy: reconfigure, generate the ``before`` request (if any) to its end
so that its blocks go back to vLLM's free list, reset the counters (and with
them the recall-sampling schedule), then decode the probe greedily and record
its tokens and the counters of its steps. Prefix caching is off, so with a
pool smaller than both requests together the probe is written into blocks
that the ``before`` request has just freed.

    python tests/engine/reuse_script.py --model DIR --prompts p.json --out r.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--prompts", required=True, help='JSON {"before": str | null, "probe": str}'
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--policies", nargs="+", required=True)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--pool-gib", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--before-tokens", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=768)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    prompts = json.loads(Path(args.prompts).read_text())
    options: dict[str, Any] = {
        "budget": args.budget,
        "policy": args.policies[0],
        "min_blocks": 2,
        # Select at every length, and sample the recall at every step.
        "sparse_min_tokens": 0,
        "recall_sample_rate": 1.0,
    }
    if args.pool_gib is not None:
        options["host_pool_gib"] = args.pool_gib
    llm = LLM(
        model=args.model,
        dtype="float32",
        max_model_len=args.max_model_len,
        max_num_batched_tokens=256,
        enable_prefix_caching=False,
        enforce_eager=True,
        block_size=32,
        seed=0,
        attention_backend="INFINIGEN",
        additional_config={"infinigen": options},
    )
    llm.collective_rpc("infinigen_track", args=(list(args.policies),))
    tokenizer = llm.get_tokenizer()
    before = prompts.get("before")
    result: dict[str, Any] = {
        "num_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "prompt_tokens": {
            "probe": len(tokenizer.encode(prompts["probe"])),
            "before": len(tokenizer.encode(before)) if before else 0,
        },
        "runs": {},
    }
    probe_params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    before_params = SamplingParams(temperature=0.0, max_tokens=args.before_tokens)
    for policy in args.policies:
        llm.collective_rpc("infinigen_configure", args=({"policy": policy},))
        if before:
            llm.generate([before], before_params, use_tqdm=False)
        llm.collective_rpc("infinigen_reset_stats")
        output = llm.generate([prompts["probe"]], probe_params, use_tqdm=False)[0]
        stats = llm.collective_rpc("infinigen_stats")[0]
        result["runs"][policy] = {
            "token_ids": list(output.outputs[0].token_ids),
            "text": output.outputs[0].text,
            "recall": stats["steps"]["recall"],
            "sparse_steps": stats["steps"]["sparse_steps"],
            "blocks_selected": {
                index: layer["blocks_selected"]
                for index, layer in stats["layers"].items()
            },
            "blocks_total": stats["total"]["blocks_total"],
        }
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
