"""Sparse decode at the default budget: in place equals staging, and
accuracy against dense vLLM.

One dense engine (vLLM's default CPU backend) and three INFINIGEN engines
(the default options: the ``in_place`` placement, scoring with each layer's
own query; the ``sync`` staging placement with the same query; in place
with the query speculated one layer ahead) run the same prompts: pass keys
hidden at several depths of ~2K tokens of filler, and ~2K-token
code-completion prompts from the Python standard library's sources,
chunked at 256 tokens so that decode and prefill rows share batches. Both
placements select the same blocks and run the same kernel over them, so
their tokens must be identical; the INFINIGEN engines must find every pass
key and stay close to dense greedy output on code, while reading a fraction
of the KV blocks (their counters say how many).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.engine.prompts import code_prompt, passkey_prompt
from tests.engine.test_exact_backend import run_engine
from vllm_infinigen.method.agreement import prefix_agreement

pytestmark = pytest.mark.slow

PASSKEY = 68413
DEPTHS = (0.1, 0.5, 0.9)
CODE_MODULES = ("textwrap", "argparse")
MAX_TOKENS = 24
#: Greedy agreement with dense on the code prompts: the share of the 24
#: generated tokens before the first difference (a strict measure: after one
#: different token the continuations go their own, still plausible, ways).
#: Measured on this machine at the defaults (budget 0.2, 32-token blocks,
#: 19% of blocks read): 0.21 (textwrap) and 0.46 (argparse), mean 0.33.
CODE_MATCH_FLOOR = 0.15


def _prompts() -> list[str]:
    prompts = [passkey_prompt(PASSKEY, d, filler_repeats=100) for d in DEPTHS]
    prompts += [code_prompt(m, 7000) for m in CODE_MODULES]
    return prompts


@pytest.fixture(scope="module")
def runs(
    qwen_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("sparse")
    prompts_file = tmp / "prompts.json"
    prompts_file.write_text(json.dumps(_prompts()))
    common = {"max_tokens": MAX_TOKENS, "max_model_len": 4096}
    # Select at every length: these steps hold fewer context tokens than
    # the CPU's default threshold for sparse steps.
    select = {"sparse_min_tokens": 0}
    dense, _ = run_engine(
        qwen_model_dir, "default", prompts_file, tmp / "dense.json", **common
    )
    sparse, log = run_engine(
        qwen_model_dir,
        "infinigen",
        prompts_file,
        tmp / "sparse.json",
        stats=True,
        **select,
        **common,
    )
    # Staging with the query in-place reads use by default (the layer's own):
    # the same blocks, so the same tokens.
    staged, _ = run_engine(
        qwen_model_dir,
        "infinigen",
        prompts_file,
        tmp / "staged.json",
        stats=True,
        swap_mode="sync",
        query_source="real",
        **select,
        **common,
    )
    # In place with the paper's speculation one layer ahead.
    ahead, _ = run_engine(
        qwen_model_dir,
        "infinigen",
        prompts_file,
        tmp / "ahead.json",
        stats=True,
        query_source="speculated",
        **select,
        **common,
    )
    return {
        "dense": dense,
        "sparse": sparse,
        "staged": staged,
        "ahead": ahead,
        "log": log,
    }


def test_in_place_reads_what_staging_copies(runs: dict[str, Any]) -> None:
    in_place, staged = runs["sparse"], runs["staged"]
    assert in_place["token_ids"] == staged["token_ids"]
    a, b = in_place["stats"]["total"], staged["stats"]["total"]
    assert a["blocks_selected"] == b["blocks_selected"] > 0
    assert a["bytes_swapped"] == 0 < b["bytes_swapped"]
    assert a["kv_bytes_read"] == b["kv_bytes_read"]


def test_prompts_are_long(runs: dict[str, Any]) -> None:
    counts = runs["dense"]["prompt_token_counts"]
    assert all(c > 1500 for c in counts), counts


@pytest.mark.parametrize("run", ["sparse", "ahead"])
def test_passkey_found_at_every_depth(runs: dict[str, Any], run: str) -> None:
    for depth, dense_text, text in zip(
        DEPTHS, runs["dense"]["texts"], runs[run]["texts"], strict=False
    ):
        assert str(PASSKEY) in dense_text, (depth, dense_text)
        assert str(PASSKEY) in text, (depth, text)


@pytest.mark.parametrize("run", ["sparse", "ahead"])
def test_code_completion_close_to_dense(runs: dict[str, Any], run: str) -> None:
    n = len(DEPTHS)
    rates = [
        prefix_agreement(d, s)
        for d, s in zip(
            runs["dense"]["token_ids"][n:], runs[run]["token_ids"][n:], strict=True
        )
    ]
    assert sum(rates) / len(rates) >= CODE_MATCH_FLOOR, rates
    assert all(rate > 0 for rate in rates), rates  # first token always agrees


def test_only_a_fraction_of_blocks_moved(runs: dict[str, Any]) -> None:
    total = runs["sparse"]["stats"]["total"]
    assert total["steps"] > 0
    assert 0.0 < total["selection_fraction"] < 0.5, total
    assert total["kv_bytes_read"] > 0
    assert "selected blocks read in place" in runs["log"]
    assert "INFINIGEN fused CPU block scoring ready" in runs["log"]
    # Every read prepared (one layer ahead, or at attention) was consumed.
    assert runs["sparse"]["stats"]["pending_reads"] == 0
    assert runs["ahead"]["stats"]["pending_reads"] == 0
    assert runs["ahead"]["stats"]["total"]["blocks_selected"] > 0
