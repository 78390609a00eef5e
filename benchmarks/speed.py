"""Decode speed, KV bytes and time to first token: dense vLLM vs every policy.

One run measures, per context length and batch size, vLLM's default CPU
attention (the baseline, its own engine process) next to one INFINIGEN engine
process that switches between the block-selection policies (``dense`` reads
every block through our path; ``infinigen``, ``quest``, ``h2o``, ``streaming``
read a ``--budget`` share of them), and writes
``benchmarks/results/speed.json`` plus ``speed.png`` (``--quick``:
``speed_quick.*``)::

    python benchmarks/speed.py --quick      # 2K x1, x4; 16 tokens (~12 min)
    python benchmarks/speed.py              # 2K x1, x4, x8 and 8K x1 (~40 min)
    python benchmarks/speed.py --contexts 2048 4096 8192      # + 4K x1, x4 (~1 h)
    python benchmarks/speed.py --contexts 16384 --batches 1   # 16K x1

Measured, per (context, batch) and policy:

- decode tokens/s from vLLM's per-request first/last token timestamps, after
  the prompts sit in the prefix cache (each timed request decodes, it does
  not prefill), and its ratio to the baseline measured in the same run;
- KV bytes read per decode step and per decoded token, counted by the
  engine's counters (sparse layers: the selected blocks; dense layers, layer
  0: every block). The baseline and a full-KV read are the same counted
  blocks taken whole in every layer;
- time to first token of one cold prompt (before the prefix cache holds it)
  in each engine, from vLLM's ``RequestOutput.metrics``: prefill is dense in
  every policy, so it should match the baseline. The INFINIGEN engine keeps
  the metadata of every tracked policy during that prefill.

Modelled, not measured (a GPU that offloads its KV to host memory): per decode
step, the time to move a full-KV fetch across a ``--pcie-gbps`` host-to-device
link (every layer's whole KV of the batch, as offloading systems such as
FlexGen do) next to the time to move each policy's counted bytes (selected
blocks of sparse layers plus the whole KV of dense layers), and their ratio.
Compute and speculation time are not part of the model.

Each engine process serves one context length and walks the batch sizes in
increasing order on shared prompts (request ``i`` is the same text at every
batch size), so each prompt is prefilled once per engine. Configurations with
``context * batch`` above ``--max-batch-tokens`` (16384) are skipped. Prefill
dominates the run time on 2 CPU cores: about 55 tokens/s at 2K context when
the machine is shared (100 when idle) and slower at longer contexts, twice
per configuration (both engines); 16384 x batch 1 alone takes about 13 minutes of
prefill per engine and 16K x batch 4 over half an hour, so 16K and 4K are
only run when asked for. An estimate of the run time is printed up front
(``--plan`` prints it and exits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
POLICY_ORDER = ("dense", "infinigen", "quest", "h2o", "streaming")
BASELINE = "baseline"
FULL_FETCH = "full-KV fetch"
TAG = "SPEED "


# --------------------------------------------------------------------- prompts


def prompt_ids(tokenizer: Any, tokens: int, seed: int) -> list[int]:
    """Exactly ``tokens`` token ids of Python standard-library source text;
    ``seed`` picks where in the (sorted) list of modules the text starts."""
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    ids: list[int] = []
    index = seed * 11
    while len(ids) < tokens:
        chunk = files[index % len(files)].read_text(encoding="utf-8", errors="replace")
        ids += tokenizer(chunk)["input_ids"]
        index += 1
    return ids[:tokens]


# ------------------------------------------------------------ child: one engine


def policy_options(policy: str, budget: float, known: tuple[str, ...]) -> dict:
    """The ``infinigen`` options of one policy at ``budget``. ``dense`` is
    our path reading every block: its own policy where the engine has one,
    otherwise INFINIGEN at budget 1.0 (which fetches every block)."""
    if policy == "dense" and "dense" not in known:
        return {"policy": "infinigen", "budget": 1.0}
    if policy == "dense":
        return {"policy": "dense"}
    return {"policy": policy, "budget": budget}


def emit(kind: str, payload: dict[str, Any]) -> None:
    print(TAG + json.dumps({"kind": kind, **payload}), flush=True)


def decode_measure(outs: list[Any]) -> dict[str, Any]:
    """Decode tokens/s of one generate call, from vLLM's request timestamps:
    tokens after each request's first, over the span from the earliest first
    token to the latest last token."""
    first = min(o.metrics.first_token_ts for o in outs)
    last = max(o.metrics.last_token_ts for o in outs)
    decoded = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
    prompt = sum(len(o.prompt_token_ids or []) for o in outs)
    cached = sum(o.num_cached_tokens or 0 for o in outs)
    return {
        "decode_s": last - first,
        "decode_tokens": decoded,
        "decode_tok_s": decoded / max(last - first, 1e-9),
        "prompt_cached_fraction": cached / max(prompt, 1),
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
    }


def run_child(args: argparse.Namespace) -> None:
    """One engine, one context length, every batch size (and, for the
    INFINIGEN engine, every policy): print tagged JSON lines."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_infinigen.config import POLICIES

    batches = sorted(args.batches)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = [
        TokensPrompt(prompt_token_ids=prompt_ids(tokenizer, args.context, seed))
        for seed in range(batches[-1])
    ]
    ours = args.child == "infinigen"
    policies: list[str] = list(args.policies) if ours else [BASELINE]
    options = {p: policy_options(p, args.budget, POLICIES) for p in policies}
    extra: dict[str, Any] = json.loads(args.options)
    # The INFINIGEN engine starts as configured by default (policy
    # "infinigen" at --budget): that is the engine whose TTFT is reported.
    initial = policy_options("infinigen", args.budget, POLICIES)
    kwargs: dict[str, Any] = {}
    if ours:
        kwargs["attention_backend"] = "INFINIGEN"
        kwargs["additional_config"] = {"infinigen": {**extra, **initial}}
    start = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.context + args.decode_tokens + 16,
        max_num_batched_tokens=2048,
        enable_prefix_caching=True,
        enforce_eager=True,
        disable_log_stats=False,
        **kwargs,
    )
    tracked: list[str] = []
    if ours:
        # Every policy's device metadata is kept from the first prefill on,
        # so the cached prompts serve every policy (one prefill per engine).
        wanted = sorted({o["policy"] for o in options.values()} - {"dense"})
        tracked = llm.collective_rpc("infinigen_track", args=(wanted,))[0]
    emit("startup", {"seconds": time.perf_counter() - start, "tracked": tracked})

    # Warm the engine's kernels (first forward, prefill chunk and decode
    # shapes) on a text no timed prompt starts with, so TTFT below measures a
    # cold prompt, not a cold engine.
    marker = tokenizer("# warm-up\n")["input_ids"]
    start = time.perf_counter()
    llm.generate(
        [
            TokensPrompt(
                prompt_token_ids=(marker + prompts[0]["prompt_token_ids"])[
                    : min(args.context, 512)
                ]
            )
        ],
        SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
    )
    emit("engine_warmup", {"seconds": time.perf_counter() - start})

    # Time to first token of one cold prompt (not in the prefix cache).
    start = time.perf_counter()
    probe = llm.generate(prompts[:1], SamplingParams(max_tokens=1, temperature=0))[0]
    metrics = probe.metrics
    assert metrics is not None, "vLLM request metrics need disable_log_stats=False"
    emit(
        "ttft",
        {
            "context": args.context,
            "ttft_s": metrics.first_token_latency,
            "prefill_s": metrics.first_token_ts - metrics.scheduled_ts,
            "queued_s": metrics.scheduled_ts - metrics.queued_ts,
            "cached_tokens": probe.num_cached_tokens or 0,
            "wall_s": time.perf_counter() - start,
        },
    )

    current = json.dumps(initial, sort_keys=True)  # the engine's options now
    warm = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    timed = SamplingParams(
        max_tokens=args.decode_tokens, temperature=0, ignore_eos=True
    )
    prefilled = 1
    for batch in batches:
        batch_prompts = prompts[:batch]
        start = time.perf_counter()
        if batch > prefilled:
            llm.generate(prompts[prefilled:batch], SamplingParams(max_tokens=1))
            prefilled = batch
        prefill_wall = time.perf_counter() - start
        runs: dict[str, dict[str, Any]] = {}
        for policy in policies:
            key = json.dumps(options[policy], sort_keys=True)
            if ours and key != current:
                llm.collective_rpc("infinigen_configure", args=(options[policy],))
                current = key
            if batch == batches[0] or policy == policies[0]:
                # A policy's first decode, and a batch size's first decode.
                llm.generate(batch_prompts, warm)
            effective: dict[str, Any] = {}
            if ours:
                llm.collective_rpc("infinigen_reset_stats")
            repeats = []
            for _ in range(args.repeats):
                if ours:
                    # Configure again: clears the decode-time H2O mass earlier
                    # runs added, so every timed run starts from prefill's.
                    effective = llm.collective_rpc(
                        "infinigen_configure", args=(options[policy],)
                    )[0]
                start = time.perf_counter()
                outs = llm.generate(batch_prompts, timed)
                repeats.append(
                    {**decode_measure(outs), "wall_s": time.perf_counter() - start}
                )
            repeats.sort(key=lambda r: float(r["decode_tok_s"]))
            run = dict(repeats[len(repeats) // 2])  # the median run
            run["decode_tok_s_repeats"] = [r["decode_tok_s"] for r in repeats]
            run["decode_s_all_repeats"] = sum(r["decode_s"] for r in repeats)
            run["options"] = effective
            if ours:
                run["stats"] = llm.collective_rpc("infinigen_stats")[0]
            runs[policy] = run
            emit(
                "progress",
                {
                    "context": args.context,
                    "batch": batch,
                    "policy": policy,
                    "decode_tok_s": run["decode_tok_s"],
                },
            )
        emit(
            "batch",
            {
                "engine": args.child,
                "context": args.context,
                "batch": batch,
                "new_prompt_prefill_wall_s": prefill_wall,
                "runs": runs,
            },
        )


# -------------------------------------------------------------- parent: a run


def kv_bytes(stats: dict[str, Any], num_layers: int) -> dict[str, float]:
    """Counted KV bytes per decoded token (one request's step): ``full``
    reads every block of every layer; ``read`` is what the policy read
    (selected blocks in its sparse layers, every block in its dense layers);
    ``selected`` is the sparse layers' part of ``read`` (the engine's swapped
    bytes). Normalised by the counted decode requests, not steps, because the
    requests of a batch may start decoding one step apart."""
    total = stats["total"]
    sparse = max(len(stats["layers"]), 1)
    tokens = total["decode_requests"] / sparse  # decode requests per layer
    block = stats["block_bytes"]
    blocks_per_layer = total["blocks_total"] / max(tokens * sparse, 1)
    selected = total["bytes_swapped"] / max(tokens, 1)
    dense_layers = (num_layers - sparse) * blocks_per_layer * block
    return {
        "decode_tokens_counted": tokens,
        "full": blocks_per_layer * block * num_layers,
        "read": selected + dense_layers,
        "selected": selected,
        "blocks_per_layer": blocks_per_layer,
        "selected_blocks_per_layer": total["blocks_selected"] / max(tokens * sparse, 1),
    }


def prefix_agreement(ref: list[list[int]], other: list[list[int]]) -> float:
    """Mean share of each request's greedy tokens that match ``ref`` before
    the first difference."""
    from vllm_infinigen.method.agreement import prefix_agreement as one

    shares = [one(a, b) for a, b in zip(ref, other, strict=True)]
    return sum(shares) / max(len(shares), 1)


def summarise(
    base: dict[str, Any], ours: dict[str, Any], num_layers: int, gbps: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Measured rows (one per policy, baseline first) and modelled transfer
    rows of one (context, batch)."""
    context, batch = base["context"], base["batch"]
    ref = base["runs"][BASELINE]
    measured: list[dict[str, Any]] = []
    modelled: list[dict[str, Any]] = []
    # Counted bytes per decoded token, and per decode step of the batch.
    per_token = {
        policy: kv_bytes(run["stats"], num_layers)
        for policy, run in ours["runs"].items()
    }
    full_token = max(c["full"] for c in per_token.values())
    full_step = full_token * batch
    link = gbps * 1e9
    measured.append(
        {
            "context": context,
            "batch": batch,
            "policy": BASELINE,
            "decode_tok_s": ref["decode_tok_s"],
            "speed_ratio": 1.0,
            "kv_bytes_per_step": full_step,
            "kv_bytes_per_token": full_token,
            "bytes_ratio": 1.0,
        }
    )
    modelled.append(
        {
            "context": context,
            "batch": batch,
            "policy": FULL_FETCH,
            "bytes_per_step": full_step,
            "transfer_ms_per_step": full_step / link * 1e3,
            "full_over_policy": 1.0,
        }
    )
    for policy, run in ours["runs"].items():
        counted = per_token[policy]
        total = run["stats"]["total"]
        decode_s = max(run["decode_s_all_repeats"], 1e-9)
        measured.append(
            {
                "context": context,
                "batch": batch,
                "policy": policy,
                "decode_tok_s": run["decode_tok_s"],
                "speed_ratio": run["decode_tok_s"] / ref["decode_tok_s"],
                "kv_bytes_per_step": counted["read"] * batch,
                "kv_bytes_per_token": counted["read"],
                "bytes_ratio": counted["read"] / max(counted["full"], 1.0),
                "selection_fraction": total["selection_fraction"],
                "blocks_per_layer_token": counted["blocks_per_layer"],
                "selected_blocks_per_layer_token": counted["selected_blocks_per_layer"],
                "speculation_share": total["speculation_s"] / decode_s,
                "swap_share": total["swap_s"] / decode_s,
                "attention_share": total["attention_s"] / decode_s,
                "greedy_prefix_agreement": prefix_agreement(
                    ref["token_ids"], run["token_ids"]
                ),
            }
        )
        modelled.append(
            {
                "context": context,
                "batch": batch,
                "policy": policy,
                "bytes_per_step": counted["read"] * batch,
                "transfer_ms_per_step": counted["read"] * batch / link * 1e3,
                "full_over_policy": full_token / max(counted["read"], 1.0),
            }
        )
    return measured, modelled


def launch(
    args: argparse.Namespace, engine: str, context: int, batches: list[int]
) -> dict[str, Any]:
    """Run one engine process; return its tagged records (and echo progress)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        engine,
        "--model",
        args.model,
        "--context",
        str(context),
        "--batches",
        *map(str, batches),
        "--policies",
        *args.policies,
        "--budget",
        str(args.budget),
        "--decode-tokens",
        str(args.decode_tokens),
        "--repeats",
        str(args.repeats),
        "--options",
        args.options,
        "--dtype",
        args.dtype,
    ]
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kvcache_gib)
    records: dict[str, Any] = {"batches": []}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith(TAG):
                continue
            record = json.loads(line[len(TAG) :])
            kind = record.pop("kind")
            if kind == "batch":
                records["batches"].append(record)
            elif kind == "progress":
                print(
                    f"  [{time.perf_counter() - start:6.0f} s] {engine} "
                    f"{record['context']} x{record['batch']} {record['policy']}: "
                    f"{record['decode_tok_s']:.2f} tok/s",
                    flush=True,
                )
            else:
                records[kind] = record
        proc.wait()
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(
                f"{engine} engine at context {context} failed "
                f"({proc.returncode}):\n{log.read()[-4000:]}"
            )
    records["seconds"] = time.perf_counter() - start
    return records


def estimate_s(
    contexts: dict[int, list[int]], policies: int, decode_tokens: int, repeats: int
) -> float:
    """Rough run time on this 2-core machine (measured by ``--quick`` while
    other work shared it): ~80 s per engine start, prefill at ~55 tokens/s at
    2K context, ~21 at 16K, decode steps of ~0.35 s plus ~0.2 s per
    further request of the batch (1 s at 2K x4), and ~1 s + 0.5 s per request
    of scheduling and last-block recompute per generate call."""

    def prefill(tokens: int, context: int) -> float:
        return tokens / (55 * (2048 / context) ** 0.45)

    total = 0.0
    for context, batches in contexts.items():
        for runs in (1, policies):
            total += 80 + prefill(min(context, 512) + context * max(batches), context)
            for i, batch in enumerate(batches):
                step = 0.35 + 0.2 * (batch - 1) + 0.02 * batch * context / 2048
                call = 1 + 0.5 * batch
                warms = runs if i == 0 else 1
                total += runs * (repeats * (decode_tokens * step + call))
                total += warms * (2 * step + call)
    return total


#: One colour per series in every panel.
COLOURS = {
    BASELINE: "#4d4d4d",
    FULL_FETCH: "#4d4d4d",
    "dense": "#9e9e9e",
    "infinigen": "#d62728",
    "quest": "#1f77b4",
    "h2o": "#2ca02c",
    "streaming": "#ff7f0e",
}
LABELS = {BASELINE: "dense vLLM (baseline)", FULL_FETCH: "full-KV fetch"}


def plot(
    measured: list[dict[str, Any]],
    modelled: list[dict[str, Any]],
    ttft: list[dict[str, Any]],
    gbps: float,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["context"], r["batch"]) for r in measured})
    labels = [f"{c // 1024}K x{b}" for c, b in configs]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))

    def bars(
        ax: Any, rows: list[dict[str, Any]], key: str, names: list[str], scale: float
    ) -> list[Any]:
        width = 0.8 / max(len(names), 1)
        drawn = []
        for j, name in enumerate(names):
            values = [
                next(
                    (
                        r[key] * scale
                        for r in rows
                        if (r["context"], r["batch"]) == cfg and r["policy"] == name
                    ),
                    float("nan"),
                )
                for cfg in configs
            ]
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(configs))]
            drawn.append(
                ax.bar(
                    xs,
                    values,
                    width,
                    label=LABELS.get(name, name),
                    color=COLOURS.get(name),
                )
            )
        ax.set_xticks(range(len(configs)), labels)
        ax.legend(fontsize=8)
        return drawn

    policies = list(dict.fromkeys(r["policy"] for r in measured))
    ax = axes[0][0]
    bars(ax, measured, "speed_ratio", [p for p in policies if p != BASELINE], 1.0)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("decode tokens/s / dense vLLM")
    ax.set_title("Measured decode speed vs dense vLLM (CPU, same run)")
    ax = axes[0][1]
    bars(ax, measured, "kv_bytes_per_token", policies, 1e-6)
    ax.set_ylabel("MB of KV read per decoded token")
    ax.set_title("Measured (engine counters) KV bytes per decoded token")
    ax = axes[1][0]
    names = list(dict.fromkeys(r["policy"] for r in modelled))
    drawn = bars(ax, modelled, "transfer_ms_per_step", names, 1.0)
    for name, container in zip(names, drawn, strict=True):
        if name == FULL_FETCH:
            continue
        ratios = [
            next(
                (
                    r["full_over_policy"]
                    for r in modelled
                    if (r["context"], r["batch"]) == cfg and r["policy"] == name
                ),
                float("nan"),
            )
            for cfg in configs
        ]
        ax.bar_label(container, [f"{x:.1f}x" for x in ratios], fontsize=6)
    ax.set_ylabel("ms per decode step (modelled)")
    ax.set_title(
        f"MODELLED host-to-device KV transfer per step at {gbps:g} GB/s\n"
        "(counted bytes / bandwidth; labels: full-KV time / policy time)"
    )
    ax = axes[1][1]
    xs = list(range(len(ttft)))
    ax.bar(
        [x - 0.18 for x in xs],
        [r["baseline_ttft_s"] for r in ttft],
        0.36,
        label=LABELS[BASELINE],
        color=COLOURS[BASELINE],
    )
    ax.bar(
        [x + 0.18 for x in xs],
        [r["infinigen_ttft_s"] for r in ttft],
        0.36,
        label="INFINIGEN engine",
        color=COLOURS["infinigen"],
    )
    ax.set_xticks(xs, [f"{r['context'] // 1024}K" for r in ttft])
    ax.set_xlim(-0.8, len(xs) - 0.2)
    ax.set_ylabel("seconds")
    ax.set_title("Measured time to first token (one cold prompt)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Plain text table: (header, key, format) per column."""
    head = " | ".join(h for h, _, _ in columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            value = r.get(key)
            cells.append("-" if value is None else format(value, fmt))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores, {name}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=16384,
        help="skip (context, batch) with context * batch above this",
    )
    parser.add_argument("--policies", nargs="+", default=list(POLICY_ORDER))
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs, median kept"
    )
    parser.add_argument(
        "--pcie-gbps",
        type=float,
        default=25.0,
        help="modelled host-to-device GB/s (1e9 bytes), PCIe 4.0 x16 effective",
    )
    parser.add_argument("--options", default="{}", help="JSON infinigen options")
    parser.add_argument("--dtype", default="float32", help="float32 on AVX2 CPUs")
    parser.add_argument(
        "--kvcache-gib", type=float, default=6, help="VLLM_CPU_KVCACHE_SPACE"
    )
    parser.add_argument("--model", default=None, help="model directory")
    parser.add_argument(
        "--quick", action="store_true", help="2K context, batches 1 and 4, 16 tokens"
    )
    parser.add_argument("--plan", action="store_true", help="print the plan, exit")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--child", choices=(BASELINE, "infinigen"), help=argparse.SUPPRESS
    )
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from vllm_infinigen.models import DEFAULT_MODEL, build_model

        args.model = str(build_model(DEFAULT_MODEL))
    if args.child:
        run_child(args)
        return
    if args.quick:
        args.contexts, args.batches, args.decode_tokens = [2048], [1, 4], 16
    out = Path(
        args.out or RESULTS / ("speed_quick.json" if args.quick else "speed.json")
    )
    unknown = set(args.policies) - set(POLICY_ORDER)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}; known: {list(POLICY_ORDER)}")
    plan = {
        c: sorted(b for b in set(args.batches) if c * b <= args.max_batch_tokens)
        for c in sorted(set(args.contexts))
    }
    skipped = [(c, b) for c in args.contexts for b in args.batches if b not in plan[c]]
    plan = {c: b for c, b in plan.items() if b}
    guess = estimate_s(plan, len(args.policies), args.decode_tokens, args.repeats)
    print(
        "plan: "
        + ", ".join(f"{c} x{b}" for c, bs in plan.items() for b in bs)
        + (
            f"; skipped (over {args.max_batch_tokens} tokens): {skipped}"
            if skipped
            else ""
        )
        + f"\npolicies {args.policies} at budget {args.budget}, "
        f"{args.decode_tokens} decode tokens; estimated {guess / 60:.0f} min",
        flush=True,
    )
    if args.plan:
        return
    config = json.loads((Path(args.model) / "config.json").read_text())
    num_layers = int(config["num_hidden_layers"])
    started = time.perf_counter()
    measured: list[dict[str, Any]] = []
    modelled: list[dict[str, Any]] = []
    ttft: list[dict[str, Any]] = []
    engines: list[dict[str, Any]] = []
    failures: list[str] = []
    for context, batches in plan.items():
        try:
            base = launch(args, BASELINE, context, batches)
            ours = launch(args, "infinigen", context, batches)
        except RuntimeError as error:  # keep the other contexts' results
            print(error, file=sys.stderr, flush=True)
            failures.append(str(error))
            continue
        ttft.append(
            {
                "context": context,
                "baseline_ttft_s": base["ttft"]["ttft_s"],
                "infinigen_ttft_s": ours["ttft"]["ttft_s"],
                "ratio": ours["ttft"]["ttft_s"] / base["ttft"]["ttft_s"],
                "baseline_prefill_s": base["ttft"]["prefill_s"],
                "infinigen_prefill_s": ours["ttft"]["prefill_s"],
                "cold": base["ttft"]["cached_tokens"] == 0
                and ours["ttft"]["cached_tokens"] == 0,
            }
        )
        for b_rec, o_rec in zip(base["batches"], ours["batches"], strict=True):
            rows, model_rows = summarise(b_rec, o_rec, num_layers, args.pcie_gbps)
            measured += rows
            modelled += model_rows
        for rec in (base, ours):
            for b_rec in rec["batches"]:
                for run in b_rec["runs"].values():
                    run.pop("token_ids", None)
        engines += [
            {"engine": BASELINE, "context": context, **base},
            {"engine": "infinigen", "context": context, **ours},
        ]
        print(
            f"context {context} done after {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    seconds = time.perf_counter() - started
    for r in measured:
        r["kv_mb_per_token"] = r["kv_bytes_per_token"] / 1e6
    measured_cols = [
        ("context", "context", "d"),
        ("batch", "batch", "d"),
        ("policy", "policy", "<10"),
        ("tok/s", "decode_tok_s", ".2f"),
        ("vs dense vLLM", "speed_ratio", ".2f"),
        ("KV MB/token", "kv_mb_per_token", ".2f"),
        ("bytes / full", "bytes_ratio", ".3f"),
        ("greedy agree", "greedy_prefix_agreement", ".2f"),
    ]
    model_rows_mb = [{**r, "mb": r["bytes_per_step"] / 1e6} for r in modelled]
    model_cols = [
        ("context", "context", "d"),
        ("batch", "batch", "d"),
        ("fetch", "policy", "<13"),
        ("MB/step", "mb", ".1f"),
        ("ms/step", "transfer_ms_per_step", ".3f"),
        ("full / this", "full_over_policy", ".2f"),
    ]
    ttft_cols = [
        ("context", "context", "d"),
        ("dense vLLM s", "baseline_ttft_s", ".2f"),
        ("INFINIGEN s", "infinigen_ttft_s", ".2f"),
        ("ratio", "ratio", ".3f"),
    ]
    print("\nMeasured decode (CPU, this run):\n" + table(measured, measured_cols))
    print(
        f"\nMODELLED transfer per decode step at {args.pcie_gbps:g} GB/s "
        "(counted bytes / bandwidth):\n" + table(model_rows_mb, model_cols)
    )
    print("\nMeasured time to first token, one cold prompt:\n" + table(ttft, ttft_cols))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
                "machine": machine(),
                "model": args.model,
                "dtype": args.dtype,
                "seconds": seconds,
                "estimated_seconds": guess,
                "policies": args.policies,
                "budget": args.budget,
                "decode_tokens": args.decode_tokens,
                "repeats": args.repeats,
                "options": json.loads(args.options),
                "kvcache_gib": args.kvcache_gib,
                "skipped": skipped,
                "measured": measured,
                "ttft": ttft,
                "transfer_model": {
                    "modelled": True,
                    "pcie_gbps": args.pcie_gbps,
                    "note": (
                        "Modelled, not measured: per decode step, counted KV "
                        "bytes / host-to-device bandwidth. 'full-KV fetch' moves "
                        "every layer's whole KV of the batch (offloading without "
                        "selection, as FlexGen); a policy moves its selected "
                        "blocks in sparse layers and the whole KV of dense layers. "
                        "Compute and speculation are not modelled."
                    ),
                    "rows": modelled,
                },
                "engines": engines,
                "failures": failures,
            },
            indent=2,
        )
    )
    print(f"\n{seconds / 60:.1f} min (estimated {guess / 60:.0f} min)")
    if measured:
        plot(measured, modelled, ttft, args.pcie_gbps, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    else:
        print(f"wrote {out} (no measurements: no plot)")
    if failures:
        sys.exit(f"{len(failures)} context(s) failed; see 'failures' in {out}")


if __name__ == "__main__":
    main()
