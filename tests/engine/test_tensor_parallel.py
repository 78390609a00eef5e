"""INFINIGEN at tensor parallel size 2 (vLLM's multiprocessing executor).

Each rank calibrates nothing of its own: it takes its query heads' rows of
the calibrated query projection and its KV heads' skew, keeps partial keys
for its own KV heads, and selects for its own heads; ``collective_rpc``
returns one set of counters per rank.

* Budget 1.0 through the staging placement (every block copied and attended
  through the compacted block table) is token-identical to vLLM's default
  CPU backend at the same TP size: on Qwen (2 KV heads, one per rank) and
  on Gemma 3 (1 KV head, replicated on both ranks).
* At the default budget with the query speculated one layer ahead (each
  rank's slice of ``W_q``), a pass key in ~2K tokens of filler is found at
  TP=2 as it is at TP=1, and both ranks select a fraction of the blocks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHARED_DATA
from tests.engine.prompts import mixed_length_prompts, passkey_prompt
from tests.engine.test_exact_backend import run_engine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        len(os.sched_getaffinity(0)) < 2, reason="tensor parallel 2 needs 2 cores"
    ),
]

TP = 2
PASSKEY = 52917
SPARSE = {"sparse_min_tokens": 0, "query_source": "speculated"}


def _prompts() -> list[str]:
    return mixed_length_prompts(SHARED_DATA) + [
        passkey_prompt(PASSKEY, 0.4, filler_repeats=100)
    ]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tp") / "prompts.json"
    path.write_text(json.dumps(_prompts()))
    return path


def _exact_runs(
    model: Path, prompts: Path
) -> tuple[dict[str, Any], dict[str, Any], str]:
    common = {"max_tokens": 16, "max_model_len": 4096, "tensor_parallel_size": TP}
    dense, _ = run_engine(
        model, "default", prompts, prompts.with_name("d.json"), **common
    )
    ours, log = run_engine(
        model,
        "infinigen",
        prompts,
        prompts.with_name("ours.json"),
        stats=True,
        budget=1.0,
        swap_mode="sync",
        **common,
    )
    return dense, ours, log


@pytest.mark.parametrize("model_fixture", ["qwen_model_dir", "gemma_model_dir"])
def test_full_budget_matches_default_backend_at_tp2(
    model_fixture: str, request: pytest.FixtureRequest, prompts_file: Path
) -> None:
    model: Path = request.getfixturevalue(model_fixture)
    dense, ours, log = _exact_runs(model, prompts_file)
    assert "INFINIGEN attention backend active" in log
    assert "tensor-parallel rank 1 of 2" in log
    ranks = ours["rank_stats"]
    assert len(ranks) == TP
    for snapshot in ranks:
        total = snapshot["total"]
        # Every block of every sparse layer copied into staging, on each rank.
        assert total["blocks_selected"] == total["blocks_total"] > 0
        assert total["bytes_swapped"] == total["kv_bytes_read"] > 0
    assert max(dense["prompt_token_counts"]) > 1500
    for i, (want, got) in enumerate(
        zip(dense["token_ids"], ours["token_ids"], strict=True)
    ):
        assert len(want) > 0
        assert got == want, (i, dense["texts"][i], ours["texts"][i])


def test_sparse_retrieval_at_tp2_as_at_tp1(
    qwen_model_dir: Path, prompts_file: Path
) -> None:
    passkey_only = prompts_file.with_name("passkey.json")
    passkey_only.write_text(json.dumps(_prompts()[-1:]))
    common = {"max_tokens": 12, "max_model_len": 4096, "stats": True, **SPARSE}
    one, _ = run_engine(
        qwen_model_dir,
        "infinigen",
        passkey_only,
        passkey_only.with_name("tp1.json"),
        **common,
    )
    two, log = run_engine(
        qwen_model_dir,
        "infinigen",
        passkey_only,
        passkey_only.with_name("tp2.json"),
        tensor_parallel_size=TP,
        **common,
    )
    assert str(PASSKEY) in one["texts"][0], one["texts"]
    assert str(PASSKEY) in two["texts"][0], two["texts"]
    # Each rank's share as vLLM splits the model's heads (Qwen: 2 KV heads,
    # one per rank).
    config = json.loads((qwen_model_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    assert kv_heads % TP == 0
    for rank in range(TP):
        q0, kv0 = rank * heads // TP, rank * kv_heads // TP
        q1, kv1 = q0 + heads // TP - 1, kv0 + kv_heads // TP - 1
        assert (
            f"rank {rank} of {TP} speculates for query heads {q0}..{q1} "
            f"and KV heads {kv0}..{kv1}"
        ) in log
    ranks = two["rank_stats"]
    assert len(ranks) == TP
    whole = one["stats"]["total"]
    for snapshot in ranks:
        total = snapshot["total"]
        assert total["steps"] == whole["steps"] > 0
        assert 0 < total["selection_fraction"] < 0.5, total
