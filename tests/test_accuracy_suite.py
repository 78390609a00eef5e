"""The request builders, scoring and plan of ``benchmarks/accuracy.py``.

No engine: the prompts are built with the real tokenizers of the built test
models (skipped where a model is not built) and checked for what the
benchmark's numbers rely on: document and instance counts, lengths within
the requested context, every expected answer present exactly once in its
prompt, questions that name what the answer must copy, and a quick run that
the plan puts under 15 minutes.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, load_benchmark
from vllm_infinigen.models import is_built, model_path

ACCURACY = REPO_ROOT / "benchmarks" / "accuracy.py"
QWEN = "qwen2.5-coder-0.5b"
GEMMA = "gemma3-270m"

acc = load_benchmark("accuracy.py")


def _encoder(name: str) -> Any:
    if not is_built(name):
        pytest.skip(f"{name} is not built (python -m vllm_infinigen.models build)")
    from transformers import AutoTokenizer

    return acc.Encoder(AutoTokenizer.from_pretrained(model_path(name)))


@pytest.fixture(scope="module")
def qwen() -> Any:
    return _encoder(QWEN)


@pytest.fixture(scope="module")
def quick(qwen: Any) -> list[Any]:
    return list(acc.build_requests(qwen, acc.parse_args(["--quick"])))


def _by_task(requests: list[Any], task: str) -> list[Any]:
    return [r for r in requests if r.task == task]


def test_planning_imports_no_vllm() -> None:
    # --plan and these tests must not pay for (or start) an engine
    code = (
        "import importlib.util, sys\n"
        f"sys.path.append({str(ACCURACY.parent)!r})\n"
        f"spec = importlib.util.spec_from_file_location('a', {str(ACCURACY)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['a'] = module\n"
        "spec.loader.exec_module(module)\n"
        "module.parse_args(['--quick'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_quick_counts_and_lengths(quick: list[Any]) -> None:
    ppl = _by_task(quick, "perplexity")
    groups = {r.meta["group"] for r in ppl}
    assert groups == {"text-2048", "code-2048"}
    for group in groups:
        docs = [r for r in ppl if r.meta["group"] == group]
        assert len(docs) == 3
        assert len({r.meta["source"] for r in docs}) == 3
        for r in docs:
            assert len(r.prompt) == 2048
            assert len(r.forced) == r.meta["scored_tokens"] + 1 == 33
    for task in acc.TASKS:
        items = _by_task(quick, task)
        assert len(items) == 3, task
        for r in items:
            assert r.meta["length"] == 2048
            total = len(r.prompt) + len(r.forced)
            assert 0.9 * 2048 <= total <= 2048, (r.name, total)
            assert 0 < r.meta["depth"] < 1
        assert len({r.meta["depth"] for r in items}) == 3, task
    assert len(_by_task(quick, "agreement")) == 2
    assert len({r.name for r in quick}) == len(quick)


def test_documents_do_not_overlap(quick: list[Any]) -> None:
    window = 32
    seen: dict[tuple[int, ...], str] = {}
    for r in _by_task(quick, "perplexity"):
        ids = r.prompt + r.forced
        for at in range(0, len(ids) - window, window // 2):
            key = tuple(ids[at : at + window])
            assert seen.setdefault(key, r.name) == r.name, (r.name, seen[key])


def test_full_run_has_eight_documents_and_six_instances(qwen: Any) -> None:
    args = acc.parse_args(["--tasks", "multikey", "distractor", "--book-tokens", "0"])
    assert args.text_docs == args.code_docs == 8 and args.instances == 6
    assert args.lengths == [2048, 4096, 8192]
    # the documents at the full length exist and do not overlap
    code = acc.code_documents(qwen, 8, 4096 + args.scored_tokens + 1)
    assert len({d.source for d in code}) == 8
    text = acc.text_documents(qwen, 8, 4096 + args.scored_tokens + 1)
    assert len({d.source for d in text}) == 8
    # retrieval at the longest length only, to stay fast
    multikey = acc.multikey_requests(qwen, [8192], 6, 3, 6, 0)
    distractor = acc.distractor_requests(qwen, [8192], 6, 3, 0)
    for items in (multikey, distractor):
        assert len(items) == 6
        assert len({r.meta["context"] for r in items}) == 2
        assert all(len(r.prompt) + len(r.forced) <= 8192 for r in items)
    # hundreds of near-identical records
    assert min(r.meta["records"] for r in distractor) >= 300


def test_answers_occur_once_and_questions_match(qwen: Any, quick: list[Any]) -> None:
    for r in quick:
        if r.task not in acc.TASKS:
            continue
        prompt = qwen.text(r.prompt)
        question = qwen.text(r.forced)
        expected = r.meta["expected"]
        assert expected not in question
        # room for the answer and a token after it
        assert r.free >= len(qwen.ids(expected)) + 1
        if r.task == "passkey":
            # its needle states the key twice
            needle = f"The pass key is {expected}. Remember it. {expected} is"
            assert prompt.count(needle) == 1
            assert prompt.count(expected) == 2
            assert question.endswith("The pass key is")
            continue
        assert prompt.count(expected) == 1, r.name
        if r.task == "multikey":
            label = r.meta["label"]
            fact = acc.MULTIKEY_FACT.format(label=label, key=expected)
            assert prompt.count(fact) == 1
            assert question.endswith(f"The secret code of the {label} box is")
            others = {k: v for k, v in r.meta["keys"].items() if k != label}
            assert len(others) == 5 and expected not in others.values()
            for other_label, code in others.items():
                assert prompt.count(code) == 1
                assert f"the {other_label} box" not in question
        else:
            number = r.meta["record"]
            line = acc.DISTRACTOR_LINE.format(number=number, id=expected)
            assert prompt.count(line) == 1
            assert prompt.count(f"record {number}:") == 1
            assert question.endswith(f"\nrecord {number}: id=")
            neighbours = r.meta["neighbours"]
            assert len(neighbours) >= 3
            for ident in neighbours.values():
                assert ident != expected
                assert ident[:5] == expected[:5]  # the shared first group
            lines = [x for x in prompt.splitlines() if x.startswith("record ")]
            at = lines.index(line.strip())
            for near_line in lines[max(at - 1, 0) : at] + lines[at + 1 : at + 2]:
                near = near_line.rpartition("=")[2]
                assert near in neighbours.values()
                differ = sum(a != b for a, b in zip(near, expected, strict=True))
                assert 1 <= differ <= max(acc.ID_CHANGES)
            numbers = [x.split(":")[0] for x in lines]
            assert len(set(numbers)) == len(numbers)


def test_contexts_are_shared_by_their_questions(quick: list[Any]) -> None:
    items = _by_task(quick, "multikey") + _by_task(quick, "distractor")
    for task in ("multikey", "distractor"):
        prompts = {tuple(r.prompt) for r in items if r.task == task}
        assert len(prompts) == 1  # one context asked three questions


def test_gemma_prompts_start_with_bos_once() -> None:
    gemma = _encoder(GEMMA)
    bos = gemma.tokenizer.bos_token_id
    assert gemma.lead == [bos]
    requests = acc.multikey_requests(gemma, [2048], 3, 3, 6, 0)
    requests += acc.distractor_requests(gemma, [2048], 3, 3, 0)
    requests += acc.passkey_requests(gemma, [2048], [0.5], 0)
    requests += acc.document_requests(gemma, (1, [2048]), (1, [2048]), 0, 32)
    requests += acc.agreement_requests(gemma, 1, 1536, 8)
    for r in requests:
        assert r.prompt[0] == bos, r.name
        assert (r.prompt + r.forced).count(bos) == 1, r.name


def test_qwen_prompts_have_no_lead(qwen: Any, quick: list[Any]) -> None:
    # Qwen's tokenizer adds no BOS, so neither do the prompts
    assert qwen.lead == []
    assert qwen.tokenizer.encode("x") == qwen.ids("x")


def test_copy_scoring() -> None:
    multikey = acc.Request(
        "multikey",
        "m",
        [],
        [],
        8,
        {
            "length": 2048,
            "depth": 0.5,
            "expected": "482913",
            "keys": {"red": "482913", "blue": "120648"},
        },
    )
    assert acc.retrieval_outcome(multikey, " 482913.\n")["correct"]
    assert not acc.retrieval_outcome(multikey, " 4829131")["correct"]
    wrong = acc.retrieval_outcome(multikey, " 120648.")
    assert not wrong["correct"] and wrong["confused_with"] == "blue"
    distractor = acc.Request(
        "distractor",
        "d",
        [],
        [],
        16,
        {
            "length": 2048,
            "depth": 0.5,
            "expected": "6857-07cd-2afa",
            "neighbours": {"6750": "6857-07cd-24fa"},
        },
    )
    assert acc.retrieval_outcome(distractor, "6857-07cd-2afa\nrecord")["correct"]
    assert not acc.retrieval_outcome(distractor, "6857-07cd-2af\n")["correct"]
    near = acc.retrieval_outcome(distractor, "6857-07cd-24fa\n")
    assert near["confused_with"] == "6750"
    passkey = acc.Request(
        "passkey", "p", [], [], 8, {"length": 2048, "depth": 0.5, "expected": "60494"}
    )
    assert acc.retrieval_outcome(passkey, " 60494. Rem")["correct"]


def _output(ids: list[int], logprobs: list[float]) -> Any:
    rows = [
        {t: SimpleNamespace(logprob=lp)} for t, lp in zip(ids, logprobs, strict=True)
    ]
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, logprobs=rows)])


def test_score_pools_and_spreads_and_tables_render(qwen: Any) -> None:
    meta = {"group": "code-8", "scored_tokens": 2}
    requests = [
        acc.Request("perplexity", "code-8:a", [1] * 8, [5, 6, 7], 0, meta),
        acc.Request("perplexity", "code-8:b", [2] * 8, [5, 6, 7], 0, meta),
        acc.Request(
            "distractor",
            "d",
            [3] * 8,
            [9],
            4,
            {"length": 8, "depth": 0.5, "expected": "ab", "neighbours": {}},
        ),
    ]
    answer = qwen.ids("ab\n")
    outputs = [
        _output([5, 6, 7], [0.0, -1.0, -1.0]),
        _output([5, 6, 7], [-9.0, -3.0, -3.0]),  # position 0 is never scored
        _output(([9, *answer] + [0] * 5)[:5], [0.0] * 5),
    ]
    row = acc.score(requests, outputs, None, qwen)
    assert row["perplexity"]["code-8"] == pytest.approx(math.exp(2.0))
    stats = row["perplexity_stats"]["code-8"]
    assert stats["mean"] == pytest.approx((math.e + math.e**3) / 2)
    assert stats["min"] == pytest.approx(math.e)
    assert stats["max"] == pytest.approx(math.e**3)
    assert stats["documents"] == 2
    assert row["retrieval"]["distractor"]["accuracy"] == 1.0
    assert row["retrieval"]["distractor"]["by_length"] == {"8": 1.0}
    configs = [
        {"policy": p, "budget": b, "selection_fraction": b, **row}
        for p, b in (("dense", 1.0), ("infinigen", 0.2))
    ]
    result = {
        "command": "c",
        "seconds": 60.0,
        "machine": "m",
        "dtype": "float32",
        "model": str(Path("x") / QWEN),
        "configs": configs,
        "requests": [
            {"task": "perplexity", "name": n, "kind": "code", "scored_tokens": 2}
            for n in ("code-8:a", "code-8:b")
        ],
    }
    text = acc.tables(result)
    assert "| infinigen | 0.2 | 0.200 | 7.39 | 1.00 |" in text
    # pooled by kind: both documents' tokens, exp((2 * 1 + 2 * 3) / 4)
    assert "| infinigen | 0.2 | 0.200 | 7.39 (+0.0%) |" in text
    assert "+0.0%" in text and "± " in text and "distractor 8" in text


def test_book_pools_with_natural_text_by_scored_tokens() -> None:
    requests = [
        {"task": "perplexity", "name": "text-8:a", "kind": "text", "scored_tokens": 3},
        {"task": "perplexity", "name": "book-8:b", "kind": "book", "scored_tokens": 1},
        {"task": "perplexity", "name": "code-8:c", "kind": "code", "scored_tokens": 2},
        {"task": "passkey", "name": "p", "kind": None, "scored_tokens": 0},
    ]
    config = {
        "perplexity_per_document": {
            "text-8:a": math.exp(1.0),
            "book-8:b": math.exp(5.0),
            "code-8:c": math.exp(2.0),
        }
    }
    pooled = acc.pooled_by_kind({"requests": requests}, config)
    assert pooled["natural text"] == pytest.approx(math.exp((3 * 1.0 + 5.0) / 4))
    assert pooled["code"] == pytest.approx(math.exp(2.0))


def test_quick_plan_fits_in_15_minutes(quick: list[Any]) -> None:
    # Qwen's prompts stand in for Gemma's (the same lengths)
    args = acc.parse_args(["--quick"])
    configs = 1 + len(args.policies) * len(args.budgets)
    for name in (QWEN, GEMMA):
        if not is_built(name):
            continue
        shapes = acc.Shapes.of(model_path(name), "float32")
        plan = acc.make_plan(quick, configs, shapes)
        assert plan.prefill_tokens < plan.prompt_tokens  # shared contexts
        assert plan.total_s < 15 * 60, (name, plan.total_s / 60)


@pytest.mark.parametrize("bad", ["not json", "[0.5]", '{"policy": "quest"}'])
def test_engine_options_must_be_an_object_without_policy(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        acc.parse_args(["--engine-options", bad])
    assert "--engine-options" in capsys.readouterr().err


def test_engine_options_reach_the_start_up_options() -> None:
    args = acc.parse_args(["--quick", "--engine-options", '{"partial_ratio": 0.5}'])
    assert args.engine_options == {"partial_ratio": 0.5}
