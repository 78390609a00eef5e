"""Run every selection policy on one INFINIGEN engine and dump what each did.

One offline engine (in-process engine core) started with one policy (H2O by
default: its start-up check reads the cache layout), all policies' device
metadata tracked from the start, the prompts prefilled once; then per policy:
reconfigure, reset the counters, decode greedily, record tokens and
counters. Also records the errors that bad run-time options raise.

    python tests/engine/policy_script.py --model DIR --prompts p.json --out r.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of strings")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument(
        "--start-policy", default="h2o", help="policy given at start-up"
    )
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_infinigen.engine.policies.registry import POLICIES

    prompts = json.loads(Path(args.prompts).read_text())
    llm = LLM(
        model=args.model,
        dtype="float32",
        max_model_len=args.max_model_len,
        max_num_batched_tokens=1024,
        enable_prefix_caching=True,
        enforce_eager=True,
        block_size=32,
        seed=0,
        attention_backend="INFINIGEN",
        additional_config={
            "infinigen": {
                "budget": args.budget,
                "policy": args.start_policy,
                # Select at every length: the prompt is shorter than the
                # CPU's default threshold for sparse steps.
                "sparse_min_tokens": 0,
            }
        },
    )
    tracked = llm.collective_rpc("infinigen_track", args=(list(POLICIES),))[0]
    # Prefill once; every policy below decodes from the prefix cache.
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    runs: dict[str, Any] = {}
    for policy in POLICIES:
        effective = llm.collective_rpc(
            "infinigen_configure", args=({"policy": policy, "budget": args.budget},)
        )[0]
        llm.collective_rpc("infinigen_reset_stats")
        outputs = llm.generate(prompts, params)
        runs[policy] = {
            "options": effective,
            "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
            "texts": [o.outputs[0].text for o in outputs],
            "stats": llm.collective_rpc("infinigen_stats")[0],
        }
    errors = {}
    for name, options in {
        "fixed": {"partial_ratio": 0.5},
        "policy": {"policy": "bogus"},
        "budget": {"budget": 1.5},
    }.items():
        try:
            llm.collective_rpc("infinigen_configure", args=(options,))
            errors[name] = ""
        except Exception as exc:  # noqa: BLE001 - the message is the result
            errors[name] = str(exc)
    result = {
        "tracked": tracked,
        "prompt_token_counts": [len(o.prompt_token_ids or []) for o in outputs],
        "runs": runs,
        "errors": errors,
    }
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
