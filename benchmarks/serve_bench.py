"""Serving speed as users measure it: ``vllm bench serve`` against one
``vllm serve`` at a time, INFINIGEN against vLLM's own CPU backend.

For each configuration a real ``vllm serve`` starts (nothing else running),
every shape and dataset is driven through it with vLLM's own ``vllm bench
serve --save-result``, and the server stops before the next one starts::

    python benchmarks/serve_bench.py                                  # every shape
    python benchmarks/serve_bench.py --shapes 2048x1 1024x16 --out /tmp/s.json
    python benchmarks/serve_bench.py --policies quest streaming       # peers too

Configurations (``--configs``; ``--policies`` adds INFINIGEN peers):

- ``vllm``: vLLM's default CPU backend at its default block size;
- ``vllm-bs``: vLLM's default backend at INFINIGEN's block size (read from
  INFINIGEN's start-up log line; skipped when it equals vLLM's default);
- ``infinigen``: ``--attention-backend infinigen`` at its defaults;
- ``dense``: INFINIGEN's ``dense`` policy (reads every block through our path).

Workloads (``--datasets``): ``stdlib`` / ``pg19``, the project's long texts
through ``vllm bench serve``'s ``custom`` dataset (each request its own
text, ``workloads.py``), and ``random``, vLLM's own random-token prompts.
Every request decodes ``--output-len`` tokens with ``--ignore-eos``, all of
a shape's requests at once (concurrency = batch).

Each shape and dataset runs on the same server first ``cold`` (every
prompt prefilled: its TTFT is the one reported), then ``--warm-repeats``
times ``warm`` (the same prompts again, prefilled from vLLM's prefix cache,
so nearly every step is a pure decode step: the median over these passes of
their TPOT and ITL is reported; one pass alone moved by up to a fifth on
this machine's shared cores). Every pass's results stay in the JSON.
Ratios compare each configuration with the faster vLLM configuration of
the same row (lower median ITL), measured in the same run: above 1 is
faster than vLLM.

Writes ``--out`` (JSON with the CPU model and commit), a Markdown table
next to it (``.md``) and a plot (``.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workloads import (
    RESULTS,
    VLLM_CPU_BLOCK_SIZE,
    commit,
    cpu_model,
    distinct_prompts,
)

VLLM_BIN = Path(sys.executable).with_name("vllm")
VLLM = "vllm"
VLLM_AT_OUR_BLOCK = "vllm-bs"
CONFIGS = (VLLM, VLLM_AT_OUR_BLOCK, "infinigen", "dense")
#: What the tables read from a ``--save-result`` file: (key, label).
METRICS = (
    ("median_itl_ms", "ITL p50 ms"),
    ("p95_itl_ms", "ITL p95 ms"),
    ("median_tpot_ms", "TPOT p50 ms"),
    ("p95_tpot_ms", "TPOT p95 ms"),
    ("output_throughput", "out tok/s"),
)
#: What the JSON keeps of each pass's ``--save-result`` file.
KEPT = (
    "completed",
    "total_input_tokens",
    "total_output_tokens",
    "duration",
    "output_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p95_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p95_tpot_ms",
    "mean_itl_ms",
    "median_itl_ms",
    "p95_itl_ms",
    "median_e2el_ms",
)
BLOCK_LINE = re.compile(r"INFINIGEN attention backend active:.*?block_size=(\d+)")
#: INFINIGEN's start-up measurements (the block size and the sparse
#: threshold), kept with the rows of its server.
PROBE_LINE = re.compile(r"INFINIGEN ((?:block_size=|decode costs per layer).*)")


def parse_shape(text: str) -> tuple[int, int]:
    context, _, batch = text.lower().partition("x")
    return int(context), int(batch)


def server_args(
    config: str, args: argparse.Namespace, block_size: int | None
) -> list[str]:
    """``vllm serve`` arguments of one configuration (besides model and port)."""
    longest = max(parse_shape(s)[0] for s in args.shapes) + args.output_len + 64
    common = [
        "--served-model-name",
        args.model,
        "--max-model-len",
        str(max(longest, 2048)),
        "--dtype",
        "float32",
    ]
    if config == VLLM:
        return common
    if config == VLLM_AT_OUR_BLOCK:
        return [*common, "--block-size", str(block_size)]
    options = {**json.loads(args.options)}
    if config != "infinigen":
        options["policy"] = config
    extra = ["--attention-backend", "infinigen"]
    if options:
        extra += ["--additional-config", json.dumps({"infinigen": options})]
    return [*common, *extra]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def serving(
    model_dir: Path, extra: list[str], log_path: Path, kv_gib: str
) -> Iterator[int]:
    """A healthy ``vllm serve`` on a free loopback port; stopped (SIGINT, then
    its whole process group killed) on exit."""
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": kv_gib}
    command = [
        str(VLLM_BIN),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 900
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"vllm serve did not start ({' '.join(extra)}):\n{tail}"
                )
            time.sleep(2)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def bench_command(
    args: argparse.Namespace,
    port: int,
    model_dir: Path,
    shape: str,
    dataset: str,
    custom_path: Path | None,
    result_dir: Path,
    name: str,
) -> list[str]:
    context, batch = parse_shape(shape)
    command = [
        str(VLLM_BIN),
        "bench",
        "serve",
        "--backend",
        "vllm",
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--model",
        args.model,
        "--tokenizer",
        str(model_dir),
        "--num-prompts",
        str(batch),
        "--max-concurrency",
        str(batch),
        "--request-rate",
        "inf",
        "--ignore-eos",
        "--seed",
        "0",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,95",
        "--save-result",
        "--result-dir",
        str(result_dir),
        "--result-filename",
        name,
    ]
    if dataset == "random":
        return [
            *command,
            "--dataset-name",
            "random",
            "--random-input-len",
            str(context),
            "--random-output-len",
            str(args.output_len),
            "--random-range-ratio",
            "0",
        ]
    assert custom_path is not None
    return [
        *command,
        "--dataset-name",
        "custom",
        "--dataset-path",
        str(custom_path),
        "--custom-output-len",
        str(args.output_len),
        "--skip-chat-template",
        "--disable-shuffle",
    ]


def custom_datasets(
    args: argparse.Namespace, model_dir: Path, folder: Path
) -> dict[tuple[str, str], Path]:
    """One JSONL file per (shape, project dataset): the prompts of the run."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    files = {}
    for shape in args.shapes:
        context, batch = parse_shape(shape)
        for dataset in args.datasets:
            if dataset == "random":
                continue
            path = folder / f"{dataset}_{shape}.jsonl"
            prompts = distinct_prompts(tokenizer, dataset, context, batch)
            path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
            files[shape, dataset] = path
    return files


