"""``benchmarks/speed.py``: every decode rate is compared with the faster of
vLLM's engines, and the ``dense`` policy also with vLLM at its own block
size."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def speed() -> ModuleType:
    sys.modules.setdefault("workloads", load_benchmark("workloads.py"))
    return load_benchmark("speed.py")


def _stats(blocks_selected: int) -> dict[str, Any]:
    """An engine's counters: 4 decode requests over 2 sparse layers, 100
    blocks each per layer."""
    return {
        "block_bytes": 1000,
        "layers": {"1": {}, "2": {}},
        "total": {
            "decode_requests": 8,
            "blocks_total": 800,
            "blocks_selected": blocks_selected,
            "kv_bytes_read": blocks_selected * 1000,
            "selection_fraction": blocks_selected / 800,
            "dense_steps": 0,
            "steps": 8,
            "speculation_s": 0.1,
            "swap_s": 0.0,
            "attention_s": 0.5,
        },
    }


def _run(tok_s: float, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    run: dict[str, Any] = {
        "decode_tok_s": tok_s,
        "decode_s": 4.0,
        "token_ids": [[1, 2, 3]] * 4,
    }
    if stats is not None:
        run["stats"] = stats
    return run


def test_ratios_are_against_the_fastest_vllm_engine(speed: ModuleType) -> None:
    shape = {
        "context": 8192,
        "batch": 4,
        "runs": {
            "vllm-128": _run(20.0),
            "vllm-32": _run(16.0),
            "dense": _run(15.0, _stats(800)),
            "infinigen": _run(24.0, _stats(160)),
        },
        "short": _run(80.0),
    }
    rows, _ = speed.summarise(shape, num_layers=3, gbps=25.0, our_block=32)
    by = {r["policy"]: r for r in rows}
    assert [r["policy"] for r in rows][:2] == ["vllm-128", "vllm-32"]
    assert by["vllm-128"]["fastest_vllm"] and not by["vllm-32"]["fastest_vllm"]
    assert by["vllm-32"]["speed_ratio"] == pytest.approx(0.8)
    assert by["infinigen"]["speed_ratio"] == pytest.approx(1.2)
    # The dense policy against vLLM at the same block size, too.
    assert by["dense"]["speed_ratio"] == pytest.approx(0.75)
    assert by["dense"]["vs_same_block"] == pytest.approx(15.0 / 16.0)
    # The ceiling uses the fastest engine's step.
    assert by["infinigen"]["ceiling"] > 1.0

    # With the smaller block faster, it becomes the reference.
    shape["runs"]["vllm-32"] = _run(25.0)
    rows, _ = speed.summarise(shape, num_layers=3, gbps=25.0, our_block=32)
    by = {r["policy"]: r for r in rows}
    assert by["vllm-32"]["fastest_vllm"]
    assert by["infinigen"]["speed_ratio"] == pytest.approx(24.0 / 25.0)


def test_one_engine_per_distinct_block_size(speed: ModuleType) -> None:
    # vLLM's default (0) is 128 on CPU: asking for both starts one engine.
    assert speed.baseline_name(0) == speed.baseline_name(128) == "vllm-128"
    assert speed.is_baseline("vllm-32") and not speed.is_baseline("dense")
    # -1 is INFINIGEN's block size, known once its engine has started.
    assert speed.baseline_sizes([0, -1], our_block=32) == [0, 32]
    assert speed.baseline_sizes([0, -1], our_block=128) == [0]
    assert speed.baseline_sizes([0, 64, -1], our_block=64) == [0, 64]
    with pytest.raises(ValueError, match="--baseline-block-sizes: -2"):
        speed.baseline_sizes([0, -2], our_block=32)


def test_only_the_measured_policies_are_tracked(speed: ModuleType) -> None:
    assert speed.tracked_policies(["dense"]) == ["dense"]
    assert speed.tracked_policies(["infinigen-staging", "quest"]) == [
        "infinigen",
        "quest",
    ]
