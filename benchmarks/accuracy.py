"""Accuracy of sparse decode per block-selection policy and KV budget.

For every policy of ``--policies`` (INFINIGEN and the peer policies Quest,
H2O and StreamingLLM) at every budget of ``--budgets`` (the fraction of a
request's KV blocks read per layer at decode), plus ``dense`` (every block,
read through the same path: the exact reference), one run measures:

* **perplexity** on the sparse decode path, per group of documents: natural
  text (``text``: excerpts at evenly spaced offsets of the Python Language
  Reference as ``pydoc`` shows it, ``pydoc_data.topics`` of the standard
  library, read in place; the PG-19 excerpt in ``../shared/data`` has only
  about 2.2K tokens, so it is one extra document, group ``book``) and code
  (``code``: one standard-library module per document, read in place).
  Prefill is always dense in this engine and only decode steps select
  blocks, so prompt logprobs would measure nothing: the first ``P`` tokens
  of a document are the prompt and the next tokens are forced one decode
  step at a time by a logits processor (``ForcedTokens``). vLLM returns the
  logprob of the sampled token taken *before* logits processors run
  (``logprobs_mode`` is ``raw_logprobs``), i.e. the forced token's logprob
  under the model's own distribution at that step. A group's perplexity
  pools its scored tokens (``exp`` of their mean NLL); the mean, spread and
  range of the per-document perplexities come with it.
* **retrieval**, each answer produced by greedy decode after a question that
  is itself forced through decode steps, so that the question and every
  answer token are computed by sparse attention over the context:

  - ``passkey``: a five-digit number hidden at a depth of repeated filler
    text; correct when the greedy answer contains it;
  - ``multikey``: ``--keys`` secret codes, each labelled by a colour, spread
    through natural text at different depths; the question names one
    colour; correct when the answer copies that code exactly (another
    colour's code counts as wrong, and is recorded);
  - ``distractor``: hundreds of near-identical records (``record 3417:
    id=7f3a-91c2-b8e0``; distinct four-digit record numbers in random order,
    every id shares its first group, and each differs from the previous
    record's in ``ID_CHANGES`` digits) fill the context; the question names
    a record; correct when the answer copies its id exactly.

  ``--instances`` per task and length; multikey and distractor ask
  ``--questions`` questions of each context (the contexts are prefilled
  once and shared through the prefix cache).
* **greedy agreement with dense** on code completion (standard-library
  modules cut mid-file): the share of ``--agree-tokens`` greedy tokens before
  the first token that differs from the dense run's.

In all of them, the token the (dense) prefill predicts is overridden by the
document's own next token and never scored: every scored token comes from a
decode step. Budgets are exact (``--min-blocks 0`` by default, where the
engine's own default floors a request's budget at 8 blocks). One in-process
engine serves the whole run: it keeps the metadata of every policy from the
start (``infinigen_track``), prefills every prompt once at policy ``dense``
(one prompt at a time, so that prompts sharing a prefix compute it once; the
KV stays in vLLM's prefix cache, sized from the plan), then switches policy
and budget with ``infinigen_configure`` and runs all the requests of one
configuration in one ``generate`` call, so each configuration pays only its
decode steps. The measured share of blocks read (``infinigen_stats``) is
recorded per configuration. Requests that share a context (the questions of
one context, the pass keys' common filler) share its KV blocks: InfiniGen's
and Quest's metadata depend only on a block's keys, but H2O's accumulated
mass is kept per block, so there the requests add to one another's.

``--plan`` prints the prompts, the tokens to prefill and an estimate of the
run time (from speeds measured on this project's 2-core machine) and exits
before any engine starts.

    python benchmarks/accuracy.py --quick --plan   # the plan, no engine
    python benchmarks/accuracy.py --quick          # 2K contexts, < 15 min
    python benchmarks/accuracy.py                  # 2K-8K contexts, hours
    python benchmarks/accuracy.py --model gemma3-270m --quick

``--model`` takes ``qwen2.5-coder-0.5b`` (the default), ``gemma3-270m``
(its sliding-window layers stay dense, its global layers run sparse) or a
model folder. Writes ``benchmarks/results/accuracy[_quick][_MODEL].json``
(no ``_MODEL`` for the default model) and a plot next to it, and prints the
tables (``--replot`` prints them again from the JSON).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workloads import cpu_model

from vllm_infinigen.engine.cost_probe import CPU_BLOCK_SIZES
from vllm_infinigen.engine.policies.registry import POLICIES as REGISTERED
from vllm_infinigen.engine.policies.registry import policy_class
from vllm_infinigen.method.agreement import prefix_agreement
from vllm_infinigen.method.calibration_text import stdlib_dir

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BOOK = REPO.parent / "shared" / "data" / "pg19_firstbook.txt"

#: Sparse policies compared (``dense`` is always run as the reference).
POLICIES: tuple[str, ...] = tuple(
    name for name in REGISTERED if not policy_class(name).reads_everything
)
#: Retrieval tasks, in table order.
TASKS: tuple[str, ...] = ("passkey", "multikey", "distractor")
#: ``SamplingParams.extra_args`` key of the token ids to force, in order.
FORCE_KEY = "forced_token_ids"
#: Standard-library modules the code documents are, one module each, in
#: this order (a module shorter than the document is skipped). All have more
#: than 16.5K tokens with Qwen's tokenizer, so documents of up to 16K tokens
#: never overlap; none is among :data:`AGREE_FILES`.
CODE_FILES: tuple[str, ...] = (
    "typing.py",
    "inspect.py",
    "enum.py",
    "subprocess.py",
    "logging/__init__.py",
    "zipfile.py",
    "datetime.py",
    "pydoc.py",
    "urllib/request.py",
    "ipaddress.py",
    "doctest.py",
    "locale.py",
    "mailbox.py",
    "_pydecimal.py",
)
#: Standard-library files of the greedy-agreement prompts (cut mid-file).
AGREE_FILES: tuple[str, ...] = (
    "argparse.py",
    "difflib.py",
    "dataclasses.py",
    "textwrap.py",
    "tarfile.py",
)
#: Paragraphs of the reference prose longer than this (characters) are kept
#: at their first occurrence only: a chapter topic repeats its sections.
PROSE_UNIQUE_CHARS = 80

# --- pass key (unchanged task) ---
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. "
    "Here we go. There and back again."
)
PASSKEY_HEAD = (
    "There is an important pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it.\n\n"
)
QUESTION = "\n\nWhat is the pass key? The pass key is"
#: Greedy tokens after the question: a space and five digits, with room.
PASSKEY_ANSWER_TOKENS = 8

# --- several labelled keys ---
MULTIKEY_HEAD = (
    "Secret codes are hidden in the text below, each one belonging to a box "
    "of a different colour. Find them and remember which box each belongs "
    "to.\n\n"
)
COLOURS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "white",
    "black",
    "grey",
    "brown",
    "pink",
    "silver",
)
MULTIKEY_FACT = "The secret code of the {label} box is {key}.\n\n"
MULTIKEY_QUESTION = (
    "\nWhat is the secret code of the {label} box? "
    "The secret code of the {label} box is"
)

# --- near-identical records ---
DISTRACTOR_HEAD = (
    "Below is a list of records. Every record has an id of three groups of "
    "four hexadecimal digits. The ids look alike: read them with care.\n\n"
)
DISTRACTOR_LINE = "record {number}: id={id}\n"
DISTRACTOR_QUESTION = "\nCopy the id of record {number} exactly.\nrecord {number}: id="
#: Hexadecimal digits of an id after its shared first group, and how many of
#: them change from one record to the next.
ID_DIGITS = "0123456789abcdef"
ID_CHANGES = (3, 4)

#: Greedy tokens after an exact-copy answer, so that a longer (wrong) copy
#: shows; a copy is the leading run of these characters of the answer.
COPY_SLACK_TOKENS = 3
COPY_CHARS = re.compile(r"\s*([0-9A-Za-z-]+)")


@dataclass
class Request:
    """One prompt of the benchmark and what its decode steps are forced to."""

    task: str
    """``perplexity``, one of :data:`TASKS`, or ``agreement``."""
    name: str
    prompt: list[int]
    forced: list[int]
    """Output tokens forced from the first one on (the first overrides the
    dense prefill's own prediction and is never scored)."""
    free: int
    """Greedy tokens after the forced ones."""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def max_tokens(self) -> int:
        return len(self.forced) + self.free


class Encoder:
    """A tokenizer used the way this benchmark builds prompts: text pieces
    are encoded without special tokens and joined as token ids; a prompt
    starts with :attr:`lead`, the ids the tokenizer itself puts before a
    text (Gemma's ``<bos>``; nothing for Qwen)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        plain = tokenizer.encode("x", add_special_tokens=False)
        full = tokenizer.encode("x")
        at = next(
            i
            for i in range(len(full) - len(plain) + 1)
            if full[i : i + len(plain)] == plain
        )
        self.lead: list[int] = list(full[:at])

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids)))


# ---------------------------------------------------------------- documents


@dataclass(frozen=True)
class Document:
    kind: str
    """``text``, ``code`` or ``book``: the group is ``{kind}-{prefix}``."""
    source: str
    ids: list[int]
    """Starts with the encoder's lead."""


def reference_prose() -> str:
    """The Python Language Reference as ``pydoc`` shows it (the standard
    library's ``pydoc_data.topics``, read in place): topics longest first,
    paragraphs joined by blank lines, each paragraph longer than
    :data:`PROSE_UNIQUE_CHARS` kept at its first occurrence only."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    paragraphs = []
    for name in sorted(topics, key=lambda k: (-len(topics[k]), k)):
        for paragraph in topics[name].split("\n\n"):
            key = paragraph.strip()
            if len(key) > PROSE_UNIQUE_CHARS:
                if key in seen:
                    continue
                seen.add(key)
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def _leading_ids(enc: Encoder, text: str, tokens: int) -> list[int] | None:
    """The first ``tokens`` ids of ``text`` (encoding a growing head of it),
    or None if the whole text has fewer."""
    chars = tokens * 5
    while True:
        ids = enc.ids(text[:chars])
        if len(ids) > tokens:
            return ids[:tokens]
        if chars >= len(text):
            return ids if len(ids) == tokens else None
        chars *= 2


def code_documents(enc: Encoder, count: int, tokens: int) -> list[Document]:
    """The first ``count`` modules of :data:`CODE_FILES` with at least
    ``tokens`` tokens (lead included), cut to that length."""
    docs = []
    for name in CODE_FILES:
        text = (stdlib_dir() / name).read_text(encoding="utf-8")
        ids = _leading_ids(enc, text, tokens - len(enc.lead))
        if ids is not None:
            docs.append(Document("code", name, enc.lead + ids))
        if len(docs) == count:
            return docs
    raise ValueError(
        f"only {len(docs)} of CODE_FILES have {tokens} tokens; "
        "use fewer --code-docs or shorter --code-tokens"
    )


def text_documents(enc: Encoder, count: int, tokens: int) -> list[Document]:
    """``count`` excerpts of :func:`reference_prose`, each from the first
    paragraph at or after an ``i / count`` share of it, ``tokens`` long
    (lead included); raises ``ValueError`` if two would overlap."""
    prose = reference_prose()
    starts = [0] + [m.end() for m in re.finditer(r"\n\n+", prose)]
    spans = []
    for i in range(count):
        start = next(s for s in starts if s >= i * len(prose) // count)
        ids = _leading_ids(enc, prose[start:], tokens - len(enc.lead))
        if ids is None:
            raise ValueError(f"text document {i} is past the end of the prose")
        spans.append((start, start + len(enc.text(ids)), ids))
    for (_, end, _), (start, _, _) in zip(spans, spans[1:], strict=False):
        if end > start:
            raise ValueError(
                f"text documents of {tokens} tokens overlap; use fewer "
                "--text-docs or shorter --text-tokens"
            )
    return [
        Document("text", f"reference@{start}", enc.lead + ids)
        for start, _, ids in spans
    ]


def book_document(enc: Encoder) -> Document:
    """The whole PG-19 excerpt (about 2.2K tokens), read in place."""
    return Document("book", BOOK.name, enc.lead + enc.ids(BOOK.read_text("utf-8")))


def perplexity_requests(
    docs: Iterable[tuple[Document, int]], scored: int
) -> list[Request]:
    """For each (document, ``P``): prompt its first ``P`` tokens, forced its
    next ``1 + scored``. Documents of one kind and ``P`` form a group."""
    requests = []
    for doc, prefix in docs:
        if len(doc.ids) < prefix + scored + 1:
            raise ValueError(f"{doc.source} is shorter than {prefix + scored + 1}")
        group = f"{doc.kind}-{prefix}"
        requests.append(
            Request(
                "perplexity",
                f"{group}:{doc.source}",
                doc.ids[:prefix],
                doc.ids[prefix : prefix + scored + 1],
                0,
                {
                    "group": group,
                    "kind": doc.kind,
                    "source": doc.source,
                    "prefix_tokens": prefix,
                    "scored_tokens": scored,
                },
            )
        )
    return requests


def document_requests(
    enc: Encoder,
    text: tuple[int, list[int]],
    code: tuple[int, list[int]],
    book_tokens: int,
    scored: int,
) -> list[Request]:
    """Perplexity requests: ``text`` and ``code`` are (documents, prompt
    lengths); every document at every length (a document's shorter prompts
    are prefixes of its longest: one prefill serves them all). The book, if
    ``book_tokens``, at that length or as much as it has."""
    pairs: list[tuple[Document, int]] = []
    for builder, (count, prefixes) in ((text_documents, text), (code_documents, code)):
        if count and prefixes:
            for doc in builder(enc, count, max(prefixes) + scored + 1):
                pairs += [(doc, p) for p in sorted(prefixes)]
    if book_tokens > 0:
        book = book_document(enc)
        pairs.append((book, min(book_tokens, len(book.ids) - scored - 1)))
    return perplexity_requests(pairs, scored)


# ---------------------------------------------------------------- retrieval


def depths(count: int) -> list[float]:
    """``count`` depths evenly from 0.1 to 0.9 (0.5 for one)."""
    if count == 1:
        return [0.5]
    return [round(0.1 + 0.8 * i / (count - 1), 3) for i in range(count)]


def passkey_requests(
    enc: Encoder, lengths: list[int], key_depths: list[float], seed: int
) -> list[Request]:
    """A pass key at each depth of filler, ``length`` tokens with the question."""
    rng = random.Random(seed)
    head = enc.lead + enc.ids(PASSKEY_HEAD)
    question = enc.ids(QUESTION)
    unit = len(enc.ids(" " + FILLER))
    needle = "The pass key is {key}. Remember it. {key} is the pass key."
    room = len(enc.ids(" " + needle.format(key=12345))) + 2
    requests = []
    for length in lengths:
        repeats = max((length - len(head) - len(question) - room) // unit, 1)
        for depth in key_depths:
            key = rng.randrange(10_000, 100_000)
            before = round(repeats * depth)
            text = " ".join(
                [FILLER] * before
                + [needle.format(key=key)]
                + [FILLER] * (repeats - before)
            )
            prompt = head + enc.ids(text)
            requests.append(
                Request(
                    "passkey",
                    f"passkey-{length}-{depth:g}",
                    prompt,
                    question,
                    PASSKEY_ANSWER_TOKENS,
                    {
                        "length": length,
                        "depth": depth,
                        "expected": str(key),
                        "passkey": key,
                        "tokens": len(prompt) + len(question),
                    },
                )
            )
    return requests


def _contexts(instances: int, questions: int) -> list[int]:
    """Questions asked of each context: ``instances`` in all, ``questions``
    a context (the last may ask fewer)."""
    counts = [questions] * (instances // questions)
    return counts + ([instances % questions] if instances % questions else [])


def _spread(rng: random.Random, items: int, count: int) -> list[int]:
    """``count`` indices of ``items``, one in each of ``count`` equal parts,
    at a random place within its part's middle half."""
    return [int((i + rng.uniform(0.25, 0.75)) * items / count) for i in range(count)]


def _haystack(
    enc: Encoder, paragraphs: list[str], first: int, room: int
) -> list[list[int]]:
    """Paragraphs from the ``first`` on (wrapping around), ``room`` tokens
    in all (the last one cut)."""
    hay: list[list[int]] = []
    used = 0
    while used < room:
        ids = enc.ids(paragraphs[(first + len(hay)) % len(paragraphs)])[: room - used]
        hay.append(ids)
        used += len(ids)
    return hay


def _with_facts(
    hay: list[list[int]], facts: list[list[int]]
) -> tuple[list[int], list[int]]:
    """The paragraphs with fact ``j`` at the paragraph boundary nearest to
    depth ``(j + 0.5) / len(facts)``; the tokens and each fact's position."""
    bounds = list(itertools.accumulate((len(p) for p in hay), initial=0))
    slots = [
        min(range(len(bounds)), key=lambda b: abs(bounds[b] - want))
        for want in ((j + 0.5) * bounds[-1] / len(facts) for j in range(len(facts)))
    ]
    ids: list[int] = []
    positions = [0] * len(facts)
    for b in range(len(hay) + 1):
        for j, slot in enumerate(slots):
            if slot == b:
                positions[j] = len(ids)
                ids += facts[j]
        if b < len(hay):
            ids += hay[b]
    return ids, positions


def multikey_requests(
    enc: Encoder,
    lengths: list[int],
    instances: int,
    questions: int,
    keys: int,
    seed: int,
) -> list[Request]:
    """Contexts of ``length`` tokens (with the question) made of paragraphs
    of :func:`reference_prose` from a random paragraph on, with ``keys``
    colour-labelled six-digit codes at evenly spread depths; each question
    names one colour. Every code occurs once in its context."""
    if not 2 <= keys <= len(COLOURS) or questions > keys:
        raise ValueError(f"--keys must be in [2, {len(COLOURS)}] and >= --questions")
    paragraphs = [p + "\n\n" for p in reference_prose().split("\n\n") if p.strip()]
    head = enc.lead + enc.ids(MULTIKEY_HEAD)
    requests = []
    for length in lengths:
        for c, asked in enumerate(_contexts(instances, questions)):
            rng = random.Random(f"multikey-{seed}-{length}-{c}")
            labels = rng.sample(COLOURS, keys)
            asks = [enc.ids(MULTIKEY_QUESTION.format(label=lb)) for lb in labels]
            room = length - len(head) - max(map(len, asks))
            while True:  # until no code occurs in the text by chance
                codes = [str(rng.randrange(100_000, 1_000_000)) for _ in labels]
                facts = [
                    enc.ids(MULTIKEY_FACT.format(label=lb, key=k))
                    for lb, k in zip(labels, codes, strict=True)
                ]
                first = rng.randrange(len(paragraphs))
                hay = _haystack(enc, paragraphs, first, room - sum(map(len, facts)))
                body, positions = _with_facts(hay, facts)
                text = enc.text(body)
                if all(text.count(code) == 1 for code in codes):
                    break
            prompt = head + body
            for j in sorted(_spread(rng, keys, asked)):
                requests.append(
                    Request(
                        "multikey",
                        f"multikey-{length}-c{c}-{labels[j]}",
                        prompt,
                        asks[j],
                        len(enc.ids(" " + codes[j] + ".")) + COPY_SLACK_TOKENS,
                        {
                            "length": length,
                            "context": c,
                            "depth": round((len(head) + positions[j]) / len(prompt), 3),
                            "label": labels[j],
                            "expected": codes[j],
                            "keys": dict(zip(labels, codes, strict=True)),
                            "tokens": len(prompt) + len(asks[j]),
                        },
                    )
                )
    return requests


def _next_id(rng: random.Random, previous: str) -> str:
    """``previous`` with one or two digits after its first group changed."""
    digits = list(previous.replace("-", ""))
    for at in rng.sample(range(4, 12), rng.choice(ID_CHANGES)):
        digits[at] = rng.choice([d for d in ID_DIGITS if d != digits[at]])
    flat = "".join(digits)
    return f"{flat[:4]}-{flat[4:8]}-{flat[8:]}"


def distractor_records(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """``count`` (number, id) records: distinct four-digit numbers in random
    order (consecutive ones made a record's number itself a near-identical
    distractor, and dense attention found none at 2K); distinct ids of one
    shared first group, each a step of :func:`_next_id` from the one before."""
    numbers = rng.sample(range(1000, 10_000), count)
    ident = "-".join("".join(rng.choices(ID_DIGITS, k=4)) for _ in range(3))
    records, seen = [], set()
    for n in range(count):
        while ident in seen:
            ident = _next_id(rng, ident)
        seen.add(ident)
        records.append((f"{numbers[n]:04d}", ident))
        ident = _next_id(rng, ident)
    return records


def distractor_requests(
    enc: Encoder, lengths: list[int], instances: int, questions: int, seed: int
) -> list[Request]:
    """Contexts of ``length`` tokens (with the question) filled with
    :func:`distractor_records`; each question names a record at a spread
    depth and the answer must copy its id exactly."""
    head = enc.lead + enc.ids(DISTRACTOR_HEAD)
    requests = []
    for length in lengths:
        for c, asked in enumerate(_contexts(instances, questions)):
            rng = random.Random(f"distractor-{seed}-{length}-{c}")
            sample = DISTRACTOR_QUESTION.format(number="0000")
            room = length - len(head) - len(enc.ids(sample))
            line = len(enc.ids(DISTRACTOR_LINE.format(number="0000", id="0" * 14)))
            records = distractor_records(rng, room // line * 2 + 8)
            prompt, starts = list(head), []
            for number, ident in records:
                ids = enc.ids(DISTRACTOR_LINE.format(number=number, id=ident))
                if len(prompt) + len(ids) > len(head) + room:
                    break
                starts.append(len(prompt))
                prompt += ids
            kept = len(starts)
            for r in sorted(_spread(rng, kept, asked)):
                number, ident = records[r]
                question = enc.ids(DISTRACTOR_QUESTION.format(number=number))
                requests.append(
                    Request(
                        "distractor",
                        f"distractor-{length}-c{c}-r{number}",
                        prompt,
                        question,
                        len(enc.ids(ident)) + COPY_SLACK_TOKENS,
                        {
                            "length": length,
                            "context": c,
                            "depth": round(starts[r] / len(prompt), 3),
                            "record": number,
                            "expected": ident,
                            "records": kept,
                            "neighbours": {
                                n: i
                                for n, i in records[max(r - 3, 0) : min(r + 4, kept)]
                                if n != number
                            },
                            "tokens": len(prompt) + len(question),
                        },
                    )
                )
    return requests


def agreement_requests(
    enc: Encoder, count: int, prompt_tokens: int, generated: int
) -> list[Request]:
    """The first ``prompt_tokens`` of a module; its next token is forced."""
    requests = []
    for name in AGREE_FILES[:count]:
        text = (stdlib_dir() / name).read_text(encoding="utf-8")
        ids = _leading_ids(enc, text, prompt_tokens + 1 - len(enc.lead))
        if ids is None:
            raise ValueError(f"{name} has fewer than {prompt_tokens + 1} tokens")
        ids = enc.lead + ids
        requests.append(
            Request(
                "agreement",
                f"agree-{name}",
                ids[:prompt_tokens],
                [ids[prompt_tokens]],
                generated,
                {"file": name, "prompt_tokens": prompt_tokens},
            )
        )
    return requests


def build_requests(enc: Encoder, args: argparse.Namespace) -> list[Request]:
    """Every request of the run, in prefill order."""
    requests = document_requests(
        enc,
        (args.text_docs, args.text_tokens),
        (args.code_docs, args.code_tokens),
        args.book_tokens,
        args.scored_tokens,
    )
    if "passkey" in args.tasks:
        key_depths = args.passkey_depths or depths(args.instances)
        requests += passkey_requests(enc, args.lengths, key_depths, args.seed)
    if "multikey" in args.tasks:
        requests += multikey_requests(
            enc, args.lengths, args.instances, args.questions, args.keys, args.seed
        )
    if "distractor" in args.tasks:
        requests += distractor_requests(
            enc, args.lengths, args.instances, args.questions, args.seed
        )
    if args.agree_prompts > 0:
        requests += agreement_requests(
            enc, args.agree_prompts, args.agree_prompt_tokens, args.agree_tokens
        )
    return requests


# ------------------------------------------------------------------ scoring


def copied(answer: str) -> str:
    """What an answer copies: its leading run of letters, digits and dashes."""
    match = COPY_CHARS.match(answer)
    return match.group(1) if match else ""


def retrieval_outcome(request: Request, answer: str) -> dict[str, Any]:
    """Whether ``answer`` is right: the pass key anywhere in it; for the
    other tasks an exact copy of the expected string (and which other
    label's or record's string it copied, if any)."""
    expected = request.meta["expected"]
    outcome: dict[str, Any] = {
        "name": request.name,
        "length": request.meta["length"],
        "depth": request.meta["depth"],
        "expected": expected,
        "answer": answer,
    }
    if request.task == "passkey":
        return {**outcome, "correct": expected in answer}
    got = copied(answer)
    others = request.meta["keys" if request.task == "multikey" else "neighbours"]
    confused = [k for k, v in others.items() if v == got and v != expected]
    return {
        **outcome,
        "copied": got,
        "correct": got == expected,
        "confused_with": confused[0] if confused else None,
    }


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of ``values``."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "documents": len(values),
    }


def score(
    requests: list[Request],
    outputs: list[Any],
    dense: list[list[int]] | None,
    enc: Encoder,
) -> dict[str, Any]:
    """Perplexities, retrieval answers and agreement of one configuration."""
    nll: dict[str, list[float]] = {}
    per_group: dict[str, list[float]] = {}
    per_document: dict[str, float] = {}
    outcomes: dict[str, list[dict[str, Any]]] = {}
    agreement: dict[str, float] = {}
    for i, (request, output) in enumerate(zip(requests, outputs, strict=True)):
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        free = ids[len(request.forced) :]
        if request.task == "perplexity":
            # position 0 is the dense prefill's prediction: not scored
            losses = [
                -completion.logprobs[j][ids[j]].logprob for j in range(1, len(ids))
            ]
            ppl = math.exp(sum(losses) / len(losses))
            per_document[request.name] = ppl
            per_group.setdefault(request.meta["group"], []).append(ppl)
            nll.setdefault(request.meta["group"], []).extend(losses)
        elif request.task in TASKS:
            outcome = retrieval_outcome(request, enc.text(free))
            outcomes.setdefault(request.task, []).append(outcome)
        else:
            agreement[request.name] = (
                1.0 if dense is None else prefix_agreement(dense[i], free)
            )
    retrieval = {}
    for task, items in outcomes.items():
        by_length: dict[int, list[bool]] = {}
        for item in items:
            by_length.setdefault(item["length"], []).append(item["correct"])
        retrieval[task] = {
            "accuracy": sum(x["correct"] for x in items) / len(items),
            # string keys, as the JSON file has them
            "by_length": {str(n): sum(v) / len(v) for n, v in by_length.items()},
            "instances": items,
        }
    passkey = retrieval.get("passkey")
    return {
        "perplexity": {k: math.exp(sum(v) / len(v)) for k, v in nll.items()},
        "perplexity_stats": {k: spread(v) for k, v in per_group.items()},
        "perplexity_per_document": per_document,
        "retrieval": retrieval,
        # the pass key's fields as before (benchmarks/report.py reads them)
        "passkey_accuracy": passkey["accuracy"] if passkey else None,
        "passkey_accuracy_by_length": passkey["by_length"] if passkey else {},
        "agreement": sum(agreement.values()) / len(agreement) if agreement else None,
        "agreement_per_prompt": agreement,
    }


# --------------------------------------------------------- plan and estimate

#: Speeds of vLLM's CPU worker on this project's machine (2 x86-64 cores,
#: AVX2), float32, Qwen2.5-Coder-0.5B, fitted to the runs in
#: ``benchmarks/results/accuracy*.json`` (prefill: 15K tokens of 2K prompts
#: in 138 s, 59K of 2K-8K in 684 s, 33K of 16K in 839 s; a configuration
#: decoding 8 requests of 2K in 27-42 s, 15 of 2K-8K in 50-109 s).
#: Prefill seconds per token, the part that does not grow with context.
QWEN_PREFILL_S_PER_TOKEN = 1 / 155
#: Prefill seconds per token per token of prompt (attention).
QWEN_PREFILL_S_PER_TOKEN_CTX = 1.7e-6
#: Seconds of a decode step whatever the batch (every weight read once).
QWEN_STEP_S = 0.25
#: Decode seconds per step per token of context of each running request.
QWEN_STEP_S_PER_CTX = 0.035 / 1024
#: Decode seconds per step per running request: its logits (136M
#: multiply-adds at the ~55 GMAC/s the prefill speed implies; derived, not
#: measured).
QWEN_STEP_S_PER_REQUEST = 0.0025
#: Engine start with the calibration cached (seconds).
ENGINE_START_S = 50.0
#: Qwen2.5-Coder-0.5B's shapes, which the speeds above belong to.
QWEN_SHAPES = {
    "matmul_params": 24
    * (896 * (14 * 64 + 2 * 2 * 64) + 14 * 64 * 896 + 3 * 896 * 4864),
    "attn_width": 24 * 14 * 64,
    "full_layers": 24,
    "weight_bytes": 1_260_367_448,
    "logits_width": 151_936 * 896,
}


@dataclass(frozen=True)
class Shapes:
    """What the run time and KV memory scale with, read from a model folder.

    The estimate scales the Qwen speeds above by these shapes for other
    models (Gemma 3's are not measured): prefill by the projections'
    multiply-adds and the attention width, a decode step by the weight
    bytes, the attention layers and the logits.
    """

    matmul_params: int
    """Multiply-adds per token in the decoder layers' projections and MLPs."""
    attn_width: int
    """Query heads x head size, summed over the full-attention layers."""
    window_width: int
    """The same over the sliding-window layers."""
    window: int
    """Their window in tokens (0: none)."""
    full_layers: int
    window_layers: int
    weight_bytes: int
    """Bytes of the folder's safetensors files (bfloat16 there)."""
    logits_width: int
    """Vocabulary x hidden size."""
    kv_bytes_per_token: int
    """K and V of every layer at the run's dtype: window layers too, since
    vLLM's CPU platform has no hybrid KV cache manager (every layer keeps
    every token's KV)."""
    max_model_len: int

    @classmethod
    def of(cls, folder: Path, dtype: str) -> Shapes:
        cfg = json.loads((folder / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        head_dim = cfg.get("head_dim") or hidden // heads
        kinds = cfg.get("layer_types") or ["full_attention"] * layers
        windowed = sum(k == "sliding_attention" for k in kinds)
        per_layer = (
            hidden * (heads + 2 * kv_heads) * head_dim
            + heads * head_dim * hidden
            + 3 * hidden * cfg["intermediate_size"]
        )
        dtype_bytes = 2 if dtype in ("bfloat16", "float16", "half") else 4
        return cls(
            matmul_params=layers * per_layer,
            attn_width=(layers - windowed) * heads * head_dim,
            window_width=windowed * heads * head_dim,
            window=int(cfg.get("sliding_window") or 0) if windowed else 0,
            full_layers=layers - windowed,
            window_layers=windowed,
            weight_bytes=sum(p.stat().st_size for p in folder.glob("*.safetensors")),
            logits_width=cfg["vocab_size"] * hidden,
            kv_bytes_per_token=layers * 2 * kv_heads * head_dim * dtype_bytes,
            max_model_len=int(cfg.get("max_position_embeddings") or 0),
        )

    def prefill_s(self, start: int, end: int) -> float:
        """Seconds to prefill positions ``start``..``end`` of a prompt."""
        linear = (
            QWEN_PREFILL_S_PER_TOKEN * self.matmul_params / QWEN_SHAPES["matmul_params"]
        )
        full = (
            QWEN_PREFILL_S_PER_TOKEN_CTX * self.attn_width / QWEN_SHAPES["attn_width"]
        )
        window = (
            QWEN_PREFILL_S_PER_TOKEN_CTX * self.window_width / QWEN_SHAPES["attn_width"]
        )
        seconds = linear * (end - start) + full * (end * end - start * start)
        if self.window:
            # position p of a window layer attends to min(p, window) tokens
            low, high = min(start, self.window), min(end, self.window)
            past = max(0, end - max(start, self.window))
            seconds += window * (high * high - low * low + 2 * self.window * past)
        return seconds

    def step_s(self, contexts: list[int]) -> float:
        """Seconds of one decode step of requests with these contexts."""
        per_ctx = QWEN_STEP_S_PER_CTX / QWEN_SHAPES["full_layers"]
        attention = sum(
            per_ctx
            * (self.full_layers * n + self.window_layers * min(n, self.window or n))
            for n in contexts
        )
        per_request = (
            QWEN_STEP_S_PER_REQUEST * self.logits_width / QWEN_SHAPES["logits_width"]
        )
        fixed = QWEN_STEP_S * self.weight_bytes / QWEN_SHAPES["weight_bytes"]
        return fixed + attention + per_request * len(contexts)


def shared_prefixes(requests: list[Request], block: int) -> list[int]:
    """Tokens of each prompt that vLLM's prefix cache holds when it is
    prefilled after the ones before it (whole blocks of an earlier prompt's
    prefix; never the last token)."""
    cached: set[int] = set()
    shared = []
    for request in requests:
        chain, hit, hitting = 0, 0, True
        for end in range(block, len(request.prompt), block):
            chain = hash((chain, tuple(request.prompt[end - block : end])))
            if hitting and chain in cached:
                hit = end
            else:
                hitting = False
            cached.add(chain)
        shared.append(hit)
    return shared


@dataclass(frozen=True)
class Plan:
    """What a run will do and about how long it takes (seconds)."""

    prompts: dict[str, int]
    prompt_tokens: int
    prefill_tokens: int
    """After prefix sharing (what the warm-up prefill computes)."""
    longest: int
    configs: int
    decode_steps: int
    kv_gib: int
    """``VLLM_CPU_KVCACHE_SPACE`` that holds every prompt and the running
    requests' own blocks, with a third to spare."""
    start_s: float
    prefill_s: float
    config_s: float
    """One configuration: the prompts' last blocks again, then decode."""

    @property
    def total_s(self) -> float:
        return self.start_s + self.prefill_s + self.configs * self.config_s


def make_plan(requests: list[Request], configs: int, shapes: Shapes) -> Plan:
    block = CPU_BLOCK_SIZES[0]  # INFINIGEN's smallest: the most recomputed
    shared = shared_prefixes(requests, block)
    prefill = sum(
        shapes.prefill_s(s, len(r.prompt))
        for r, s in zip(requests, shared, strict=True)
    )
    # every configuration recomputes each prompt's last (partial) block
    refill = sum(
        shapes.prefill_s((len(r.prompt) - 1) // block * block, len(r.prompt))
        for r in requests
    )
    steps = max(r.max_tokens for r in requests)
    decode = sum(
        shapes.step_s([len(r.prompt) + t for r in requests if r.max_tokens > t])
        for t in range(steps)
    )
    unique = sum(len(r.prompt) - s for r, s in zip(requests, shared, strict=True))
    own = sum(math.ceil((block + r.max_tokens) / block) + 1 for r in requests)
    kv_bytes = (unique + own * block) * shapes.kv_bytes_per_token
    prompts: dict[str, int] = {}
    for r in requests:
        prompts[r.task] = prompts.get(r.task, 0) + 1
    return Plan(
        prompts=prompts,
        prompt_tokens=sum(len(r.prompt) for r in requests),
        prefill_tokens=unique,
        longest=max(len(r.prompt) + r.max_tokens for r in requests),
        configs=configs,
        decode_steps=steps,
        kv_gib=max(2, math.ceil(kv_bytes * 4 / 3 / (1 << 30))),
        start_s=ENGINE_START_S,
        prefill_s=prefill,
        config_s=refill + decode,
    )


def describe(plan: Plan, requests: list[Request]) -> str:
    """The plan in a few lines."""
    groups: dict[str, int] = {}
    lengths: dict[str, set[int]] = {}
    for r in requests:
        if r.task == "perplexity":
            groups[r.meta["group"]] = groups.get(r.meta["group"], 0) + 1
        elif r.task in TASKS:
            lengths.setdefault(r.task, set()).add(r.meta["length"])
    tasks = ", ".join(
        f"{t} x{plan.prompts[t]} at {sorted(v)}" for t, v in lengths.items()
    )
    return (
        f"{len(requests)} prompts: perplexity "
        + ", ".join(f"{g} x{n}" for g, n in groups.items())
        + (f"; {tasks}" if tasks else "")
        + (
            f"; agreement x{plan.prompts['agreement']}"
            if "agreement" in plan.prompts
            else ""
        )
        + f"\n  {plan.prompt_tokens} prompt tokens, {plan.prefill_tokens} to prefill "
        f"after shared prefixes, longest request {plan.longest}; KV cache "
        f"{plan.kv_gib} GiB\n  {plan.configs} configurations x {plan.decode_steps} "
        f"decode steps\n  estimate: start {plan.start_s / 60:.1f} + prefill "
        f"{plan.prefill_s / 60:.1f} + {plan.configs} x {plan.config_s / 60:.1f} min "
        f"= {plan.total_s / 60:.0f} min"
    )


# ------------------------------------------------------------------- engine


def forced_tokens_processor() -> type:
    """The logits processor class ``ForcedTokens``: teacher forcing. A
    request whose ``extra_args[FORCE_KEY]`` lists token ids gets, at output
    position ``i < len(list)``, every logit set to -inf except that of
    ``list[i]``; later positions are left alone (greedy). It changes the
    argmax, so vLLM applies it to greedy requests as well.

    Defined here, not at module level, so that building and planning the
    requests (and their tests) imports no vLLM; the engine is in-process,
    so the class is used as is, never pickled.
    """
    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import (
        BatchUpdate,
        LogitsProcessor,
        MoveDirectionality,
    )

    class ForcedTokens(LogitsProcessor):
        def __init__(
            self, vllm_config: Any, device: torch.device, is_pin_memory: bool
        ) -> None:
            # persistent-batch row -> (token ids to force, live output ids)
            self.rows: dict[int, tuple[list[int], list[int]]] = {}

        @classmethod
        def validate_params(cls, sampling_params: SamplingParams) -> None:
            forced = (sampling_params.extra_args or {}).get(FORCE_KEY)
            if forced is not None and not (
                isinstance(forced, list) and all(isinstance(t, int) for t in forced)
            ):
                raise ValueError(f"extra_args[{FORCE_KEY!r}] must be a list of ints")

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            for row in batch_update.removed:
                self.rows.pop(row, None)
            for row, params, _prompt, output in batch_update.added:
                forced = (params.extra_args or {}).get(FORCE_KEY)
                if forced:
                    self.rows[row] = (list(forced), output)
                else:
                    self.rows.pop(row, None)
            for src, dst, direction in batch_update.moved:
                moving = self.rows.pop(src, None)
                displaced = self.rows.pop(dst, None)
                if moving is not None:
                    self.rows[dst] = moving
                if displaced is not None and direction == MoveDirectionality.SWAP:
                    self.rows[src] = displaced

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            rows, tokens = [], []
            for row, (forced, output) in self.rows.items():
                if len(output) < len(forced):
                    rows.append(row)
                    tokens.append(forced[len(output)])
            if rows:
                index = torch.tensor(rows, dtype=torch.long, device=logits.device)
                token = torch.tensor(tokens, dtype=torch.long, device=logits.device)
                logits[index] = float("-inf")
                logits[index, token] = 0.0
            return logits

    return ForcedTokens


def run_config(llm: Any, requests: list[Request]) -> tuple[list[Any], float]:
    """One ``generate`` over every request; checks the forced tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=r.max_tokens,
            ignore_eos=True,
            logprobs=0,
            extra_args={FORCE_KEY: r.forced},
        )
        for r in requests
    ]
    start = time.perf_counter()
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=r.prompt) for r in requests],
        params,
        use_tqdm=False,
    )
    seconds = time.perf_counter() - start
    for request, output in zip(requests, outputs, strict=True):
        got = list(output.outputs[0].token_ids)
        assert len(got) == request.max_tokens, (request.name, len(got))
        assert got[: len(request.forced)] == request.forced, (
            f"{request.name}: sampled tokens differ from the forced ones"
        )
    return outputs, seconds


# ------------------------------------------------------------------- output


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = [head, ["---"] * len(head), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def model_name(result: dict[str, Any]) -> str:
    return str(result.get("model_name") or Path(result["model"]).name)


#: Document kinds pooled into one perplexity: the book is natural text too.
POOLS = {"natural text": ("text", "book"), "code": ("code",)}


def pooled_by_kind(result: dict[str, Any], config: dict[str, Any]) -> dict[str, float]:
    """Perplexity of every scored token of the documents of each pool of
    :data:`POOLS` (``exp`` of their mean NLL), from the per-document
    perplexities and scored-token counts."""
    out = {}
    docs = [r for r in result["requests"] if r["task"] == "perplexity"]
    per_doc = config["perplexity_per_document"]
    for pool, kinds in POOLS.items():
        chosen = [r for r in docs if r["kind"] in kinds and r["name"] in per_doc]
        tokens = sum(r["scored_tokens"] for r in chosen)
        if tokens:
            nll = sum(r["scored_tokens"] * math.log(per_doc[r["name"]]) for r in chosen)
            out[pool] = math.exp(nll / tokens)
    return out


def tables(result: dict[str, Any]) -> str:
    """Markdown: one row per configuration (blocks read, pooled perplexity
    per group, accuracy per retrieval task, greedy agreement); perplexity
    against dense; per-document perplexity per group (mean ± std, min-max);
    retrieval per task and length."""
    configs = result["configs"]
    dense = next(c for c in configs if c["policy"] == "dense")
    groups = list(dense["perplexity"])
    tasks = [t for t in TASKS if t in dense["retrieval"]]

    def name(c: dict[str, Any]) -> list[str]:
        read = c["selection_fraction"]
        return [c["policy"], f"{c['budget']:g}", _num(read, 3)]

    main = _table(
        ["policy", "budget", "blocks read"]
        + [f"ppl {g}" for g in groups]
        + tasks
        + ["greedy agreement"],
        [
            name(c)
            + [_num(c["perplexity"][g]) for g in groups]
            + [_num(c["retrieval"][t]["accuracy"]) for t in tasks]
            + [_num(c["agreement"])]
            for c in configs
        ],
    )
    relative = _table(
        ["policy", "budget", "blocks read"] + [f"ppl {g} vs dense" for g in groups],
        [
            name(c)
            + [
                f"{100 * (c['perplexity'][g] / dense['perplexity'][g] - 1):+.1f}%"
                for g in groups
            ]
            for c in configs
            if c is not dense
        ],
    )

    dense_pooled = pooled_by_kind(result, dense)
    pooled = _table(
        ["policy", "budget", "blocks read"]
        + [f"{pool} ({' + '.join(POOLS[pool])})" for pool in dense_pooled],
        [
            name(c)
            + [
                f"{value:.2f} ({100 * (value / dense_pooled[pool] - 1):+.1f}%)"
                for pool, value in pooled_by_kind(result, c).items()
            ]
            for c in configs
        ],
    )

    def stats(s: dict[str, float]) -> str:
        return f"{s['mean']:.2f} ± {s['std']:.2f} ({s['min']:.2f}-{s['max']:.2f})"

    per_doc = _table(
        ["policy", "budget"]
        + [f"{g} (n={dense['perplexity_stats'][g]['documents']})" for g in groups],
        [
            [c["policy"], f"{c['budget']:g}"]
            + [stats(c["perplexity_stats"][g]) for g in groups]
            for c in configs
        ],
    )
    lengths = {
        t: sorted({int(n) for n in dense["retrieval"][t]["by_length"]}) for t in tasks
    }
    by_length = _table(
        ["policy", "budget"] + [f"{t} {n}" for t in tasks for n in lengths[t]],
        [
            [c["policy"], f"{c['budget']:g}"]
            + [
                _num(c["retrieval"][t]["by_length"].get(str(n)))
                for t in tasks
                for n in lengths[t]
            ]
            for c in configs
        ],
    )
    counts = {
        t: len(dense["retrieval"][t]["instances"]) // max(len(lengths[t]), 1)
        for t in tasks
    }
    return (
        f"`{result['command']}` ({result['seconds'] / 60:.1f} min, "
        f"{result['machine']}, {result['dtype']}, {model_name(result)})\n\n"
        + main
        + "\n\nPooled perplexity against dense:\n\n"
        + relative
        + "\n\nPooled by kind (every scored token of the kind's documents), "
        + "against dense:\n\n"
        + pooled
        + "\n\nPer-document perplexity, mean ± std (min-max):\n\n"
        + per_doc
        + "\n\nRetrieval by context length ("
        + ", ".join(f"{t}: {n} per length" for t, n in counts.items())
        + "):\n\n"
        + by_length
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    dense = next(c for c in configs if c["policy"] == "dense")
    sparse = [c for c in configs if c["policy"] != "dense"]
    policies = list(dict.fromkeys(c["policy"] for c in sparse))
    panels: list[tuple[str, Any]] = [
        (f"perplexity: {name}", lambda c, n=name: c["perplexity"][n])
        for name in dense["perplexity"]
    ]
    panels += [
        (f"{task} accuracy", lambda c, t=task: c["retrieval"][t]["accuracy"])
        for task in TASKS
        if task in dense["retrieval"]
    ]
    if dense["agreement"] is not None:
        panels.append(("greedy agreement with dense", lambda c: c["agreement"]))
    cols = 2 if len(panels) == 4 else min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows))
    flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax, (title, value) in zip(flat, panels, strict=False):
        for i, policy in enumerate(policies):
            points = sorted(
                (c["budget"], value(c)) for c in sparse if c["policy"] == policy
            )
            # shrinking markers keep coinciding points of several policies seen
            ax.plot(
                *zip(*points, strict=True),
                marker="osD^v"[i % 5],
                markersize=9 - 1.5 * i,
                label=policy,
            )
        ax.axhline(value(dense), color="black", linestyle="--", label="dense")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("KV budget (fraction of blocks read)")
        ax.grid(alpha=0.3)
    for ax in flat[len(panels) :]:
        ax.axis("off")
    flat[0].legend(fontsize=8)
    fig.suptitle(f"Sparse decode accuracy, {model_name(result)} (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------- main


def parse_engine_options(parser: argparse.ArgumentParser, text: str) -> dict[str, Any]:
    """``--engine-options``: a JSON object of INFINIGEN start-up options, the
    policy left to the run (an error through ``parser`` otherwise)."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        parser.error(f"--engine-options: {error}")
    if not isinstance(options, dict) or "policy" in options:
        parser.error("--engine-options: a JSON object of options but policy")
    return options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Arguments with the ``--quick`` or full defaults filled in."""
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="(a | b): the default with --quick | without it.",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="2K contexts, fewer documents")
    add("--plan", action="store_true", help="print the plan and exit (no engine)")
    add(
        "--model",
        default=None,
        help="qwen2.5-coder-0.5b (default), gemma3-270m, or a model folder",
    )
    add("--dtype", default="float32", help="float32 on AVX2 CPUs")
    add(
        "--block-size",
        type=int,
        default=None,
        help="KV block size (default: INFINIGEN's on this platform)",
    )
    add("--policies", nargs="+", help="sparse policies (infinigen quest | all)")
    add("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    add(
        "--min-blocks",
        type=int,
        default=0,
        help="budget floor in blocks (engine default 8); 0: the budget is exact",
    )
    add("--text-docs", type=int, help="natural-text documents (3 | 8)")
    add("--text-tokens", type=int, nargs="*", help="their prompt tokens (2048 | 4096)")
    add("--code-docs", type=int, help="code documents (3 | 8)")
    add("--code-tokens", type=int, nargs="*", help="their prompt tokens (2048 | 4096)")
    add("--book-tokens", type=int, help="PG-19 prompt tokens (0 | 2048; 0: none)")
    add("--scored-tokens", type=int, help="scored tokens per document (32 | 64)")
    add("--tasks", nargs="*", default=list(TASKS), help="retrieval tasks")
    add(
        "--max-context",
        type=int,
        help="longest retrieval context: lengths double from 2048 (2048 | 8192)",
    )
    add("--lengths", type=int, nargs="*", help="retrieval lengths (else from above)")
    add("--instances", type=int, help="instances per task and length (3 | 6)")
    add("--questions", type=int, default=3, help="questions per shared context")
    add("--keys", type=int, default=6, help="labelled keys per multikey context")
    add("--passkey-depths", type=float, nargs="*", help="(--instances from .1 to .9)")
    add("--agree-prompts", type=int, help="code-completion prompts (2 | 3)")
    add("--agree-prompt-tokens", type=int, help="their tokens (1536 | 2048)")
    add("--agree-tokens", type=int, help="greedy tokens compared (24 | 32)")
    add(
        "--variants",
        nargs="*",
        default=[],
        metavar="NAME=JSON",
        help="extra InfiniGen series with run-time options, e.g. "
        """'noresid={"residual_means": false}' (measured at every budget)""",
    )
    add(
        "--engine-options",
        default="{}",
        metavar="JSON",
        help="INFINIGEN options fixed at start-up for the whole run (e.g. "
        """'{"partial_ratio": 0.5}'; the dense row stays exact)""",
    )
    add("--seed", type=int, default=0, help="of the keys and records")
    add(
        "--out",
        help="JSON path (default: benchmarks/results/accuracy[_quick][_MODEL].json)",
    )
    add(
        "--replot", action="store_true", help="only redraw the plot and tables of --out"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    defaults: dict[str, Any] = {
        "policies": ["infinigen", "quest"] if quick else list(POLICIES),
        "text_docs": 3 if quick else 8,
        "text_tokens": [2048] if quick else [4096],
        "code_docs": 3 if quick else 8,
        "code_tokens": [2048] if quick else [4096],
        "book_tokens": 0 if quick else 2048,
        "scored_tokens": 32 if quick else 64,
        "max_context": 2048 if quick else 8192,
        "instances": 3 if quick else 6,
        "agree_prompts": 2 if quick else 3,
        "agree_prompt_tokens": 1536 if quick else 2048,
        "agree_tokens": 24 if quick else 32,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lengths is None:
        args.lengths = [
            2048 << i for i in range(8) if 2048 << i <= max(args.max_context, 2048)
        ]
    unknown = set(args.policies) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}; known: {POLICIES}")
    if set(args.tasks) - set(TASKS):
        parser.error(f"unknown tasks {sorted(set(args.tasks) - set(TASKS))}")
    if args.instances < 1 or args.questions < 1:
        parser.error("--instances and --questions must be >= 1")
    args.engine_options = parse_engine_options(parser, args.engine_options)
    args.variant_options = {}
    for text in args.variants:
        name, _, options = text.partition("=")
        try:
            parsed = json.loads(options)
        except json.JSONDecodeError as error:
            parser.error(f"--variants {text!r}: {error}")
        if not name or not isinstance(parsed, dict) or "policy" in parsed:
            parser.error(f"--variants {text!r}: NAME={{options but policy}}")
        args.variant_options[f"infinigen+{name}"] = parsed
    from vllm_infinigen.models import DEFAULT_MODEL, MODEL_NAMES

    args.model_name = args.model or DEFAULT_MODEL
    if args.model_name not in MODEL_NAMES:
        if not Path(args.model_name).is_dir():
            parser.error(f"--model: neither {MODEL_NAMES} nor a folder")
        args.model_name = Path(args.model_name).resolve().name
    if args.out is None:
        stem = "accuracy" + ("_quick" if quick else "")
        if args.model_name != DEFAULT_MODEL:
            stem += "_" + args.model_name
        args.out = str(RESULTS / f"{stem}.json")
    return args


def model_folder(model: str | None) -> Path:
    from vllm_infinigen.models import DEFAULT_MODEL, MODEL_NAMES, build_model

    if model is None or model in MODEL_NAMES:
        return Path(build_model(model or DEFAULT_MODEL))
    return Path(model).resolve()


def main() -> None:
    args = parse_args()
    if args.replot:
        out = Path(args.out)
        result = json.loads(out.read_text())
        if "retrieval" not in result["configs"][0]:
            raise SystemExit(f"{out} predates the retrieval suite: see report.py")
        plot(result, out.with_suffix(".png"))
        print(tables(result))
        return
    folder = model_folder(args.model)
    from transformers import AutoTokenizer

    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {message}", flush=True)

    enc = Encoder(AutoTokenizer.from_pretrained(folder))
    requests = build_requests(enc, args)
    configs: list[dict[str, Any]] = [{"policy": "dense", "budget": 1.0}]
    configs += [{"policy": p, "budget": b} for p in args.policies for b in args.budgets]
    configs += [
        {"policy": name, "budget": b, "engine": {"policy": "infinigen", **options}}
        for name, options in args.variant_options.items()
        for b in args.budgets
    ]
    shapes = Shapes.of(folder, args.dtype)
    plan = make_plan(requests, len(configs), shapes)
    log(f"{args.model_name}: {describe(plan, requests)}")
    if shapes.max_model_len and plan.longest + 16 > shapes.max_model_len:
        raise SystemExit(f"the longest request exceeds {shapes.max_model_len} tokens")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if plan.kv_gib * (1 << 30) > 0.6 * memory:
        log(f"the KV cache would take over 60% of this machine's {memory >> 30} GiB")
    if args.plan:
        return

    # In-process engine (deterministic, and the logits processor class is
    # used as is, not pickled); vLLM reads these when the engine starts.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(plan.kv_gib))
    if int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) < plan.kv_gib:
        log(
            f"VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} is under "
            f"the plan's {plan.kv_gib} GiB: evicted prompts are prefilled again"
        )
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # Selection at every length (sparse_min_tokens 0): accuracy measures the
    # selection, also where the engine would read short steps whole.
    options = {
        **args.engine_options,
        "policy": "infinigen",
        "min_blocks": args.min_blocks,
        "sparse_min_tokens": 0,
    }
    llm = LLM(
        model=str(folder),
        dtype=args.dtype,
        enforce_eager=True,
        attention_backend="INFINIGEN",
        additional_config={"infinigen": options},
        max_model_len=plan.longest + 16,
        enable_prefix_caching=True,
        max_num_batched_tokens=2048,
        max_num_seqs=max(256, len(requests)),
        logits_processors=[forced_tokens_processor()],
        seed=0,
        **({} if args.block_size is None else {"block_size": args.block_size}),
    )
    tracked = llm.collective_rpc("infinigen_track", args=(list(args.policies),))
    log(f"engine ready; tracking {tracked[0]}")

    # Options a variant changes go back to their start-up values for the others.
    from vllm_infinigen.config import InfiniGenConfig

    start_options = InfiniGenConfig.from_dict(args.engine_options).to_dict()
    varied = {k for o in args.variant_options.values() for k in o}

    def configure(config: dict[str, Any]) -> dict[str, Any]:
        engine = config.get("engine", {"policy": config["policy"]})
        wanted = {
            **{k: start_options[k] for k in varied},
            **engine,
            "budget": config["budget"],
            "min_blocks": args.min_blocks,
        }
        return dict(llm.collective_rpc("infinigen_configure", args=(wanted,))[0])

    configure(configs[0])
    start = time.perf_counter()
    for n, request in enumerate(requests, 1):
        # one at a time: a prompt finds the prefixes it shares already cached
        llm.generate(
            [TokensPrompt(prompt_token_ids=request.prompt)],
            SamplingParams(temperature=0.0, max_tokens=1),
            use_tqdm=False,
        )
        if n % 10 == 0 or n == len(requests):
            log(f"prefilled {n}/{len(requests)} prompts")
    warm_s = time.perf_counter() - start
    log(f"prefilled {plan.prefill_tokens} tokens in {warm_s:.0f} s")

    # a cached prompt recomputes its last block only
    block = llm.llm_engine.vllm_config.cache_config.block_size
    expected_cached = sum((len(r.prompt) - 1) // block * block for r in requests)
    rows: list[dict[str, Any]] = []
    dense_ids: list[list[int]] | None = None
    for n, config in enumerate(configs, 1):
        effective = configure(config)
        llm.collective_rpc("infinigen_reset_stats")
        outputs, seconds = run_config(llm, requests)
        stats = llm.collective_rpc("infinigen_stats")[0]
        total = stats.get("total", {})
        row = {
            **config,
            "selection_fraction": total.get("selection_fraction"),
            "blocks_selected": total.get("blocks_selected"),
            "blocks_total": total.get("blocks_total"),
            "seconds": seconds,
            "prompt_tokens_cached": sum(o.num_cached_tokens or 0 for o in outputs),
            "options": effective,
            **score(requests, outputs, dense_ids, enc),
        }
        if config["policy"] == "dense":
            dense_ids = [
                list(o.outputs[0].token_ids)[len(r.forced) :]
                for r, o in zip(requests, outputs, strict=True)
            ]
        rows.append(row)
        if row["prompt_tokens_cached"] < expected_cached:
            log(
                f"only {row['prompt_tokens_cached']} of {expected_cached} prompt "
                "tokens came from the prefix cache (evicted?)"
            )
        ppl = " ".join(f"{k} {v:.3f}" for k, v in row["perplexity"].items())
        found = " ".join(
            f"{t} {v['accuracy']:.2f}" for t, v in row["retrieval"].items()
        )
        read = row["selection_fraction"]
        left = (len(configs) - n) * seconds
        log(
            f"{n}/{len(configs)} {config['policy']} {config['budget']:g}: "
            f"read {read if read is None else round(read, 3)}, ppl {ppl}, {found}, "
            f"agreement {row['agreement']} ({seconds:.0f} s, "
            f"{row['prompt_tokens_cached']} prompt tokens cached; "
            f"~{left / 60:.0f} min left)"
        )

    settings = {
        k: v for k, v in vars(args).items() if k not in ("plan", "replot", "out")
    }
    result = {
        "command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:]),
        "machine": cpu_model(),
        "model": str(folder),
        "model_name": args.model_name,
        "dtype": args.dtype,
        "seconds": time.perf_counter() - t0,
        "prefill_seconds": warm_s,
        "min_blocks": args.min_blocks,
        "block_size": block,
        "settings": settings,
        "plan": {**asdict(plan), "total_s": plan.total_s},
        "kv_cache_gib": int(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
        "requests": [
            {
                "task": r.task,
                "name": r.name,
                "prompt_tokens": len(r.prompt),
                "forced_tokens": len(r.forced),
                "greedy_tokens": r.free,
                **r.meta,
            }
            for r in requests
        ],
        "configs": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(tables(result), flush=True)
    log(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
