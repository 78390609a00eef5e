"""RULER's synthetic tasks against INFINIGEN's policies and budgets.

Builds RULER's synthetic tasks at each context length
(``benchmarks/ruler_tasks.py``: our implementation of the published task
definitions, fixed seeds), runs them through one in-process INFINIGEN engine
that switches policy and budget at run time, and scores the answers with
RULER's ``string_match_all``. Writes ``benchmarks/results/ruler[_quick]_MODEL
.json`` (``--out``), a table per length (``.md``) and a plot of score
against budget (``.png``)::

    python benchmarks/ruler.py --quick                     # 4K, < 15 min
    python benchmarks/ruler.py --lengths 4096 8192 16384   # Qwen, the suite
    python benchmarks/ruler.py --model gemma3-270m --lengths 4096 8192
    python benchmarks/ruler.py --plan                      # the plan, no engine

How it runs: the prompts of a length are split into groups that fit the
engine's KV cache; per group, the dense configuration (every block, vLLM's
kernel; scored once) generates first and so prefills every prompt, and each
policy at each budget then answers from vLLM's prefix cache (only a
prompt's last, partial block is computed again), so a prompt is prefilled
once for all configurations. Greedy decoding, each task's RULER generation
length. The prompt is RULER's text for a base model (its ``base`` template:
the task's template, then the answer prefix), no chat template.

Every sparse configuration selects at every step (``sparse_min_tokens`` 0)
with an exact budget (``min_blocks`` 0): the suite measures the selection,
not the engine's choice to read short steps whole. The KV block size is
the engine's own choice on this machine unless ``--block-size`` is given;
the JSON records it with the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accuracy import POLICIES as SPARSE_POLICIES
from accuracy import Shapes, parse_engine_options
from ruler_tasks import TASKS, Sample, build_samples, task_score
from workloads import commit, cpu_model

RESULTS = Path(__file__).resolve().parent / "results"

#: Sparse policies a full run compares (H2O recomputes attention mass per
#: step and is left to ``--policies``).
POLICIES = ("infinigen", "quest", "streaming")
BUDGETS = (0.05, 0.1, 0.2, 0.3)
LENGTHS = (4096, 8192, 16384)
SAMPLES = 3
#: Prompt tokens a group of prompts may hold, as a share of the KV cache
#: (the rest is left for decoding and the engine's own margin).
CACHE_SHARE = 0.7


@dataclass(frozen=True)
class Config:
    policy: str
    budget: float

    @property
    def name(self) -> str:
        return "dense" if self.policy == "dense" else f"{self.policy}@{self.budget:g}"


def configs_of(policies: Sequence[str], budgets: Sequence[float]) -> list[Config]:
    """Dense first (it prefills every prompt), then each policy and budget."""
    return [Config("dense", 1.0)] + [Config(p, b) for p in policies for b in budgets]


def groups_of(samples: Sequence[Sample], capacity_tokens: int) -> list[list[Sample]]:
    """Consecutive groups of samples whose prompts and answers fit
    ``capacity_tokens`` together (a sample alone always makes a group)."""
    groups: list[list[Sample]] = []
    current: list[Sample] = []
    used = 0
    for sample in samples:
        need = sample.prompt_tokens + sample.max_new_tokens
        if current and used + need > capacity_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(sample)
        used += need
    if current:
        groups.append(current)
    return groups


def summarise(
    samples: Sequence[Sample], predictions: dict[str, list[str]]
) -> dict[str, dict[str, float]]:
    """Per configuration, RULER's score of each task (percent) and their
    mean (``mean``), from the predictions in the samples' order."""
    out: dict[str, dict[str, float]] = {}
    for name, texts in predictions.items():
        scores: dict[str, float] = {}
        for task in dict.fromkeys(s.task for s in samples):
            idx = [i for i, s in enumerate(samples) if s.task == task]
            scores[task] = task_score(
                task, [texts[i] for i in idx], [samples[i].answers for i in idx]
            )
        scores["mean"] = round(sum(scores.values()) / len(scores), 2)
        out[name] = scores
    return out


