"""Exactness under KV-pool pressure: preempted and recomputed requests.

Four code-completion requests whose prompts and outputs together need more
KV blocks than a deliberately small pool holds run once with a roomy pool
and once with the small one, where vLLM must preempt running requests
(freeing their blocks) and recompute them later. INFINIGEN's device tier
(partial keys, residual sums, policy metadata, counters) follows vLLM's
blocks through free, reuse and recompute: at budget 1.0 through the staging
placement, where every block of every sparse layer is copied and attended
through INFINIGEN's own block table, the greedy tokens under pressure equal
those with room, and vLLM's own counter says preemptions happened.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.engine.prompts import code_prompt
from tests.engine.test_exact_backend import run_engine
from vllm_infinigen.models import kv_pool_gib

pytestmark = pytest.mark.slow

MODULES = ("textwrap", "argparse", "shlex", "fractions")
MAX_TOKENS = 160
#: Tokens the small pool holds: the four requests reach 310-350 tokens each
#: (prompts of 150-200 tokens), and one request needs at most 768.
SMALL_POOL_TOKENS = 1100


def _run(model: Path, prompts: Path, name: str, **kwargs: Any) -> dict[str, Any]:
    result, _ = run_engine(
        model,
        "infinigen",
        prompts,
        prompts.with_name(f"{name}.json"),
        max_tokens=MAX_TOKENS,
        max_model_len=768,
        stats=True,
        metrics=True,
        **kwargs,
    )
    return result


def test_preempted_requests_recompute_to_the_same_tokens(
    qwen_model_dir: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([code_prompt(m, 700) for m in MODULES]))
    options = {"budget": 1.0, "swap_mode": "sync"}
    roomy = _run(qwen_model_dir, prompts, "roomy", **options)
    tight = _run(
        qwen_model_dir,
        prompts,
        "tight",
        host_pool_gib=kv_pool_gib(qwen_model_dir, SMALL_POOL_TOKENS),
        **options,
    )
    assert roomy["metrics"].get("vllm:num_preemptions", 0) == 0
    assert tight["metrics"]["vllm:num_preemptions"] > 0, tight["metrics"]
    for total in (roomy["stats"]["total"], tight["stats"]["total"]):
        assert total["blocks_selected"] == total["blocks_total"] > 0
    for i, (want, got) in enumerate(
        zip(roomy["token_ids"], tight["token_ids"], strict=True)
    ):
        assert len(want) == MAX_TOKENS
        assert got == want, (MODULES[i], roomy["texts"][i], tight["texts"][i])
