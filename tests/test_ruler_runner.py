"""``benchmarks/ruler.py``: how the RULER runner groups prompts for the KV
cache, orders its configurations, scores answers and checks its arguments
(the engine run itself is ``python benchmarks/ruler.py --quick``)."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def ruler() -> ModuleType:
    sys.modules.setdefault("workloads", load_benchmark("workloads.py"))
    sys.modules.setdefault("ruler_tasks", load_benchmark("ruler_tasks.py"))
    sys.modules.setdefault("accuracy", load_benchmark("accuracy.py"))
    return load_benchmark("ruler.py")


def _sample(ruler: ModuleType, task: str, tokens: int, answers: list[str]) -> Any:
    return ruler.Sample(
        task=task,
        index=0,
        prompt="...",
        answers=answers,
        max_new_tokens=100,
        metric="all",
        depths=[],
        answer_prefix="",
        prompt_tokens=tokens,
        context_tokens=tokens + 100,
        haystack_size=1,
    )


def test_groups_fit_the_cache_and_keep_every_prompt_in_order(
    ruler: ModuleType,
) -> None:
    samples = [_sample(ruler, "vt", t, ["X"]) for t in (900, 900, 900, 3000, 100)]
    groups = ruler.groups_of(samples, capacity_tokens=2000)
    assert [len(g) for g in groups] == [2, 1, 1, 1]
    # The 3000-token prompt is over the capacity alone: a group of its own.
    assert [s for g in groups for s in g] == samples
    for group in groups:
        used = sum(s.prompt_tokens + s.max_new_tokens for s in group)
        assert used <= 2000 or len(group) == 1


def test_dense_runs_first_so_that_it_prefills(ruler: ModuleType) -> None:
    configs = ruler.configs_of(["infinigen", "quest"], [0.1, 0.2])
    assert [c.name for c in configs] == [
        "dense",
        "infinigen@0.1",
        "infinigen@0.2",
        "quest@0.1",
        "quest@0.2",
    ]


def test_scores_are_rulers_task_means_and_their_mean(ruler: ModuleType) -> None:
    samples = [
        _sample(ruler, "niah_multivalue", 10, ["1234", "5678"]),
        _sample(ruler, "niah_multivalue", 10, ["4321", "8765"]),
        _sample(ruler, "vt", 10, ["ABCDE"]),
    ]
    predictions = {
        "dense": ["1234 and 5678", "4321, 8765", "abcde"],
        "infinigen@0.1": ["1234 only", "none", "FGHIJ"],
    }
    scores = ruler.summarise(samples, predictions)
    assert scores["dense"] == {"niah_multivalue": 100.0, "vt": 100.0, "mean": 100.0}
    # string_match_all: half of the first sample's values, none of the rest.
    assert scores["infinigen@0.1"] == {
        "niah_multivalue": 25.0,
        "vt": 0.0,
        "mean": 12.5,
    }
    text = ruler.table(4096, scores, {"dense": 1.0, "infinigen@0.1": 0.11})
    assert "| infinigen@0.1 | 0.11 | 12.5 | 25 | 0 |" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "qa_1"], "--tasks: unknown"),
        (["--budgets", "0"], "--budgets must be in (0, 1]"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["--policies", "lru"], "--policies: unknown ['lru']"),
        (["--engine-options", '{"policy": "quest"}'], "--engine-options"),
    ],
)
def test_bad_arguments_name_the_option(
    ruler: ModuleType,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    with pytest.raises(SystemExit):
        ruler.parse_args(argv)
    assert message in capsys.readouterr().err


def test_quick_defaults(ruler: ModuleType) -> None:
    args = ruler.parse_args(["--quick"])
    assert args.lengths == [4096] and args.samples == 1
    assert args.policies == ["infinigen", "quest"] and args.budgets == [0.1, 0.2]
    full = ruler.parse_args([])
    assert full.lengths == [4096, 8192, 16384] and 0.05 in full.budgets