def run_config(
    config: str,
    args: argparse.Namespace,
    model_dir: Path,
    files: dict[tuple[str, str], Path],
    work: Path,
    block_size: int | None,
) -> tuple[list[dict[str, Any]], int | None]:
    """Every shape and dataset through one server: rows, and the block size
    the server logged (INFINIGEN's)."""
    rows = []
    log_path = work / f"serve_{config}.log"
    started = time.monotonic()
    with serving(
        model_dir, server_args(config, args, block_size), log_path, args.kv_gib
    ) as port:
        print(
            f"[{config}] serving after {time.monotonic() - started:.0f} s", flush=True
        )
        for shape in args.shapes:
            for dataset in args.datasets:
                passes = {}
                warm = [f"warm{i + 1}" for i in range(args.warm_repeats)]
                for phase in ("cold", *warm):
                    name = f"{config}_{shape}_{dataset}_{phase}.json"
                    command = bench_command(
                        args,
                        port,
                        model_dir,
                        shape,
                        dataset,
                        files.get((shape, dataset)),
                        work,
                        name,
                    )
                    begun = time.monotonic()
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode:
                        tail = f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
                        raise RuntimeError(f"vllm bench serve failed:\n{tail}")
                    result = json.loads((work / name).read_text())
                    passes[phase] = result
                    print(
                        f"[{config}] {shape} {dataset} {phase}: "
                        f"ITL p50 {result.get('median_itl_ms', 0):.1f} ms, "
                        f"TTFT p50 {result.get('median_ttft_ms', 0) / 1e3:.1f} s "
                        f"({time.monotonic() - begun:.0f} s)",
                        flush=True,
                    )
                rows.append(
                    {
                        "config": config,
                        "shape": shape,
                        "dataset": dataset,
                        **summary(passes),
                    }
                )
    log = log_path.read_text(errors="replace")
    probes = sorted({m.group(1).strip() for m in PROBE_LINE.finditer(log)})
    for row in rows:
        if probes:
            row["startup_probes"] = probes
    match = BLOCK_LINE.search(log)
    return rows, int(match.group(1)) if match else block_size


