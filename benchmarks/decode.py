"""Decode speed and bytes moved: dense vLLM vs INFINIGEN on the same prompts.

One run measures every configuration, each engine in its own fresh process
(``--engine`` is the child mode), and writes ``benchmarks/results/decode.json``
plus ``decode.png``:

    python benchmarks/decode.py --contexts 4096 8192 --batches 1 4
    python benchmarks/decode.py --quick

Per (context, batch) and engine it reports decode tokens/s (from vLLM's own
per-request timestamps, after a warm-up request has put the prompt's KV in
the prefix cache so the timed request decodes instead of prefilling), bytes
read from the KV cache per decode step (dense: every block of every layer;
INFINIGEN: its swapped-in blocks plus its dense layers), and the share of the
step time spent in speculation. Speed ratios are taken within the run.
"""

from __future__ import annotations

import argparse
import json
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


def long_prompt(tokens_wanted: int, seed: int) -> str:
    """Python standard-library source text (read in place), about
    ``tokens_wanted`` tokens, different per ``seed``."""
    from vllm_infinigen.method.calibration_text import stdlib_dir

    files = sorted(stdlib_dir().glob("*.py"))
    text, i = "", seed * 7
    while len(text) < tokens_wanted * 3.2:
        text += files[i % len(files)].read_text(encoding="utf-8", errors="replace")
        i += 1
    return text


def run_child(args: argparse.Namespace) -> None:
    """One engine, one configuration: print a JSON line of measurements."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    model = args.model
    tok = AutoTokenizer.from_pretrained(model)
    prompts = []
    for b in range(args.batch):
        ids = tok(long_prompt(args.context, b))["input_ids"][: args.context]
        prompts.append({"prompt_token_ids": ids})
    kwargs: dict[str, Any] = {}
    if args.engine == "infinigen":
        kwargs["attention_backend"] = "infinigen"
        kwargs["additional_config"] = {"infinigen": json.loads(args.options)}
    llm = LLM(
        model=model,
        dtype=args.dtype,
        max_model_len=args.context + args.decode_tokens + 16,
        max_num_batched_tokens=2048,
        enable_prefix_caching=True,
        enforce_eager=True,
        disable_log_stats=False,
        **kwargs,
    )
    # Warm-up: prefill every prompt once (its blocks stay in the prefix cache).
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0))
    if args.engine == "infinigen":
        llm.collective_rpc("infinigen_reset_stats")
    start = time.perf_counter()
    outs = llm.generate(
        prompts,
        SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True),
    )
    wall = time.perf_counter() - start
    first = max(o.metrics.first_token_ts for o in outs)  # type: ignore[union-attr]
    last = max(o.metrics.last_token_ts for o in outs)  # type: ignore[union-attr]
    decoded = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
    result: dict[str, Any] = {
        "engine": args.engine,
        "context": args.context,
        "batch": args.batch,
        "decode_s": last - first,
        "decode_tokens": decoded,
        "decode_tok_s": decoded / max(last - first, 1e-9),
        "wall_s": wall,
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
    }
    if args.engine == "infinigen":
        result["stats"] = llm.collective_rpc("infinigen_stats")[0]
    print("RESULT " + json.dumps(result), flush=True)


def summarise(dense: dict[str, Any], ours: dict[str, Any], model: str) -> dict:
    """Ratios of one configuration, KV bytes counted in whole blocks.

    Per decode step, dense attention reads every block of every request in
    every layer; INFINIGEN reads its selected blocks in sparse layers and
    every block in its dense layers (layer 0, ``dense_layers``).
    """
    stats = ours["stats"]
    total = stats["total"]
    layers = stats["layers"]
    config = json.loads((Path(model) / "config.json").read_text())
    num_layers = config["num_hidden_layers"]
    sparse_layers = len(layers)
    steps = max((layer["steps"] for layer in layers.values()), default=0)
    block_bytes = stats["block_bytes"]
    blocks_per_layer_step = total["blocks_total"] / max(steps * sparse_layers, 1)
    dense_bytes = blocks_per_layer_step * block_bytes * num_layers
    ours_bytes = (
        total["blocks_selected"] / max(steps, 1) * block_bytes
        + (num_layers - sparse_layers) * blocks_per_layer_step * block_bytes
    )
    agree = [
        prefix_agreement(a, b)
        for a, b in zip(dense["token_ids"], ours["token_ids"], strict=True)
    ]
    return {
        "context": ours["context"],
        "batch": ours["batch"],
        "dense_tok_s": dense["decode_tok_s"],
        "infinigen_tok_s": ours["decode_tok_s"],
        "speedup": ours["decode_tok_s"] / dense["decode_tok_s"],
        "dense_kv_bytes_per_step": dense_bytes,
        "infinigen_kv_bytes_per_step": ours_bytes,
        "bytes_ratio": ours_bytes / max(dense_bytes, 1),
        "swapped_bytes_per_token": total["bytes_swapped"]
        / max(ours["decode_tokens"], 1),
        "selection_fraction": total["selection_fraction"],
        "speculation_share": total["speculation_s"] / max(ours["decode_s"], 1e-9),
        "swap_share": total["swap_s"] / max(ours["decode_s"], 1e-9),
        "attention_share": total["attention_s"] / max(ours["decode_s"], 1e-9),
        "greedy_prefix_agreement": sum(agree) / len(agree),
    }


def launch(args: argparse.Namespace, engine: str, context: int, batch: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--engine",
        engine,
        "--model",
        args.model,
        "--context",
        str(context),
        "--batch",
        str(batch),
        "--decode-tokens",
        str(args.decode_tokens),
        "--options",
        args.options,
        "--dtype",
        args.dtype,
    ]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "6")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise RuntimeError(
        f"{engine} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['context'] // 1024}K x{r['batch']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(rows))
    axes[0].bar(
        [i - 0.2 for i in x], [r["dense_tok_s"] for r in rows], 0.4, label="dense"
    )
    axes[0].bar(
        [i + 0.2 for i in x],
        [r["infinigen_tok_s"] for r in rows],
        0.4,
        label="INFINIGEN",
    )
    axes[0].set_xticks(list(x), labels)
    axes[0].set_ylabel("decode tokens/s")
    axes[0].legend()
    axes[1].bar(list(x), [r["bytes_ratio"] for r in rows])
    axes[1].set_xticks(list(x), labels)
    axes[1].set_ylabel("KV bytes read per step / dense")
    fig.suptitle("Decode: dense vLLM vs INFINIGEN (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=("dense", "infinigen"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--options", default="{}", help="JSON infinigen options")
    parser.add_argument("--dtype", default="float32", help="float32 on AVX2 CPUs")
    parser.add_argument("--quick", action="store_true", help="2K context, batch 1")
    parser.add_argument("--out", default=str(RESULTS / "decode.json"))
    args = parser.parse_args()
    if args.model is None:
        from vllm_infinigen.models import DEFAULT_MODEL, build_model

        args.model = str(build_model(DEFAULT_MODEL))
    if args.engine:
        run_child(args)
        return
    if args.quick:
        args.contexts, args.batches, args.decode_tokens = [2048], [1], 16
    rows, raw = [], []
    for context in args.contexts:
        for batch in args.batches:
            dense = launch(args, "dense", context, batch)
            ours = launch(args, "infinigen", context, batch)
            raw += [dense, ours]
            row = summarise(dense, ours, args.model)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in raw:
        r.pop("token_ids", None)
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:]),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "dtype": args.dtype,
                "model": args.model,
                "options": json.loads(args.options),
                "rows": rows,
                "runs": raw,
            },
            indent=2,
        )
    )
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
