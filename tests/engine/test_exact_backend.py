"""INFINIGEN with a full budget matches vLLM's default CPU backend token for token.

With ``budget=1.0`` every block of every sparse layer is read. In the
default ``in_place`` placement the engine then takes vLLM's dense path (no
selection, nothing prepared); in the staging placement (``swap_mode``
``sync``, the GPU shape) every block is still copied into staging and
attended there through the compacted block table, so the whole staging path
runs. Both must equal dense attention.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHARED_DATA
from tests.engine.prompts import mixed_length_prompts

SCRIPT = Path(__file__).with_name("generate_script.py")
pytestmark = pytest.mark.slow


def run_engine(
    model: Path,
    backend: str,
    prompts_file: Path,
    out: Path,
    *,
    max_tokens: int = 32,
    max_model_len: int = 2048,
    stats: bool = False,
    tensor_parallel_size: int = 1,
    metrics: bool = False,
    compile: bool = False,
    **options: Any,
) -> tuple[dict[str, Any], str]:
    """Run ``generate_script.py`` in a fresh process; return its JSON and log."""
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--model",
        str(model),
        "--backend",
        backend,
        "--prompts",
        str(prompts_file),
        "--out",
        str(out),
        "--infinigen",
        json.dumps(options),
        "--max-tokens",
        str(max_tokens),
        "--max-model-len",
        str(max_model_len),
        *(["--stats"] if stats else []),
        "--tensor-parallel-size",
        str(tensor_parallel_size),
        *(["--metrics"] if metrics else []),
        *(["--compile"] if compile else []),
    ]
    env = {}
    if tensor_parallel_size > 1:
        # vLLM's CPU worker binds each rank's threads to one NUMA node unless
        # told otherwise; this machine has one node: one core per rank.
        cores = sorted(os.sched_getaffinity(0))[:tensor_parallel_size]
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(c) for c in cores)
    log = run_engine_script(SCRIPT, cmd[2:], env)
    return json.loads(out.read_text()), log


def run_engine_script(
    script: Path, args: list[str], extra_env: dict[str, str] | None = None
) -> str:
    """Run an engine script in a fresh process; return its log (fails the
    test with the log's tail if the script fails)."""
    # In-process engine core: requests reach the scheduler together, so batch
    # composition (and with it float summation order) is the same run to run;
    # with a separate engine process two dense runs can already differ.
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="2",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        **(extra_env or {}),
    )
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


@pytest.mark.parametrize("model_fixture", ["qwen_model_dir", "gemma_model_dir"])
def test_exact_backend_matches_default(
    model_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model: Path = request.getfixturevalue(model_fixture)
    prompts = mixed_length_prompts(SHARED_DATA)
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))

    # Qwen runs compiled, as users get it (vLLM compiles, INFINIGEN keeps
    # that reading in place), against vLLM's compiled default; Gemma runs
    # eagerly against vLLM's eager default, in place and through staging
    # (which needs eager mode).
    compiled = model_fixture == "qwen_model_dir"
    modes = ("in_place",) if compiled else ("in_place", "sync")
    dense, dense_log = run_engine(
        model, "default", prompts_file, tmp_path / "d.json", compile=compiled
    )
    counts = dense["prompt_token_counts"]
    assert max(counts) > 512, counts  # chunked at 256 and past Gemma's window
    assert any(128 < c <= 512 for c in counts), counts  # longer than a block
    assert "INFINIGEN attention backend active" not in dense_log
    for mode in modes:
        ours, our_log = run_engine(
            model,
            "infinigen",
            prompts_file,
            tmp_path / f"{mode}.json",
            stats=True,
            compile=compiled,
            budget=1.0,
            swap_mode=mode,
        )
        assert "INFINIGEN attention backend active" in our_log
        assert f"enforce_eager={not compiled}" in our_log
        if compiled:  # no pre-hook: the ahead step runs in the attention op
            assert "ahead step runs inside each sparse layer's attention" in our_log
        # sparse_min_tokens unset: the start-up probe measured this CPU; at
        # budget 1.0 no step is sparse whatever it measured.
        assert "INFINIGEN decode costs per layer on this CPU" in our_log
        costs = ours["stats"]["step_costs"]
        assert costs["dense_us_per_token"] > costs["read_us_per_token"] > 0
        assert ours["stats"]["sparse_min_tokens"] == float("inf")
        total = ours["stats"]["total"]
        # Every decode step of every sparse layer was counted, every block
        # read; in place nothing was selected or copied (vLLM's dense path),
        # through staging every block was copied.
        assert total["steps"] > 0
        assert total["blocks_selected"] == total["blocks_total"] > 0
        if mode == "in_place":
            assert total["dense_steps"] == total["steps"]
            assert total["bytes_swapped"] == 0
        else:
            assert total["dense_steps"] == 0
            assert total["bytes_swapped"] == total["kv_bytes_read"] > 0
        for i, (want, got) in enumerate(
            zip(dense["token_ids"], ours["token_ids"], strict=True)
        ):
            assert len(want) > 0
            assert got == want, (
                mode,
                compiled,
                i,
                dense["texts"][i],
                ours["texts"][i],
            )
