"""``benchmarks/serve_bench.py``: the servers it starts, the baseline each row
is compared with, and the prompts it feeds ``vllm bench serve``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    # serve_bench.py imports its sibling as a script does (benchmarks/ on
    # sys.path when run as `python benchmarks/serve_bench.py`).
    sys.modules.setdefault("workloads", load_benchmark("workloads.py"))
    return load_benchmark("serve_bench.py")


def _args(**changes: object) -> argparse.Namespace:
    base = {
        "model": "qwen2.5-coder-0.5b",
        "shapes": ["2048x1", "8192x4"],
        "output_len": 128,
        "options": "{}",
    }
    return argparse.Namespace(**{**base, **changes})


def test_each_configuration_starts_the_server_it_names(bench: ModuleType) -> None:
    args = _args()
    vllm = bench.server_args("vllm", args, None)
    assert "--attention-backend" not in vllm and "--block-size" not in vllm
    # Long enough for the longest shape and its output.
    assert vllm[vllm.index("--max-model-len") + 1] == str(8192 + 128 + 64)
    at_ours = bench.server_args("vllm-bs", args, 32)
    assert at_ours[at_ours.index("--block-size") + 1] == "32"
    assert "--attention-backend" not in at_ours
    ours = bench.server_args("infinigen", args, None)
    assert ours[ours.index("--attention-backend") + 1] == "infinigen"
    assert "--additional-config" not in ours  # the defaults, as a user gets them
    dense = bench.server_args("dense", _args(options='{"budget": 0.1}'), None)
    config = json.loads(dense[dense.index("--additional-config") + 1])
    assert config == {"infinigen": {"budget": 0.1, "policy": "dense"}}


def test_rows_compare_with_the_faster_vllm_configuration(bench: ModuleType) -> None:
    def row(config: str, itl: float, ttft: float) -> dict[str, object]:
        return {
            "config": config,
            "shape": "8192x4",
            "dataset": "stdlib",
            "median_itl_ms": itl,
            "p95_itl_ms": itl * 1.2,
            "median_tpot_ms": itl,
            "p95_tpot_ms": itl * 1.1,
            "output_throughput": 1000.0 / itl,
            "median_ttft_ms": ttft,
        }

    rows = [row("vllm", 210.0, 100.0), row("vllm-bs", 200.0, 110.0)]
    rows.append(row("infinigen", 160.0, 105.0))
    bench.add_ratios(rows)
    ours = rows[-1]
    assert ours["baseline"] == "vllm-bs"
    assert ours["speedup_median_itl_ms"] == pytest.approx(200.0 / 160.0)
    assert ours["speedup_output_throughput"] == pytest.approx(200.0 / 160.0)
    assert ours["ttft_ratio"] == pytest.approx(105.0 / 110.0)
    assert "| 8192x4 | stdlib | infinigen | 160.0 |" in bench.table(rows)


def test_prompts_are_distinct_texts_of_the_asked_length(
    bench: ModuleType, qwen_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    workloads = sys.modules["workloads"]
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_model_dir))
    for source in ("stdlib", "pg19"):
        prompts = workloads.distinct_prompts(tokenizer, source, 1024, 3)
        assert len(set(prompts)) == 3
        for prompt in prompts:
            count = len(tokenizer(prompt)["input_ids"])
            assert abs(count - 1024) <= 16, (source, count)
