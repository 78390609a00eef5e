"""Attention-mass recall of InfiniGen block speculation on a real model (no vLLM).

Loads Qwen2.5-Coder-0.5B with transformers on CPU, calibrates on the default
calibration text (Python standard library source), evaluates on a different
text (the public-domain book excerpt in ``../shared/data``), and reports per
layer the share of the true attention mass that the speculated block set
holds, next to the oracle, random and sink+recent-window sets of the same
size. Writes ``benchmarks/results/recall.json`` and ``recall.png`` (``--quick``:
``recall_quick.json`` and ``recall_quick.png``):

    python benchmarks/recall.py            # full grid (2-7 min on 2 cores)
    python benchmarks/recall.py --quick    # headline settings (~2 min)
    python benchmarks/recall.py --study selection [--model gemma3-270m]
    python benchmarks/recall.py --study selection --eval-file FILE --eval-tokens 4096

``--study selection`` (``recall_selection[_MODEL].json``, no plot) compares
the selection variants of ``docs/method.md`` at 10/20/30% with the engine's
in-place default, the layer's real query: score rule and head reduction,
the recent window, the partial channels' criterion and ratio, and the
speculated query. On a model with sliding-window layers only its
full-attention layers (the sparse ones) are reported.

Every decode request is one of the last ``--positions`` tokens of the
evaluation text, scored through the paged path (permuted block table) as the
engine would. Layer 0 has no previous layer and runs dense, so layers
1..N-1 are reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vllm_infinigen.method import hf_model
from vllm_infinigen.method.calibration import (
    CalibrationOptions,
    LayerCalibrationInput,
    build_speculators,
    fit_layer,
)
from vllm_infinigen.method.calibration_text import default_calibration_text
from vllm_infinigen.method.recall import LayerRecall, RecallInputs, evaluate_recall
from vllm_infinigen.method.scoring import BlockScoreRule
from vllm_infinigen.method.selection import HeadReduction, SelectionPolicy
from vllm_infinigen.method.skew import ChannelCriterion
from vllm_infinigen.method.speculator import LayerSpeculator

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
EVAL_TEXT = REPO.parent / "shared" / "data" / "pg19_firstbook.txt"
DEFAULT_MODEL = "qwen2.5-coder-0.5b"

logger = logging.getLogger("recall")


@dataclass(frozen=True)
class Variant:
    """A calibration variant."""

    partial_ratio: float
    skew: bool
    criterion: ChannelCriterion = ChannelCriterion.QUERY

    @property
    def name(self) -> str:
        skew = "skew" if self.skew else "noskew"
        return f"r{self.partial_ratio}-{skew}-{self.criterion.value}"


@dataclass(frozen=True)
class Setting:
    """One evaluated point of the grid."""

    variant: Variant
    block_size: int
    policy: SelectionPolicy
    group: str
    real_query: bool = False


def model_dir(name: str) -> Path:
    """The built model folder (does not build it)."""
    from vllm_infinigen.models import is_built, model_path

    if not is_built(name):
        raise SystemExit(f"model {name} is not built at {model_path(name)}")
    return model_path(name)


def load(name: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(name)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    return model, AutoTokenizer.from_pretrained(path)


RULES = {
    # the brief's rule: max partial logit over tokens and heads, per-head union
    "max": (BlockScoreRule.MAX, HeadReduction.PER_HEAD),
    # estimated block attention mass, averaged over all query heads
    "mass": (BlockScoreRule.LOG_MASS, HeadReduction.MEAN),
}


def policy(
    rule: str, alpha: float, budget: float, sink: int = 1, recent: int = 1
) -> SelectionPolicy:
    score_rule, reduction = RULES[rule]
    return SelectionPolicy(
        alpha=alpha,
        budget_fraction=budget,
        sink_blocks=sink,
        recent_blocks=recent,
        head_reduction=reduction,
        score_rule=score_rule,
    )


def grid(quick: bool) -> list[Setting]:
    """The settings measured (quick: the headline comparison only)."""
    main = Variant(0.3, True)  # the default calibration
    variants = [main, Variant(0.3, False), Variant(0.2, True), Variant(0.2, False)]
    if not quick:
        variants += [
            Variant(0.1, True),
            Variant(0.1, False),
            Variant(0.2, True, ChannelCriterion.QUERY_KEY),
            Variant(0.2, False, ChannelCriterion.QUERY_KEY),
        ]
    settings = []
    inf = math.inf
    for bs in (16, 32):
        # The library defaults (SelectionPolicy(), CalibrationOptions()).
        for budget in (0.2, 0.3):
            default = replace(SelectionPolicy(), budget_fraction=budget)
            settings.append(Setting(main, bs, default, "default"))
        # Fixed budget: every block is a candidate, the budget decides the size.
        for variant in variants:
            for rule in RULES:
                for budget in (0.2, 0.3):
                    settings.append(
                        Setting(variant, bs, policy(rule, inf, budget), "budget")
                    )
        # Alpha: candidates within alpha of the best block, capped by budget.
        alphas = (4.0, 8.0) if quick else (2.0, 4.0, 6.0, 8.0, 10.0)
        budgets = (0.3,) if quick else (0.2, 0.3, 1.0)
        for rule in RULES:
            for alpha in alphas:
                for budget in budgets:
                    settings.append(
                        Setting(main, bs, policy(rule, alpha, budget), "alpha")
                    )
        if quick:
            continue
        for budget in (0.2, 0.3):
            for rule, reduction in (
                ("max", HeadReduction.MAX),
                ("max", HeadReduction.MEAN),
                ("mass", HeadReduction.PER_HEAD),
                ("mass", HeadReduction.MAX),
            ):
                p = replace(policy(rule, inf, budget), head_reduction=reduction)
                settings.append(Setting(main, bs, p, "head_reduction"))
            for sink, recent in ((0, 0), (0, 1), (2, 2), (1, 4)):
                p = policy("mass", inf, budget, sink, recent)
                settings.append(Setting(main, bs, p, "sink_recent"))
    return settings


def selection_study() -> list[Setting]:
    """Issue-11 variants, each against the default at the same budget."""
    main = Variant(0.3, True)
    settings = []
    for budget in (0.1, 0.2, 0.3):
        default = replace(SelectionPolicy(), budget_fraction=budget)
        changes: list[tuple[str, Variant, SelectionPolicy, bool]] = [
            ("default", main, default, True),
            ("speculated", main, default, False),
            (
                "per_head",
                main,
                replace(default, head_reduction=HeadReduction.PER_HEAD),
                True,
            ),
            (
                "head_max",
                main,
                replace(default, head_reduction=HeadReduction.MAX),
                True,
            ),
            (
                "query_key",
                Variant(0.3, True, ChannelCriterion.QUERY_KEY),
                default,
                True,
            ),
            (
                "query_key_spread",
                Variant(0.3, True, ChannelCriterion.QUERY_KEY_SPREAD),
                default,
                True,
            ),
            ("ratio_0.5", Variant(0.5, True), default, True),
            ("no_residual", main, replace(default, residual=False), True),
            (
                "ratio_0.5_no_residual",
                Variant(0.5, True),
                replace(default, residual=False),
                True,
            ),
            ("ratio_0.2", Variant(0.2, True), default, True),
        ]
        for group, variant, pol, real in changes:
            settings.append(Setting(variant, 32, pol, group, real))
    return settings


def summarise(per_layer: dict[int, LayerRecall]) -> dict[str, Any]:
    layers = sorted(per_layer)
    out: dict[str, Any] = {"layers": layers}
    for field in ("method", "oracle", "random", "window", "fraction"):
        values = [float(getattr(per_layer[i], field).mean()) for i in layers]
        out[field] = values
        out[f"mean_{field}"] = sum(values) / len(values)
    out["min_method"] = min(out["method"])
    return out


def policy_dict(policy: SelectionPolicy) -> dict[str, Any]:
    return {
        "alpha": policy.alpha if math.isfinite(policy.alpha) else "inf",
        "budget_fraction": policy.budget_fraction,
        "max_blocks": policy.max_blocks,
        "sink_blocks": policy.sink_blocks,
        "recent_blocks": policy.recent_blocks,
        "head_reduction": policy.head_reduction.value,
        "score_rule": policy.score_rule.value,
        "residual": policy.residual,
    }


def selection_table(results: list[dict[str, Any]]) -> str:
    """Markdown: mean / worst-layer recall of each variant per budget."""
    budgets = sorted({r["policy"]["budget_fraction"] for r in results})
    groups = list(dict.fromkeys(r["group"] for r in results))
    head = "| variant | " + " | ".join(f"{b:.0%}: mean / worst layer" for b in budgets)
    lines = [head + " |", "|---" * (len(budgets) + 1) + "|"]
    for group in groups:
        cells = []
        for b in budgets:
            (r,) = [
                x
                for x in results
                if x["group"] == group and x["policy"]["budget_fraction"] == b
            ]
            s = r["summary"]
            cells.append(f"{s['mean_method']:.3f} / {s['min_method']:.3f}")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    oracle = [
        next(
            x["summary"]["mean_oracle"]
            for x in results
            if x["group"] == "default" and x["policy"]["budget_fraction"] == b
        )
        for b in budgets
    ]
    lines.append(
        "| (oracle, same size) | " + " | ".join(f"{o:.3f}" for o in oracle) + " |"
    )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def find(bs: int, variant: str, budget: float, rule: str) -> dict[str, Any]:
        for r in results:
            p = r["policy"]
            if (
                r["group"] == "budget"
                and r["block_size"] == bs
                and r["variant"] == variant
                and p["budget_fraction"] == budget
                and p["score_rule"] == rule
            ):
                return r
        raise KeyError((bs, variant, budget, rule))

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey=True)
    for row, budget in enumerate((0.2, 0.3)):
        for col, bs in enumerate((16, 32)):
            ax = axes[row][col]
            s = find(bs, "r0.3-skew-query", budget, "log_mass")["summary"]
            noskew = find(bs, "r0.3-noskew-query", budget, "log_mass")["summary"]
            maxrule = find(bs, "r0.3-skew-query", budget, "max")["summary"]
            r02 = find(bs, "r0.2-skew-query", budget, "log_mass")["summary"]
            layers = s["layers"]
            ax.plot(layers, s["oracle"], "k--", label="oracle top-k")
            ax.plot(layers, s["method"], "o-", label="default: skew, r=0.3, log-mass")
            ax.plot(layers, noskew["method"], "s-", label="no skew, r=0.3")
            ax.plot(layers, r02["method"], "v-", label="skew, r=0.2")
            ax.plot(layers, maxrule["method"], "d-", label="skew, r=0.3, max rule")
            ax.plot(layers, s["window"], "^:", label="sink + recent window")
            ax.plot(layers, s["random"], "x:", label="random")
            ax.set_title(f"block size {bs}, budget {budget:.0%} of blocks")
            ax.set_xlabel("layer")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("attention-mass recall")
    axes[1][0].set_ylabel("attention-mass recall")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Qwen2.5-Coder-0.5B: share of true attention mass in selected blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few settings")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--eval-tokens", type=int, default=1536)
    parser.add_argument(
        "--eval-file",
        type=Path,
        default=EVAL_TEXT,
        help="evaluation text (default: the PG-19 excerpt; e.g. a standard-library "
        "module's source for code at 4K tokens)",
    )
    parser.add_argument("--positions", type=int, default=None)
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--study",
        choices=["grid", "selection"],
        default="grid",
        help="grid: calibration and rule grid; selection: the selection variants",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    positions = args.positions or (8 if args.quick else 16)

    t0 = time.perf_counter()
    model, tok = load(args.model)
    projections = hf_model.attention_projections(model)
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    calib_ids = tok(default_calibration_text(), return_tensors="pt")["input_ids"][0]
    calib_ids = calib_ids[: args.calib_tokens]
    calib_xs = hf_model.capture_attention_inputs(model, calib_ids)
    calib_pos = torch.arange(calib_ids.shape[0])
    calib_inputs = [
        LayerCalibrationInput(p, x, calib_pos)
        for p, x in zip(projections, calib_xs, strict=True)
    ]
    t_calib_forward = time.perf_counter() - t0

    eval_ids = tok(args.eval_file.read_text(encoding="utf-8"), return_tensors="pt")
    eval_ids = eval_ids["input_ids"][0][: args.eval_tokens]
    tokens = eval_ids.shape[0]
    eval_positions = torch.arange(tokens - positions, tokens)
    t0 = time.perf_counter()
    eval_xs = hf_model.capture_attention_inputs(model, eval_ids)
    inputs = RecallInputs.from_attention_inputs(projections, eval_xs, eval_positions)
    t_eval_forward = time.perf_counter() - t0

    settings = selection_study() if args.study == "selection" else grid(args.quick)
    # Sliding-window layers (Gemma 3) stay dense in the engine: not reported.
    kinds = getattr(model.config, "layer_types", None)
    reported = [
        i for i, kind in enumerate(kinds or []) if kind == "full_attention"
    ] or None
    speculators: dict[Variant, list[LayerSpeculator]] = {}
    fit_seconds: dict[str, float] = {}
    results = []
    t0 = time.perf_counter()
    for setting in settings:
        variant = setting.variant
        if variant not in speculators:
            t_fit = time.perf_counter()
            options = CalibrationOptions(
                partial_ratio=variant.partial_ratio,
                criterion=variant.criterion,
                skew=variant.skew,
                max_tokens=args.calib_tokens,
            )
            skews = [fit_layer(inp, options) for inp in calib_inputs]
            speculators[variant] = build_speculators(projections, skews)
            fit_seconds[variant.name] = time.perf_counter() - t_fit
        per_layer = evaluate_recall(
            speculators[variant],
            inputs,
            setting.policy,
            setting.block_size,
            real_query=setting.real_query,
        )
        if reported is not None:
            per_layer = {i: r for i, r in per_layer.items() if i in reported}
        summary = summarise(per_layer)
        results.append(
            {
                "group": setting.group,
                "variant": variant.name,
                "partial_ratio": variant.partial_ratio,
                "skew": variant.skew,
                "criterion": variant.criterion.value,
                "d_partial": speculators[variant][1].d_partial,
                "block_size": setting.block_size,
                "real_query": setting.real_query,
                "policy": policy_dict(setting.policy),
                "summary": summary,
            }
        )
        logger.info(
            "%-13s %-24s bs=%2d %-40s recall %.3f oracle %.3f random %.3f window %.3f "
            "at %.1f%% of blocks (min layer %.3f)",
            setting.group,
            variant.name,
            setting.block_size,
            str(policy_dict(setting.policy)),
            summary["mean_method"],
            summary["mean_oracle"],
            summary["mean_random"],
            summary["mean_window"],
            100 * summary["mean_fraction"],
            summary["min_method"],
        )
    t_eval = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "eval_text": args.eval_file.name,
        "eval_tokens": tokens,
        "eval_positions": eval_positions.tolist(),
        "calibration_text": "stdlib (default_calibration_text)",
        "calibration_tokens": int(calib_ids.shape[0]),
        "quick": args.quick,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "seconds": {
            "load": t_load,
            "calibration_forward": t_calib_forward,
            "fit_per_variant": fit_seconds,
            "eval_forward": t_eval_forward,
            "evaluation": t_eval,
        },
        "results": results,
    }
    if args.study == "selection":
        suffix = "" if args.model == DEFAULT_MODEL else f"_{args.model}"
        if args.eval_file != EVAL_TEXT:
            suffix += f"_{args.eval_file.stem}_{tokens}"
        json_path = args.out / f"recall_selection{suffix}.json"
        json_path.write_text(json.dumps(report, indent=1))
        print(selection_table(results))
        logger.info("wrote %s", json_path)
        return
    name = "recall_quick" if args.quick else "recall"
    json_path = args.out / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=1))
    plot(results, args.out / f"{name}.png")
    logger.info("wrote %s", json_path)


if __name__ == "__main__":
    main()