def table(
    length: int, scores: dict[str, dict[str, float]], reads: dict[str, float]
) -> str:
    """A markdown table of one length: a row per configuration."""
    tasks = [t for t in next(iter(scores.values())) if t != "mean"]
    head = ["config", "read", "mean", *tasks]
    lines = [
        f"RULER at {length} tokens (score in percent, `string_match_all`)",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]
    for name, row in scores.items():
        cells = [name, f"{reads.get(name, 1.0):.2f}", f"{row['mean']:.1f}"]
        cells += [f"{row[t]:.0f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = result["lengths"]
    fig, axes = plt.subplots(
        1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False
    )
    for ax, entry in zip(axes[0], lengths, strict=True):
        scores = entry["scores"]
        dense = scores["dense"]["mean"]
        ax.axhline(dense, color="black", linestyle="--", label=f"dense {dense:.1f}")
        for policy in result["policies"]:
            points = sorted(
                (entry["reads"][name], row["mean"])
                for name, row in scores.items()
                if name.startswith(f"{policy}@")
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=policy)
        ax.set_title(f"{entry['length']} tokens")
        ax.set_xlabel("share of KV blocks read")
        ax.set_ylabel("RULER mean (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    fig.suptitle(f"RULER synthetic tasks, {result['model_name']} ({result['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="4K, one sample per task, 10/20%%")
    add("--plan", action="store_true", help="print the plan and exit (no engine)")
    add(
        "--model",
        default="qwen2.5-coder-0.5b",
        help="qwen2.5-coder-0.5b | gemma3-270m | folder",
    )
    add("--dtype", default="float32")
    add("--lengths", type=int, nargs="+", help=f"context tokens (default {LENGTHS})")
    add("--tasks", nargs="+", default=list(TASKS), help="RULER tasks (default: all)")
    add("--samples", type=int, help=f"samples per task and length ({SAMPLES})")
    add("--policies", nargs="+", help=f"sparse policies (default {POLICIES})")
    add("--budgets", type=float, nargs="+", help=f"budgets (default {BUDGETS})")
    add(
        "--block-size",
        type=int,
        default=None,
        help="KV block size (default: the engine's)",
    )
    add(
        "--engine-options",
        default="{}",
        metavar="JSON",
        help="INFINIGEN start-up options",
    )
    add("--kv-gib", type=int, default=6, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    add("--eager", action="store_true", help="--enforce-eager (default: compiled)")
    add("--seed", type=int, default=42)
    add("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    quick = {
        "lengths": [4096],
        "samples": 1,
        "policies": ["infinigen", "quest"],
        "budgets": [0.1, 0.2],
    }
    full = {
        "lengths": list(LENGTHS),
        "samples": SAMPLES,
        "policies": list(POLICIES),
        "budgets": list(BUDGETS),
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.tasks) - set(TASKS)
    if unknown:
        parser.error(f"--tasks: unknown {sorted(unknown)}; known: {list(TASKS)}")
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    bad = [b for b in args.budgets if not 0.0 < b <= 1.0]
    if bad:
        parser.error(f"--budgets must be in (0, 1]: {bad}")
    unknown = set(args.policies) - set(SPARSE_POLICIES)
    if unknown:
        parser.error(
            f"--policies: unknown {sorted(unknown)}; known: {list(SPARSE_POLICIES)}"
        )
    args.engine_options = parse_engine_options(parser, args.engine_options)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from vllm_infinigen.models import build_model

    folder = (
        Path(build_model(args.model))
        if not Path(args.model).is_dir()
        else Path(args.model)
    )
    model_name = folder.name
    out = (
        args.out or RESULTS / f"ruler{'_quick' if args.quick else ''}_{model_name}.json"
    )
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {message}", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    shapes = Shapes.of(folder, args.dtype)
    longest = max(args.lengths)
    if shapes.max_model_len and longest > shapes.max_model_len:
        raise SystemExit(
            f"--lengths: {longest} is over the model's {shapes.max_model_len} tokens"
        )
    capacity = int(args.kv_gib * (1 << 30) * CACHE_SHARE / shapes.kv_bytes_per_token)
    samples_of = {
        length: [
            s
            for task in args.tasks
            for s in build_samples(tokenizer, task, length, args.samples, args.seed)
        ]
        for length in args.lengths
    }
    configs = configs_of(args.policies, args.budgets)
    plan_lines = []
    prefill_s = 0.0
    for length, samples in samples_of.items():
        groups = groups_of(samples, capacity)
        tokens = sum(s.prompt_tokens for s in samples)
        seconds = sum(shapes.prefill_s(0, s.prompt_tokens) for s in samples)
        prefill_s += seconds
        plan_lines.append(
            f"{length}: {len(samples)} prompts, {tokens} tokens in {len(groups)} "
            f"group(s), prefill ~{seconds / 60:.0f} min"
        )
    log(
        f"{model_name}: {len(args.tasks)} tasks x {args.samples} sample(s), "
        f"{len(configs)} configurations; " + "; ".join(plan_lines)
    )
    if args.plan:
        return

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_gib))
    from vllm import LLM, SamplingParams

    options = {
        **args.engine_options,
        "policy": "dense",
        "min_blocks": 0,
        "sparse_min_tokens": 0,
    }
    llm = LLM(
        model=str(folder),
        dtype=args.dtype,
        enforce_eager=args.eager,
        attention_backend="INFINIGEN",
        additional_config={"infinigen": options},
        max_model_len=longest + 64,
        enable_prefix_caching=True,
        max_num_batched_tokens=2048,
        seed=0,
        **({} if args.block_size is None else {"block_size": args.block_size}),
    )
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    tracked = llm.collective_rpc("infinigen_track", args=(list(args.policies),))[0]
    log(f"engine ready (block size {block_size}); tracking {tracked}")

    def configure(config: Config) -> None:
        llm.collective_rpc(
            "infinigen_configure",
            args=({"policy": config.policy, "budget": config.budget},),
        )

    result: dict[str, Any] = {
        "command": "python benchmarks/ruler.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": cpu_model(),
        "commit": commit(),
        "model": str(folder),
        "model_name": model_name,
        "dtype": args.dtype,
        "block_size": block_size,
        "compiled": not args.eager,
        "tasks": list(args.tasks),
        "samples": args.samples,
        "seed": args.seed,
        "policies": list(args.policies),
        "budgets": list(args.budgets),
        "lengths": [],
    }
    for length, samples in samples_of.items():
        predictions: dict[str, list[str]] = {c.name: [] for c in configs}
        selected = dict.fromkeys(predictions, 0.0)
        total = dict.fromkeys(predictions, 0.0)
        cached = dict.fromkeys(predictions, 0)
        for g, group in enumerate(groups_of(samples, capacity), 1):
            prompts = [s.prompt for s in group]
            params = [
                SamplingParams(temperature=0.0, max_tokens=s.max_new_tokens)
                for s in group
            ]
            for config in configs:
                configure(config)
                llm.collective_rpc("infinigen_reset_stats")
                begun = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                stats = llm.collective_rpc("infinigen_stats")[0].get("total", {})
                predictions[config.name] += [o.outputs[0].text for o in outputs]
                selected[config.name] += stats.get("blocks_selected", 0)
                total[config.name] += stats.get("blocks_total", 0)
                hits = sum(o.num_cached_tokens or 0 for o in outputs)
                cached[config.name] += hits
                seconds = time.perf_counter() - begun
                log(
                    f"{length} group {g}: {config.name} ({seconds:.0f} s, "
                    f"{hits} cached prompt tokens)"
                )
        reads = {n: (selected[n] / total[n] if total[n] else 1.0) for n in predictions}
        scores = summarise(samples, predictions)
        result["lengths"].append(
            {
                "length": length,
                "scores": scores,
                "reads": reads,
                "prompt_tokens_cached": cached,
                "samples": [
                    {**{k: v for k, v in asdict(s).items() if k != "prompt"}}
                    for s in samples
                ],
                "predictions": predictions,
            }
        )
        print(table(length, scores, reads), flush=True)
        result["seconds"] = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(
            "\n\n".join(
                table(e["length"], e["scores"], e["reads"]) for e in result["lengths"]
            )
            + "\n"
        )
        plot(result, out.with_suffix(".png"))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