def summary(passes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The reported numbers of one row: decode metrics from the warm passes
    (the median over them of each pass's figure), TTFT from the cold one,
    and every pass's own results."""
    cold = passes["cold"]
    warm = [p for phase, p in passes.items() if phase != "cold"]
    out: dict[str, Any] = {}
    for key, _ in METRICS:
        values = sorted(p[key] for p in warm if p.get(key) is not None)
        out[key] = values[len(values) // 2] if values else None
    out["median_ttft_ms"] = cold.get("median_ttft_ms")
    out["p95_ttft_ms"] = cold.get("p95_ttft_ms")
    out["cold_median_itl_ms"] = cold.get("median_itl_ms")
    out["cold_median_tpot_ms"] = cold.get("median_tpot_ms")
    out["prompt_tokens"] = cold.get("total_input_tokens")
    out["passes"] = {phase: {k: p.get(k) for k in KEPT} for phase, p in passes.items()}
    return out


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per row, ratios against the faster vLLM configuration of its shape and
    dataset (lower warm median ITL): > 1 is faster than vLLM."""
    for row in rows:
        same = [
            r
            for r in rows
            if r["shape"] == row["shape"] and r["dataset"] == row["dataset"]
        ]
        baselines = [r for r in same if r["config"] in (VLLM, VLLM_AT_OUR_BLOCK)]
        if not baselines:
            continue
        best = min(baselines, key=lambda r: r["median_itl_ms"] or float("inf"))
        row["baseline"] = best["config"]
        for key in ("median_itl_ms", "p95_itl_ms", "median_tpot_ms", "p95_tpot_ms"):
            if row.get(key) and best.get(key):
                row[f"speedup_{key}"] = best[key] / row[key]
        if row.get("output_throughput") and best.get("output_throughput"):
            row["speedup_output_throughput"] = (
                row["output_throughput"] / best["output_throughput"]
            )
        if row.get("median_ttft_ms") and best.get("median_ttft_ms"):
            row["ttft_ratio"] = row["median_ttft_ms"] / best["median_ttft_ms"]


def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "shape",
        "dataset",
        "config",
        *[label for _, label in METRICS],
        "TTFT p50 s (cold)",
        "ITL vs vLLM",
        "TPOT vs vLLM",
        "TTFT vs vLLM",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["shape"], r["dataset"], r["config"]]
        cells += ["-" if r.get(k) is None else f"{r[k]:.1f}" for k, _ in METRICS]
        cells.append(
            "-"
            if r.get("median_ttft_ms") is None
            else f"{r['median_ttft_ms'] / 1e3:.1f}"
        )
        for key in ("speedup_median_itl_ms", "speedup_median_tpot_ms", "ttft_ratio"):
            cells.append("-" if r.get(key) is None else f"{r[key]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(
        {(r["shape"], r["dataset"]) for r in rows},
        key=lambda g: (parse_shape(g[0]), g[1]),
    )
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / max(len(configs), 1)
    for i, config in enumerate(configs):
        values = []
        for shape, dataset in groups:
            match = [
                r
                for r in rows
                if (r["shape"], r["dataset"], r["config"]) == (shape, dataset, config)
            ]
            values.append(match[0].get("speedup_median_itl_ms", 0) if match else 0)
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=config)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{s}\n{d}" for s, d in groups])
    ax.set_ylabel("median ITL speedup vs faster vLLM config")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument(
        "--shapes", nargs="+", default=["2048x1", "1024x16", "8192x4", "16384x4"]
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["stdlib", "random"],
        choices=["stdlib", "pg19", "random"],
    )
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--warm-repeats",
        type=int,
        default=3,
        help="warm passes per shape (decode metrics: their median)",
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument(
        "--policies", nargs="*", default=[], help="INFINIGEN peer policies to add"
    )
    parser.add_argument(
        "--options",
        default="{}",
        help="INFINIGEN options (JSON) for every INFINIGEN server",
    )
    parser.add_argument(
        "--kv-gib", default="8", help="VLLM_CPU_KVCACHE_SPACE of every server"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_bench.json")
    args = parser.parse_args()

    from vllm_infinigen.models import build_model

    model_dir = Path(build_model(args.model))
    # INFINIGEN first: vllm-bs needs its block size.
    configs = [c for c in args.configs if c not in (VLLM, VLLM_AT_OUR_BLOCK)]
    configs += list(args.policies)
    configs += [c for c in (VLLM, VLLM_AT_OUR_BLOCK) if c in args.configs]
    started = time.time()
    checkout = commit()  # the code every server of the run loads
    rows: list[dict[str, Any]] = []
    block_size: int | None = None
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        work = Path(tmp)
        files = custom_datasets(args, model_dir, work)
        for config in configs:
            if config == VLLM_AT_OUR_BLOCK and block_size in (
                None,
                VLLM_CPU_BLOCK_SIZE,
            ):
                print(
                    f"[{config}] skipped: INFINIGEN's block size is {block_size}",
                    flush=True,
                )
                continue
            config_rows, logged = run_config(
                config, args, model_dir, files, work, block_size
            )
            if config not in (VLLM, VLLM_AT_OUR_BLOCK) and logged is not None:
                block_size = logged
            for row in config_rows:
                row["block_size"] = logged if config != VLLM else VLLM_CPU_BLOCK_SIZE
            rows += config_rows
    add_ratios(rows)
    result = {
        "command": "python benchmarks/serve_bench.py " + " ".join(sys.argv[1:]),
        "machine": cpu_model(),
        "commit": checkout,
        "minutes": round((time.time() - started) / 60, 1),
        "output_len": args.output_len,
        "infinigen_block_size": block_size,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    text = table(rows)
    head = f"{result['machine']}, commit {result['commit']}"
    args.out.with_suffix(".md").write_text(
        f"{head}\n\n`{result['command']}`\n\n{text}\n"
    )
    plot(rows, args.out.with_suffix(".png"))
    print(text)
    print(f"wrote {args.out} ({result['minutes']} min)")


if __name__ == "__main__":
    main()
