"""Markdown tables of the accuracy and speed results (for docs/results.md).

Reads the JSON the benchmarks wrote and prints the tables, so every number
in the results document comes from a run's file:

    python benchmarks/report.py                  # full runs
    python benchmarks/report.py --quick          # the --quick runs
    python benchmarks/report.py benchmarks/results/speed_16k.json  # one file
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = [_row(head), _row(["---"] * len(head))]
    lines += [_row(r) for r in rows]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def accuracy_tables(data: dict[str, Any]) -> str:
    configs = data["configs"]
    groups = sorted({g for c in configs for g in c["perplexity"]})
    lengths = sorted({int(n) for c in configs for n in c["passkey_accuracy_by_length"]})
    head = ["policy", "budget", "blocks read"]
    head += [f"ppl {g}" for g in groups]
    head += [f"passkey {n}" for n in lengths] + ["passkey all", "greedy agreement"]
    rows = []
    for c in configs:
        row: list[Any] = [
            c["policy"],
            f"{c['budget']:.1f}",
            f"{c['selection_fraction']:.3f}",
        ]
        row += [f"{c['perplexity'][g]:.2f}" for g in groups]
        by_length = c["passkey_accuracy_by_length"]
        row += [f"{by_length.get(str(n), float('nan')):.2f}" for n in lengths]
        row += [_num(c["passkey_accuracy"]), _num(c["agreement"])]
        rows.append(row)
    docs = sorted({d for c in configs for d in c.get("perplexity_per_document", {})})
    per_doc = ""
    if len(docs) > len(groups):
        doc_rows = [
            [c["policy"], f"{c['budget']:.1f}"]
            + [_num(c["perplexity_per_document"].get(d)) for d in docs]
            for c in configs
        ]
        per_doc = "\n\nPerplexity per document:\n\n" + _table(
            ["policy", "budget"] + [f"ppl {d}" for d in docs], doc_rows
        )
    scored = {
        r["group"]: r.get("scored_tokens")
        for r in data["requests"]
        if r["task"] == "perplexity"
    }
    notes = ", ".join(f"{g}: {n} scored tokens per document" for g, n in scored.items())
    return (
        f"`{data['command']}` ({data['seconds'] / 60:.1f} min, {data['machine']}, "
        f"{data['dtype']}; {notes})\n\n" + _table(head, rows) + per_doc
    )


def speed_tables(data: dict[str, Any]) -> str:
    head = [
        "context x batch",
        "policy",
        "decode tok/s",
        "vs dense vLLM",
        "ceiling",
        "KV MB / token",
        "KV bytes vs dense",
        "selection share of step",
    ]
    rows = []
    for m in data["measured"]:
        rows.append(
            [
                f"{m['context']} x{m['batch']}",
                "dense vLLM" if m["policy"] == "baseline" else m["policy"],
                f"{m['decode_tok_s']:.2f}",
                f"{m['speed_ratio']:.2f}",
                f"{m['ceiling']:.2f}" if "ceiling" in m else "",
                f"{m['kv_mb_per_token']:.1f}",
                f"{m['bytes_ratio']:.3f}",
                f"{m['speculation_share']:.3f}" if "speculation_share" in m else "",
            ]
        )
    ttft = _table(
        ["context", "dense vLLM TTFT s", "INFINIGEN engine TTFT s", "ratio"],
        [
            [
                t["context"],
                f"{t['baseline_ttft_s']:.1f}",
                f"{t['infinigen_ttft_s']:.1f}",
                f"{t['ratio']:.2f}",
            ]
            for t in data["ttft"]
        ],
    )
    model = data["transfer_model"]
    transfer = _table(
        [
            "context x batch",
            "fetch",
            "MB per step",
            "ms per step (modelled)",
            "full / this",
        ],
        [
            [
                f"{r['context']} x{r['batch']}",
                r["policy"],
                f"{r['bytes_per_step'] / 1e6:.1f}",
                f"{r['transfer_ms_per_step']:.2f}",
                f"{r['full_over_policy']:.2f}",
            ]
            for r in model["rows"]
            if r["policy"] in ("full-KV fetch", "infinigen")
        ],
    )
    return (
        f"`{data['command']}` ({data['seconds'] / 60:.1f} min, {data['machine']}, "
        f"{data['dtype']}, budget {data['budget']}, {data['decode_tokens']} decode "
        f"tokens)\n\n"
        + _table(head, rows)
        + "\n\nTime to first token (one cold prompt):\n\n"
        + ttft
        + f"\n\nModelled transfer at {model['pcie_gbps']} GB/s (not measured):\n\n"
        + transfer
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "files", nargs="*", help="result JSON files (accuracy*.json, speed*.json)"
    )
    args = parser.parse_args()
    renderers = {"accuracy": accuracy_tables, "speed": speed_tables}
    suffix = "_quick" if args.quick else ""
    paths = [Path(f) for f in args.files] or [
        RESULTS / f"{name}{suffix}.json" for name in renderers
    ]
    for path in paths:
        kind = next((k for k in renderers if path.name.startswith(k)), None)
        if kind is None:
            parser.error(f"{path}: name must start with one of {list(renderers)}")
        if not path.exists():
            print(f"## {path.name}: {path} not found\n")
            continue
        print(f"## {path.name}\n\n{renderers[kind](json.loads(path.read_text()))}\n")


if __name__ == "__main__":
    main()
