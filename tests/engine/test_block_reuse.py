"""A block freed by one request and reused by another carries nothing over.

INFINIGEN keeps per-block state beside vLLM's KV blocks: partial keys,
residual sums, selection counters, and each tracked policy's metadata
(Quest's key bounds, H2O's accumulated mass). vLLM hands a freed block to
the next request without telling the backend; the backend must notice that
a block is written from its first slot again and restart its state.

One engine with a pool smaller than two requests together decodes a probe
request right after another request has freed its blocks (prefix caching
off), so the probe is written into the other request's blocks; a second
engine with a roomy pool decodes the same probe in blocks nobody used
before. At a 25% budget, with recall sampled at every step, the probe's
tokens, the blocks each layer read and the sampled recall of its selection
must be the same in both, for InfiniGen (residual sums, counters), Quest
(key bounds) and H2O (accumulated mass): stale state in a reused block
changes the scores, so the selection, so the recall.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.engine.prompts import code_prompt
from tests.engine.test_exact_backend import run_engine_script
from vllm_infinigen.models import kv_pool_gib

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("reuse_script.py")
POLICIES = ("infinigen", "quest", "h2o")
BLOCK = 32
MAX_TOKENS = 32
#: Tokens the request before the probe generates.
BEFORE_TOKENS = 8
#: The tight pool: room for the longest request (768 tokens) and two blocks.
TIGHT_POOL_TOKENS = 832


def _run(model: Path, prompts: dict[str, Any], tmp: Path, name: str, **kw: Any) -> Any:
    path = tmp / f"{name}.prompts.json"
    path.write_text(json.dumps(prompts))
    out = tmp / f"{name}.json"
    args = [
        "--model",
        str(model),
        "--prompts",
        str(path),
        "--out",
        str(out),
        "--policies",
        *POLICIES,
        "--max-tokens",
        str(MAX_TOKENS),
        "--before-tokens",
        str(BEFORE_TOKENS),
    ]
    for key, value in kw.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    run_engine_script(SCRIPT, args)
    return json.loads(out.read_text())


def test_reused_blocks_carry_nothing_into_the_next_selection(
    qwen_model_dir: Path, tmp_path: Path
) -> None:
    probe = code_prompt("shlex", 2000)
    before = code_prompt("fractions", 2400)
    reused = _run(
        qwen_model_dir,
        {"before": before, "probe": probe},
        tmp_path,
        "reused",
        pool_gib=kv_pool_gib(qwen_model_dir, TIGHT_POOL_TOKENS),
    )
    fresh = _run(qwen_model_dir, {"before": None, "probe": probe}, tmp_path, "fresh")

    tokens = reused["prompt_tokens"]
    blocks_before = math.ceil((tokens["before"] + BEFORE_TOKENS) / BLOCK)
    blocks_probe = math.ceil((tokens["probe"] + MAX_TOKENS) / BLOCK)
    # The probe cannot fit in blocks the other request never touched.
    assert reused["num_blocks"] < blocks_before + blocks_probe, (reused, tokens)
    assert fresh["num_blocks"] > len(POLICIES) * blocks_probe  # all fresh
    assert tokens["probe"] > 10 * BLOCK  # a 25% budget leaves blocks out

    for policy in POLICIES:
        got, want = reused["runs"][policy], fresh["runs"][policy]
        assert want["sparse_steps"] >= MAX_TOKENS - 1
        assert want["recall"]["count"] == want["sparse_steps"]
        total_read = sum(want["blocks_selected"].values())
        assert 0 < total_read < 0.5 * want["blocks_total"]  # it did select
        assert got["token_ids"] == want["token_ids"], (policy, got["text"])
        assert got["blocks_selected"] == want["blocks_selected"], policy
        assert got["recall"]["count"] == want["recall"]["count"], policy
        assert got["recall"]["sum"] == pytest.approx(want["recall"]["sum"], rel=1e-6), (
            policy
        )
