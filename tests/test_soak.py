"""The measuring parts of ``benchmarks/soak.py`` (the soak itself runs a
server for minutes and is a benchmark, not a test)."""

from __future__ import annotations

import pytest

from tests.conftest import load_benchmark

soak = load_benchmark("soak.py")


def test_counter_sums_every_label_set() -> None:
    scrape = "\n".join(
        [
            "# HELP vllm:num_preemptions Preemptions.",
            "# TYPE vllm:num_preemptions counter",
            'vllm:num_preemptions_total{engine="0",model_name="m"} 3.0',
            'vllm:num_preemptions_total{engine="1",model_name="m"} 2.0',
            "# TYPE other counter",
            "other_total 7.0",
            "",
        ]
    )
    assert soak.counter(scrape, "vllm:num_preemptions") == 5.0
    assert soak.counter(scrape, "missing") == 0.0


def test_memory_summary_settles_after_warm_up_and_sees_growth() -> None:
    gib = 1 << 30
    flat = [(float(t), 2 * gib + (t % 3) * 1000) for t in range(100)]
    summary = soak.memory_summary(flat, warm_from=10.0)
    assert abs(summary["change"]) < 1e-5
    growing = [(float(t), gib + t * gib // 100) for t in range(100)]
    summary = soak.memory_summary(growing, warm_from=10.0)
    assert summary["change"] > 0.5
    assert summary["peak_gib"] == pytest.approx(1.99)
    assert "note" in soak.memory_summary(flat[:5], warm_from=0.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--requests", "-1"], "--requests must be >= 1, got -1"),
        (["--concurrency", "0"], "--concurrency must be >= 1, got 0"),
        (["--short-output", "0"], "--short-output must be >= 1, got 0"),
        (["--long-share", "1.5"], "--long-share must be in [0, 1], got 1.5"),
        (["--cancel-share", "-0.1"], "--cancel-share must be in [0, 1], got -0.1"),
        (["--model", "bert"], "--model: invalid choice: 'bert'"),
    ],
)
def test_bad_arguments_name_the_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        soak.parse_args(argv)
    assert message in capsys.readouterr().err


def test_defaults_follow_quick() -> None:
    quick, full = soak.parse_args(["--quick"]), soak.parse_args([])
    assert (quick.requests, quick.pool_tokens) == (60, 1800)
    assert (full.requests, full.pool_tokens) == (240, 3400)
