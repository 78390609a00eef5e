"""Every selection policy runs on the same engine path and keeps its budget.

One INFINIGEN engine tracks all policies' device metadata, prefills a
~1.5K-token pass-key prompt once, then decodes it under each policy at a 20%
budget (``tests/engine/policy_script.py``). Per sparse layer and step a
request of ``n`` blocks may read ``max(ceil(0.2 n), min(n, min_blocks))``
blocks: the peer policies (pure top-k) read exactly that, InfiniGen at most
that (its ``alpha`` threshold may prune), dense every block.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.engine.prompts import passkey_prompt
from tests.engine.test_exact_backend import run_engine_script

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("policy_script.py")
PASSKEY = 68413
BUDGET = 0.2
MAX_TOKENS = 8
BLOCK = 32
MIN_BLOCKS = 8  # the config default
PEERS = ("quest", "h2o", "streaming")


@pytest.fixture(scope="module")
def result(qwen_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("policies")
    prompts = tmp / "prompts.json"
    prompts.write_text(json.dumps([passkey_prompt(PASSKEY, 0.5, filler_repeats=60)]))
    out = tmp / "result.json"
    run_engine_script(
        SCRIPT,
        [
            "--model",
            str(qwen_model_dir),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--budget",
            str(BUDGET),
            "--max-tokens",
            str(MAX_TOKENS),
        ],
    )
    return json.loads(out.read_text())


def _budget_sum(prompt_tokens: int, steps: int) -> tuple[int, int]:
    """Blocks a request may read and blocks it has, summed over its decode
    steps (the first generated token comes from the dense prefill)."""
    allowed = total = 0
    for i in range(steps):
        n = math.ceil((prompt_tokens + 1 + i) / BLOCK)
        allowed += max(math.ceil(BUDGET * n - 1e-6), min(n, MIN_BLOCKS))
        total += n
    return allowed, total


def test_each_policy_keeps_its_budget(result: Any) -> None:
    prompt_tokens = result["prompt_token_counts"][0]
    assert prompt_tokens > 40 * BLOCK  # long enough for the budget to bite
    allowed, total = _budget_sum(prompt_tokens, MAX_TOKENS - 1)
    for policy, run in result["runs"].items():
        assert run["options"]["policy"] == policy
        layers = run["stats"]["layers"]
        assert len(layers) == 23, policy  # every layer but layer 0 is sparse
        for index, layer in layers.items():
            assert layer["steps"] == MAX_TOKENS - 1, (policy, index)
            assert layer["blocks_total"] == total, (policy, index)
            selected = layer["blocks_selected"]
            if policy == "dense":
                assert selected == total, (policy, index)
            elif policy == "infinigen":
                assert 0 < selected <= allowed, (policy, index)
            else:
                assert selected == allowed, (policy, index)


def test_policies_answer_from_the_right_blocks(result: Any) -> None:
    runs = result["runs"]
    # Dense and the query-aware policies find the key hidden mid-prompt.
    for policy in ("dense", "infinigen", "quest"):
        assert str(PASSKEY) in runs[policy]["texts"][0], (policy, runs[policy])
    # Policies differ only in the blocks they choose: the windowed policy
    # reads the sink and newest blocks, which cannot hold a mid-prompt key.
    assert (
        runs["streaming"]["stats"]["total"]["blocks_selected"]
        == (runs["quest"]["stats"]["total"]["blocks_selected"])
    )


def test_device_metadata_costs(result: Any) -> None:
    """Per sparse layer: Quest's bounds are 1/block_size of the KV bytes,
    H2O's mass is two floats per block and KV head, InfiniGen's partial keys
    (Qwen's default: whole keys packed at 4 bits) 34 bytes per token and KV
    head (32 of codes for head_dim 64, a float16 scale) against the 512 of
    this float32 model's key and value."""
    stats = result["runs"]["dense"]["stats"]
    host = stats["host_kv_bytes"]
    assert stats["key_bounds_bytes"] * BLOCK == host
    blocks_heads = host // (BLOCK * 2 * 64 * 4)  # float32, head_dim 64
    assert stats["h2o_mass_bytes"] == 2 * 4 * blocks_heads
    assert stats["partial_cache_bytes"] * 2 * 64 * 4 == host * 34


def test_h2o_prefill_mass_counts_each_prompt_row_once(result: Any) -> None:
    """Every run re-prefills the prompt's last block from the prefix cache;
    the prefill mass that a reconfigure restores must not grow with it."""
    masses = [run["stats"]["h2o_prefill_mass"] for run in result["runs"].values()]
    assert masses[0] > 0
    assert max(masses) - min(masses) <= 1e-4 * masses[0], masses


def test_runtime_options_are_validated(result: Any) -> None:
    errors = result["errors"]
    assert "'partial_ratio' is fixed at start-up" in errors["fixed"]
    assert "'policy' must be one of" in errors["policy"] and "quest" in errors["policy"]
    assert "'budget' must be a number in (0.0, 1.0]" in errors["budget"]
