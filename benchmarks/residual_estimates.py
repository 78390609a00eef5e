"""How finely must the residual channels be summarised? Mass recall of
block-level residual estimates against the exact one (no vLLM).

The engine adds, per block and query head, the query's residual channels
against the block's *mean* residual key (``docs/method.md``, "Residual
block means"). This study asks whether a richer per-block summary would
close the rest of the gap to the oracle, by scoring the same sparse layers
of a real model with:

* ``none``: partial channels only;
* ``mean``: the engine's block mean (32 tokens);
* ``mean16`` / ``mean8``: means over 16- or 8-token segments of a block
  (2x / 4x the residual memory);
* ``variance``: the block mean plus the log-normal correction ``0.5 *
  scale^2 * sum_c q_c^2 var_c`` from per-channel variances (2x memory);
* ``bound``: the block mean moved a quarter of the way to the Quest-style
  upper bound from per-channel minima and maxima (3x memory);
* ``partial_ratio`` 0.4 / 0.5 with the block mean;
* ``exact``: every token's own residual logit (a check: equals the oracle
  up to the bfloat16 rounding of the partial keys).

Scores follow the engine's ``log_mass`` rule with the ``mean`` head
reduction and the layer's real query (the in-place default), written out
here over unpaged tensors; selection is the engine's ``select_blocks``.
Writes ``benchmarks/results/residual_estimates[_MODEL].json``:

    python benchmarks/residual_estimates.py [--model gemma3-270m] [--eval-tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from recall import EVAL_TEXT, RESULTS, load

from vllm_infinigen.method import hf_model
from vllm_infinigen.method.calibration import (
    CalibrationOptions,
    LayerCalibrationInput,
    build_speculators,
    fit_layer,
)
from vllm_infinigen.method.calibration_text import default_calibration_text
from vllm_infinigen.method.recall import (
    RecallInputs,
    attention_block_mass,
    oracle_selection,
    selection_mass,
)
from vllm_infinigen.method.selection import SelectionPolicy, select_blocks
from vllm_infinigen.method.speculator import LayerSpeculator

BLOCK = 32
BUDGETS = (0.1, 0.2, 0.3)
#: name -> (summary, its parameter)
ESTIMATES: dict[str, tuple[str, float]] = {
    "none": ("none", 0),
    "mean": ("segments", BLOCK),
    "mean16": ("segments", 16),
    "mean8": ("segments", 8),
    "variance": ("variance", 1.0),
    "bound": ("bound", 0.25),
    "exact": ("segments", 1),
}
RATIOS = (0.4, 0.5)


def scores(
    spec: LayerSpeculator,
    query: torch.Tensor,
    keys: torch.Tensor,
    seq_lens: torch.Tensor,
    summary: str,
    parameter: float,
) -> torch.Tensor:
    """``[R, num_kv_heads, M]`` log block masses (mean over a group's heads)."""
    scale = spec.head_dim**-0.5
    tokens = keys.shape[0]
    blocks = -(-tokens // BLOCK)
    padded = blocks * BLOCK
    group = spec.num_heads // spec.num_kv_heads
    num_reqs = query.shape[0]

    def per_head(t: torch.Tensor) -> torch.Tensor:  # [T, kv, c] -> [padded, H, c]
        out = torch.zeros(padded, t.shape[1], t.shape[2])
        out[:tokens] = t.float()
        return out.repeat_interleave(group, dim=1)

    k_part = per_head(spec.partial_keys(keys).to(torch.bfloat16))
    logits = scale * torch.einsum(
        "rhc,thc->rht", spec.partial_query(query).float(), k_part
    )
    valid = torch.arange(padded)[None, :] < seq_lens[:, None]  # [R, T]
    shift = torch.zeros(num_reqs, spec.num_heads, blocks)
    if summary != "none":
        q_res = spec.residual_query(query).float()
        k_res = per_head(spec.residual_keys(keys))
        for r in range(num_reqs):
            own = k_res * valid[r, :, None, None]
            mask = valid[r].float()
            if summary == "segments":
                width = int(parameter)
                count = mask.view(-1, width).sum(1).clamp(min=1)
                means = (
                    own.view(-1, width, *own.shape[1:]).sum(1) / count[:, None, None]
                )
                term = scale * torch.einsum("hc,shc->hs", q_res[r], means)
                logits[r] += term.repeat_interleave(width, dim=1)
                continue
            count = mask.view(blocks, BLOCK).sum(1).clamp(min=1)[:, None, None]
            mean = own.view(blocks, BLOCK, *own.shape[1:]).sum(1) / count
            term = scale * torch.einsum("hc,mhc->hm", q_res[r], mean)
            if summary == "variance":
                square = own.pow(2).view(blocks, BLOCK, *own.shape[1:]).sum(1) / count
                var = (square - mean.pow(2)).clamp(min=0)
                term += (
                    parameter
                    * 0.5
                    * scale**2
                    * torch.einsum("hc,mhc->hm", q_res[r].pow(2), var)
                )
            else:  # bound
                inf = torch.tensor(float("inf"))
                high = torch.where(valid[r, :, None, None], k_res, -inf)
                low = torch.where(valid[r, :, None, None], k_res, inf)
                high = high.view(blocks, BLOCK, *own.shape[1:]).amax(1)
                low = low.view(blocks, BLOCK, *own.shape[1:]).amin(1)
                high = torch.where(torch.isfinite(high), high, 0.0)
                low = torch.where(torch.isfinite(low), low, 0.0)
                q = q_res[r][None]
                upper = scale * torch.maximum(q * high, q * low).sum(-1).T
                term += parameter * (upper - term)
            shift[r] = term
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    block_lse = torch.logsumexp(
        logits.view(num_reqs, spec.num_heads, blocks, BLOCK), -1
    )
    block_lse = block_lse + shift
    log_mass = block_lse - torch.logsumexp(block_lse, -1, keepdim=True)
    grouped = log_mass.view(num_reqs, spec.num_kv_heads, group, blocks)
    return torch.logsumexp(grouped, 2) - math.log(group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--eval-file", type=Path, default=EVAL_TEXT)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    model, tok = load(args.model)
    projections = hf_model.attention_projections(model)
    calib = tok(default_calibration_text(), return_tensors="pt")["input_ids"][0][:2048]
    calib_xs = hf_model.capture_attention_inputs(model, calib)
    calib_inputs = [
        LayerCalibrationInput(p, x, torch.arange(calib.shape[0]))
        for p, x in zip(projections, calib_xs, strict=True)
    ]
    text = args.eval_file.read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt")["input_ids"][0][: args.eval_tokens]
    tokens = ids.shape[0]
    positions = torch.arange(tokens - args.positions, tokens)
    inputs = RecallInputs.from_attention_inputs(
        projections, hf_model.capture_attention_inputs(model, ids), positions
    )
    kinds = getattr(model.config, "layer_types", None) or []
    layers = [i for i, kind in enumerate(kinds) if kind == "full_attention" and i > 0]
    layers = layers or list(range(1, len(projections)))
    speculators = {
        ratio: build_speculators(
            projections,
            [
                fit_layer(i, CalibrationOptions(partial_ratio=ratio))
                for i in calib_inputs
            ],
        )
        for ratio in (0.3, *RATIOS)
    }
    series: dict[str, tuple[float, str, float]] = {
        name: (0.3, *spec) for name, spec in ESTIMATES.items()
    }
    series |= {f"ratio_{r}": (r, "segments", BLOCK) for r in RATIOS}
    seq_lens = positions + 1
    results: dict[str, Any] = {}
    with torch.no_grad():
        for budget in BUDGETS:
            policy = replace(SelectionPolicy(), budget_fraction=budget)
            row: dict[str, list[float]] = {"oracle": []}
            for name, (ratio, summary, parameter) in series.items():
                row[name] = []
                for layer in layers:
                    spec = speculators[ratio][layer]
                    query, keys = inputs.queries[layer], inputs.keys[layer]
                    chosen = select_blocks(
                        scores(spec, query, keys, seq_lens, summary, parameter),
                        seq_lens,
                        BLOCK,
                        policy,
                    )
                    mass = attention_block_mass(
                        query, keys, seq_lens, BLOCK, spec.head_dim**-0.5
                    )
                    row[name].append(float(selection_mass(mass, chosen).mean()))
                    if name == "none":
                        best = oracle_selection(mass, seq_lens, BLOCK, chosen.counts)
                        row["oracle"].append(float(selection_mass(mass, best).mean()))
            results[f"{budget:.1f}"] = row
            print(
                f"{budget:.0%}: "
                + "  ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in row.items()),
                flush=True,
            )
    suffix = "" if args.model == "qwen2.5-coder-0.5b" else f"_{args.model}"
    out = args.out or RESULTS / f"residual_estimates{suffix}.json"
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "eval_file": args.eval_file.name,
                "eval_tokens": tokens,
                "layers": layers,
                "seconds": time.perf_counter() - start,
                "recall": results,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
