"""The measuring parts of ``benchmarks/pressure.py`` (the benchmark itself
starts several engines and runs for minutes)."""

from __future__ import annotations

import pytest

from tests.conftest import load_benchmark

pressure = load_benchmark("pressure.py")


def test_agreement_counts_tokens_before_the_first_difference() -> None:
    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    other = [[1, 2, 9, 4], [5, 6, 7, 8]]
    result = pressure.agreement(reference, other)
    assert result["per_request"] == [0.5, 1.0]
    assert result["mean"] == pytest.approx(0.75)
    assert (result["identical"], result["requests"]) == (1, 2)


def test_summary_compares_each_series_with_its_roomy_run_and_dense() -> None:
    def run(tokens: list[list[int]], preemptions: int, **extra: float) -> dict:
        return {"token_ids": tokens, "preemptions": preemptions, **extra}

    runs = {
        "dense/roomy": run([[1, 2], [3, 4]], 0),
        "dense/tight": run([[1, 2], [3, 9]], 2),
        "infinigen/roomy": run([[1, 7], [3, 4]], 0, selection_fraction=0.3),
        "infinigen/tight": run([[1, 7], [3, 4]], 3, selection_fraction=0.3),
    }
    summary = pressure.summarise(runs, ["dense", "infinigen"])
    assert summary["dense"]["preemptions_tight"] == 2
    assert summary["dense"]["tight_vs_roomy"]["identical"] == 1
    assert "roomy_vs_dense_roomy" not in summary["dense"]
    ours = summary["infinigen"]
    assert ours["tight_vs_roomy"]["mean"] == 1.0
    assert ours["roomy_vs_dense_roomy"]["per_request"] == [0.5, 1.0]
    assert ours["selection_fraction"] == 0.3


def test_code_prompts_are_read_in_place() -> None:
    prompts = pressure.code_prompts(3, 200)
    assert len(prompts) == 3 and all(len(p) == 200 for p in prompts)
    assert len(set(prompts)) == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--requests", "9"], "--requests must be in 1..8, got 9"),
        (["--requests", "0"], "--requests must be in 1..8, got 0"),
        (["--tokens", "0"], "--tokens must be >= 1, got 0"),
        (["--prompt-chars", "-5"], "--prompt-chars must be >= 1, got -5"),
        (["--pool-tokens", "700"], "--pool-tokens must be >= --max-model-len + 32"),
        (["--series", "infinigen"], "--series must include dense"),
    ],
)
def test_bad_arguments_name_the_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        pressure.parse_args(argv)
    assert message in capsys.readouterr().err


def test_defaults_follow_quick() -> None:
    quick, full = pressure.parse_args(["--quick"]), pressure.parse_args([])
    assert (quick.requests, quick.tokens) == (4, 96)
    assert (full.requests, full.tokens, full.series) == (8, 160, ["dense", "infinigen"])
