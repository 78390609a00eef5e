"""``benchmarks/ruler_tasks.py``: RULER's synthetic task prompts (length,
needles, answers, determinism) and its answer scoring, with the test model's
real tokenizer."""

from __future__ import annotations

import re
import sys
from collections import Counter
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import load_benchmark

CONTEXT = 4096
SEED = 7
COUNT = 3


#: RULER's synthetic tasks without ``qa``, in ``scripts/synthetic.yaml`` order.
RULER_ORDER = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)


@pytest.fixture(scope="module")
def ruler() -> ModuleType:
    # ruler_tasks.py imports its sibling as a script does (benchmarks/ on
    # sys.path when run as `python benchmarks/...`).
    sys.modules.setdefault("workloads", load_benchmark("workloads.py"))
    return load_benchmark("ruler_tasks.py")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from vllm_infinigen.models import DEFAULT_MODEL, build_model

    return AutoTokenizer.from_pretrained(build_model(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def samples(ruler: ModuleType, tokenizer: Any) -> dict[str, list[Any]]:
    """``COUNT`` samples of every task at ``CONTEXT`` tokens."""
    return {
        task: ruler.build_samples(tokenizer, task, CONTEXT, COUNT, SEED)
        for task in ruler.TASKS
    }


def _niah_context(prompt: str) -> str:
    """The haystack of a needle-in-a-haystack prompt (between the
    instruction line and the question)."""
    start = prompt.index("\n") + 1
    return prompt[start : prompt.rindex("\nWhat ")]


def _queried_keys(sample: Any) -> list[str]:
    """The keys a needle-in-a-haystack prompt asks about, in order."""
    match = re.search(r" for (.+) mentioned in the provided text", sample.answer_prefix)
    assert match is not None
    return re.split(r", and |, ", match.group(1))


def test_task_list_and_definitions_follow_ruler(ruler: ModuleType) -> None:
    assert ruler.TASKS == RULER_ORDER
    assert set(ruler.NIAH_TASKS) == {t for t in ruler.TASKS if t.startswith("niah")}
    assert {
        **dict.fromkeys(ruler.NIAH_TASKS, 128),
        "vt": 30,
        "cwe": 120,
        "fwe": 50,
    } == ruler.MAX_NEW_TOKENS
    assert set(ruler.METRICS.values()) == {"all"}
    multikey = ruler.NIAH_CONFIGS["niah_multikey_3"]
    assert (multikey.haystack, multikey.key_kind, multikey.value_kind) == (
        "needle",
        "uuids",
        "uuids",
    )
    assert ruler.ESSAY_DEPTHS[:4] == (0, 3, 5, 8) and ruler.ESSAY_DEPTHS[-1] == 100
    assert len(set(ruler.ESSAY_DEPTHS)) == 40


@pytest.mark.parametrize(
    "task",
    RULER_ORDER,
)
def test_prompts_fill_the_context_without_passing_it(
    task: str, samples: dict[str, list[Any]], tokenizer: Any
) -> None:
    budget = None
    for index, sample in enumerate(samples[task]):
        assert (sample.task, sample.index, sample.context_tokens) == (
            task,
            index,
            CONTEXT,
        )
        budget = CONTEXT - sample.max_new_tokens
        tokens = len(tokenizer.encode(sample.prompt))
        assert tokens == sample.prompt_tokens
        assert 0.9 * budget < tokens <= budget
        assert sample.prompt.endswith(sample.answer_prefix)
        assert sample.answers and all(sample.answers)
    assert budget is not None


def test_reserved_tokens_leave_room(ruler: ModuleType, tokenizer: Any) -> None:
    (sample,) = ruler.build_samples(
        tokenizer, "niah_single_2", 2048, 1, SEED, reserved_tokens=300
    )
    assert 0.9 * (2048 - 300 - 128) < sample.prompt_tokens <= 2048 - 300 - 128


def test_niah_needles_hold_the_answers_at_their_depths(
    ruler: ModuleType, samples: dict[str, list[Any]]
) -> None:
    for task in ruler.NIAH_TASKS:
        config = ruler.NIAH_CONFIGS[task]
        for sample in samples[task]:
            context = _niah_context(sample.prompt)
            keys = _queried_keys(sample)
            assert len(keys) == config.num_queries
            assert len(sample.answers) == config.num_queries * config.num_values
            assert len(sample.depths) == len(sample.answers)
            per_key = [
                sample.answers[i : i + config.num_values]
                for i in range(0, len(sample.answers), config.num_values)
            ]
            for key, values in zip(keys, per_key, strict=True):
                for value in values:
                    needle = (
                        f"One of the special magic {config.value_kind} "
                        f"for {key} is: {value}."
                    )
                    assert context.count(needle) == 1, (task, needle)
                    assert context.count(value) == 1
            for value, depth in zip(sample.answers, sample.depths, strict=True):
                where = context.index(value) / len(context)
                # Essay depths count sentences, whose lengths vary.
                tolerance = 0.1 if config.haystack == "essay" else 0.03
                assert abs(where - depth / 100) < tolerance, (task, where, depth)
                if config.haystack == "essay":
                    assert depth in ruler.ESSAY_DEPTHS
            # Every needle of the haystack names a key; only the queried ones
            # are asked about.
            needles = re.findall(r"One of the special magic \w+ for (\S+) is:", context)
            expected = max(config.num_keys, config.num_queries) * config.num_values
            if config.haystack == "needle":
                assert len(needles) == sample.haystack_size + expected
            else:
                assert len(needles) == expected


def test_niah_keys_values_and_wording_follow_their_kinds(
    ruler: ModuleType, samples: dict[str, list[Any]]
) -> None:
    words = set(ruler.word_list())
    single = samples["niah_single_1"][0]
    (key,) = _queried_keys(single)
    first, second = key.split("-")
    assert first in words and second in words and first != second
    assert re.fullmatch(r"\d{7}", single.answers[0])
    assert single.prompt.startswith("A special magic number is hidden within")
    assert "The grass is green. The sky is blue." in single.prompt
    assert single.answer_prefix.endswith("mentioned in the provided text is")
    uuid_re = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    multikey = samples["niah_multikey_3"][0]
    assert re.fullmatch(uuid_re, _queried_keys(multikey)[0])
    assert re.fullmatch(uuid_re, multikey.answers[0])
    assert multikey.prompt.startswith("A special magic uuid is hidden")
    multivalue = samples["niah_multivalue"][0]
    assert multivalue.prompt.startswith("Some special magic numbers are hidden")
    assert multivalue.answer_prefix.endswith("mentioned in the provided text are")
    essay = samples["niah_single_2"][0]
    assert "Rue Saint-Denis" in essay.prompt


def test_needle_depths_spread_over_the_context(
    ruler: ModuleType, tokenizer: Any
) -> None:
    essay = ruler.build_samples(tokenizer, "niah_single_2", 1024, 16, SEED)
    depths = [s.depths[0] for s in essay]
    assert len(set(depths)) >= 10
    assert min(depths) <= 25 and max(depths) >= 75
    noise = ruler.build_samples(tokenizer, "niah_single_1", 1024, 16, SEED)
    depths = [s.depths[0] for s in noise]
    assert len(set(depths)) >= 10
    assert min(depths) <= 25 and max(depths) >= 75


def test_variable_tracking_chain_sits_in_the_context(
    samples: dict[str, list[Any]],
) -> None:
    for sample in samples["vt"]:
        names = sample.answers
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        # The one-shot example, with its own answer, comes first.
        example, main = sample.prompt.split("\n\nMemorize and track")
        example_answer = example.rsplit("they are:  ", 1)[1].split()
        assert len(example_answer) == 5 and not set(example_answer) & set(names)
        context = main.split("\n\n", 1)[1].rsplit("\nQuestion:", 1)[0]
        lines = context.split("\n")
        value = re.search(r"assigned the value (\d{5})", main)
        assert value is not None
        chain = [f"VAR {names[0]} = {value.group(1)}"] + [
            f"VAR {b} = VAR {a}" for a, b in zip(names[:-1], names[1:], strict=True)
        ]
        where = [[line.strip() for line in lines].index(link) for link in chain]
        assert where == sorted(where)
        for line, depth in zip(where, sample.depths, strict=True):
            assert abs(line / len(lines) - depth / 100) < 0.01
        assert sum(line.startswith("VAR ") for line in lines) == 5
        assert sample.prompt.endswith(
            f"5 variables are assigned the value {value.group(1)}, they are: "
        )


def test_common_words_are_the_most_frequent_of_the_list(
    samples: dict[str, list[Any]],
) -> None:
    for sample in samples["cwe"]:
        lists = re.findall(r"most often\.\n(.*?)\nQuestion:", sample.prompt, re.S)
        assert len(lists) == 2  # the one-shot example's, then the sample's
        example, main = (re.findall(r"\d+\. (\S+)", text) for text in lists)
        counts = Counter(main)
        assert set(sample.answers) == {w for w, _ in counts.most_common(10)}
        assert all(counts[w] == 30 for w in sample.answers)
        assert {n for w, n in counts.items() if w not in sample.answers} == {3}
        assert not set(example) & set(main)
        assert sample.depths == []


def test_frequent_words_are_the_most_frequent_coded_words(
    samples: dict[str, list[Any]],
) -> None:
    for sample in samples["fwe"]:
        match = re.search(r"coded words\. (.*?)\nQuestion:", sample.prompt, re.S)
        assert match is not None
        counts = Counter(match.group(1).split())
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[0] == "..."
        assert ranked[1:4] == sample.answers
        assert counts[sample.answers[-1]] > counts[ranked[4]]
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in ranked[1:])


def test_same_arguments_give_the_same_samples(
    ruler: ModuleType, tokenizer: Any, samples: dict[str, list[Any]]
) -> None:
    for task in ("niah_multikey_2", "vt", "cwe", "fwe", "niah_multiquery"):
        again = ruler.build_samples(tokenizer, task, CONTEXT, COUNT, SEED)
        assert again == samples[task]
        # Sample i does not depend on how many are asked for.
        assert ruler.build_samples(tokenizer, task, CONTEXT, 1, SEED) == again[:1]
        other = ruler.build_samples(tokenizer, task, CONTEXT, 1, SEED + 1)
        assert other[0].prompt != again[0].prompt
        assert other[0].answers != again[0].answers


def test_indices_give_distinct_samples(
    ruler: ModuleType, samples: dict[str, list[Any]]
) -> None:
    for task in ruler.TASKS:
        prompts = {s.prompt for s in samples[task]}
        answers = {tuple(s.answers) for s in samples[task]}
        assert len(prompts) == len(answers) == COUNT, task
        if task in ruler.NIAH_TASKS:
            assert len({tuple(s.depths) for s in samples[task]}) > 1


def test_word_list_is_lowercase_english_words(ruler: ModuleType) -> None:
    words = ruler.word_list()
    assert len(words) > 300 and list(words) == sorted(set(words))
    assert all(re.fullmatch(r"[a-z]{3,12}", w) for w in words)
    assert "the" not in words and "which" not in words
    assert {"house", "window", "paris"} & set(words)


def test_long_common_words_lists_use_word_pairs(
    ruler: ModuleType, tokenizer: Any
) -> None:
    (sample,) = ruler.build_samples(tokenizer, "cwe", 16384, 1, SEED)
    assert sample.haystack_size > len(ruler.word_list())
    assert 0.9 * (16384 - 120) < sample.prompt_tokens <= 16384 - 120
    main = sample.prompt.rsplit("most often.\n", 1)[1].split("\nQuestion:")[0]
    entries = set(re.findall(r"\d+\. (\S+)", main))
    assert len(entries) == sample.haystack_size
    pairs = {w for w in entries if "-" in w}
    singles = entries - pairs
    assert pairs and singles <= set(ruler.word_list())
    # No entry is part of another: the paired words are never used alone.
    assert not {part for w in pairs for part in w.split("-")} & singles


def test_bad_requests_are_refused(ruler: ModuleType, tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        ruler.build_samples(tokenizer, "qa_1", CONTEXT, 1)
    with pytest.raises(ValueError, match="smallest haystack"):
        ruler.build_samples(tokenizer, "niah_single_2", 200, 1)


def test_string_match_all_and_part(ruler: ModuleType) -> None:
    refs = ["7558096", "Apple-Pie", "1234567", "9999999"]
    assert ruler.string_match_all("7558096, apple-pie, 1234567, 9999999", refs) == 1.0
    assert ruler.string_match_all("numbers: 7558096 and APPLE-PIE", refs) == 0.5
    assert ruler.string_match_all("nothing here", refs) == 0.0
    assert ruler.string_match_part("only 1234567", refs) == 1.0
    assert ruler.string_match_part("APPLE-pie", refs) == 1.0
    assert ruler.string_match_part("7558095", refs) == 0.0
    with pytest.raises(ValueError):
        ruler.string_match_all("x", [])


def test_score_cleans_predictions_and_reports_percent(ruler: ModuleType) -> None:
    assert ruler.postprocess("  abc\tdef\x00ghi \n\n") == "abc\ndef\nghi"
    # The whole prediction counts, not only its first line.
    answers = ["ABCDE", "FGHIJ"]
    assert ruler.score("vt", " abcde\n\nfghij\n", answers) == 1.0
    assert ruler.score("vt", "ABCDE only", answers) == 0.5
    assert ruler.score("niah_single_1", "The number is 7558096.", ["7558096"]) == 1.0
    assert ruler.score("niah_single_1", "It is 755809.", ["7558096"]) == 0.0
    predictions = ["ABCDE FGHIJ", "abcde", "none", "fghij"]
    references = [answers] * 4
    assert ruler.task_score("vt", predictions, references) == 50.0
    assert ruler.task_score("vt", ["abcde", "x", "y"], [answers] * 3) == 16.67
    with pytest.raises(ValueError):
        ruler.task_score("vt", ["a"], [])
