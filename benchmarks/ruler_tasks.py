"""RULER's synthetic long-context tasks: prompts of a given token length and
the scoring of answers, with no model engine involved.

The task definitions follow NVIDIA/RULER (https://github.com/NVIDIA/RULER):

- the task list, its order and each task's parameters:
  ``scripts/synthetic.yaml`` (the two ``qa`` tasks, which need downloaded
  data sets, are left out);
- the prompt templates, answer prefixes and tokens to generate:
  ``scripts/data/synthetic/constants.py``;
- the eight needle-in-a-haystack tasks (``niah_*``): needle sentence, key and
  value kinds, haystack kinds (``noise``, ``essay``, ``needle``), the 40
  insertion depths of the essay haystack, the singular wording when one value
  is asked for: ``scripts/data/synthetic/niah.py``;
- variable tracking (``vt``): chains of ``VAR X = ...`` lines in the noise
  haystack after a one-shot example of about 500 tokens:
  ``scripts/data/synthetic/variable_tracking.py``;
- common words extraction (``cwe``): a numbered word list where ten words
  appear 30 times and the rest 3 times (6 and 1 below 4096 tokens), after a
  one-shot example: ``scripts/data/synthetic/common_words_extraction.py``;
- frequent words extraction (``fwe``): coded six-letter words drawn with
  Zipf (zeta, alpha 2) frequencies, the most frequent one replaced by
  ``...``, asked for the next three:
  ``scripts/data/synthetic/freq_words_extraction.py``;
- the metrics ``string_match_all`` / ``string_match_part`` and the cleaning
  of predictions: ``scripts/eval/synthetic/constants.py`` and
  ``scripts/eval/evaluate.py`` (every synthetic task is scored with
  ``string_match_all``).

The prompt is RULER's input with the ``base`` model template (the task
template as it is) followed by the answer prefix, the text RULER sends to a
model. Its length is filled the way RULER does it: the haystack (sentences,
words or list entries) grows until the prompt plus the task's generation
length would pass the target, found by a search over the haystack size on
sample 0 and then used for every sample (a sample that does not fit there is
searched again below it).

Substitutions for what RULER downloads or installs:

- ``essay`` haystack: RULER uses Paul Graham's essays; here the public-domain
  PG-19 book excerpt in ``shared/data/pg19_firstbook.txt`` (``workloads.PG19``)
  is used, whitespace collapsed and repeated word by word as far as the length
  needs (RULER repeats its essays the same way when they run out). Sentences
  are split at ``.``, ``!`` or ``?`` followed by white space (RULER uses NLTK's
  Punkt tokenizer).
- Word lists: RULER draws words from the ``wonderwords`` package. Here
  :func:`word_list` gives every lowercase alphabetic word of 3 to 12 letters
  found in the PG-19 excerpt, common function words left out, de-duplicated
  and sorted (a few hundred words). Needle keys of kind ``words`` join two
  different such words with a hyphen, as RULER joins an adjective and a
  noun. When the common-words list needs more distinct words than that
  (long contexts), a few of them are set aside and joined in hyphenated
  pairs to make up the rest (RULER switches to a second, larger word list).
- Randomness: Python's :class:`random.Random`, seeded per task, seed and
  sample index; uuids are ``uuid.UUID(int=rng.getrandbits(128), version=4)``.

Lengths are counted with ``tokenizer.encode(prompt)``, so the special tokens
the tokenizer adds to a plain prompt (a BOS token, where it has one) count
too; ``reserved_tokens`` leaves room for a chat template put around it.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal, Protocol

from workloads import PG19

Metric = Literal["all", "part"]
HaystackKind = Literal["noise", "essay", "needle"]
NeedleKind = Literal["words", "numbers", "uuids"]

#: RULER's synthetic tasks without the two ``qa`` ones, in
#: ``scripts/synthetic.yaml`` order.
TASKS: tuple[str, ...] = (
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
#: The needle-in-a-haystack tasks among :data:`TASKS`.
NIAH_TASKS: tuple[str, ...] = TASKS[:8]

#: Tokens each task lets the model generate (RULER's ``tokens_to_generate``).
MAX_NEW_TOKENS: dict[str, int] = {
    **dict.fromkeys(NIAH_TASKS, 128),
    "vt": 30,
    "cwe": 120,
    "fwe": 50,
}
#: The metric each task is scored with (``all``: :func:`string_match_all`).
METRICS: dict[str, Metric] = dict.fromkeys(TASKS, "all")


@dataclass(frozen=True)
class NiahConfig:
    """One needle-in-a-haystack variant (``niah.py`` arguments)."""

    haystack: HaystackKind
    key_kind: NeedleKind
    value_kind: NeedleKind
    num_keys: int
    num_values: int
    num_queries: int


#: ``scripts/synthetic.yaml``'s needle-in-a-haystack variants.
NIAH_CONFIGS: dict[str, NiahConfig] = {
    "niah_single_1": NiahConfig("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": NiahConfig("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": NiahConfig("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", 1, 1, 4),
}


@dataclass(frozen=True)
class VariableTrackingConfig:
    """Variable tracking (``variable_tracking.py`` arguments): chains of
    ``num_hops`` assignments after a first ``VAR X = <number>``."""

    num_chains: int = 1
    num_hops: int = 4
    #: Letters of a variable name (3 in the one-shot example, as RULER's).
    name_letters: int = 5
    example_name_letters: int = 3
    #: Token length of the one-shot example's prompt (answer not counted).
    example_tokens: int = 500


@dataclass(frozen=True)
class CommonWordsConfig:
    """Common words extraction (``common_words_extraction.py`` arguments)."""

    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    #: Distinct words, common and uncommon repeats of the one-shot example.
    example_words: int = 40
    example_freq_cw: int = 10
    example_freq_ucw: int = 3
    #: Below this target length RULER uses the ``short_*`` counts instead.
    short_below: int = 4096
    short_freq_cw: int = 6
    short_freq_ucw: int = 1
    short_example_words: int = 20
    short_example_freq_cw: int = 3
    short_example_freq_ucw: int = 1


@dataclass(frozen=True)
class FreqWordsConfig:
    """Frequent words extraction (``freq_words_extraction.py`` arguments):
    a vocabulary of ``budget // tokens_per_vocab_word`` coded words."""

    alpha: float = 2.0
    coded_word_letters: int = 6
    tokens_per_vocab_word: int = 50
    num_answers: int = 3


VT = VariableTrackingConfig()
CWE = CommonWordsConfig()
FWE = FreqWordsConfig()

#: RULER's 40 needle depths (percent) of the essay haystack:
#: ``round(linspace(0, 100, 40))``.
ESSAY_DEPTHS: tuple[int, ...] = tuple(math.floor(100 * i / 39 + 0.5) for i in range(40))
NOISE_SENTENCE = (
    "The grass is green. The sky is blue. The sun is yellow. "
    "Here we go. There and back again."
)
NEEDLE = "One of the special magic {kind} for {key} is: {value}."

_NIAH_INSTRUCTION = {
    "plural": (
        "Some special magic {kind} are hidden within the following text. "
        "Make sure to memorize it. I will quiz you about the {kind} afterwards.\n"
    ),
    "singular": (
        "A special magic {kind} is hidden within the following text. "
        "Make sure to memorize it. I will quiz you about the {kind} afterwards.\n"
    ),
}
_NIAH_QUESTION = {
    "plural": (
        "\nWhat are all the special magic {kind} for {query} mentioned in the "
        "provided text?"
    ),
    "singular": (
        "\nWhat is the special magic {kind} for {query} mentioned in the provided text?"
    ),
}
_NIAH_ANSWER_PREFIX = {
    "plural": " The special magic {kind} for {query} mentioned in the provided "
    "text are",
    "singular": " The special magic {kind} for {query} mentioned in the provided "
    "text is",
}
_VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the "
    "following text.\n\n{context}\nQuestion: Find all variables that are "
    "assigned the value {query} in the text above."
)
_VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text "
    "above, {num_v} variables are assigned the value {query}, they are: "
)
_CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often "
    "than others. Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the {num_cw} most common words in the above list?"
)
_CWE_ANSWER_PREFIX = (
    " Answer: The top {num_cw} words that appear most often in the list are:"
)
_FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. {context}\n"
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
_FWE_ANSWER_PREFIX = (
    " Answer: According to the coded text above, the three most frequently "
    "appeared words are:"
)

#: Function words left out of :func:`word_list` (RULER's words are nouns,
#: adjectives and verbs).
# fmt: off
_FUNCTION_WORDS = frozenset((
    "about", "above", "after", "again", "against", "all", "also", "among", "and", "any",
    "are", "because", "been", "before", "being", "below", "between", "both", "but",
    "can", "could", "did", "does", "doing", "down", "during", "each", "ere", "few",
    "for", "from", "further", "had", "has", "have", "having", "her", "here", "hers",
    "herself", "him", "himself", "his", "how", "into", "its", "itself", "just", "may",
    "might", "more", "most", "must", "nor", "not", "now", "off", "once", "only",
    "other", "our", "ours", "out", "over", "own", "same", "shall", "she", "should",
    "some", "such", "than", "that", "the", "their", "theirs", "them", "then", "there",
    "these", "they", "this", "those", "through", "too", "under", "until", "upon",
    "very", "was", "were", "what", "when", "where", "which", "while", "who", "whom",
    "whose", "why", "will", "with", "would", "yet", "you", "your", "yours"
))
# fmt: on
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


class Tokenizer(Protocol):
    """What the prompt builder needs of a (Hugging Face) tokenizer."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens included."""
        ...


@dataclass(frozen=True)
class Sample:
    """One prompt of a task and what a correct answer must contain.

    ``prompt`` ends with ``answer_prefix`` (RULER sends both). ``depths``
    gives, for each entry of ``answers`` that was hidden in the context (the
    needle values, the variable-tracking names), where it sits in percent of
    the context: a RULER depth (sentences before it) for the essay haystack,
    its line's place among the context lines otherwise; empty for ``cwe`` and
    ``fwe``.
    """

    task: str
    index: int
    prompt: str
    answers: list[str]
    max_new_tokens: int
    metric: Metric
    depths: list[float]
    answer_prefix: str
    #: Tokens of ``prompt`` as :class:`Tokenizer.encode` counts them.
    prompt_tokens: int
    #: The target: prompt, reserved and generated tokens together.
    context_tokens: int
    #: Haystack size the prompt was built with, in the task's units (noise or
    #: needle sentences, essay words, distinct list words, Zipf word total).
    haystack_size: int


@dataclass(frozen=True)
class _Draft:
    """A rendered prompt before its tokens are counted."""

    prompt: str
    answers: list[str]
    depths: list[float]
    answer_prefix: str


# --- Text sources -----------------------------------------------------------


@cache
def _essay_words() -> tuple[str, ...]:
    """The PG-19 excerpt as words (white space collapsed)."""
    text = PG19.read_text(encoding="utf-8", errors="replace")
    return tuple(text.split())


@cache
def word_list() -> tuple[str, ...]:
    """The words random words are drawn from: the lowercase alphabetic words
    (3 to 12 letters) of the PG-19 excerpt, function words left out,
    de-duplicated and sorted."""
    found = set()
    for token in _essay_words():
        word = token.strip(".,;:!?\"'()[]_-\u201c\u201d\u2018\u2019")
        if re.fullmatch(r"[a-z]{3,12}", word) and word not in _FUNCTION_WORDS:
            found.add(word)
    return tuple(sorted(found))


def _sentences(text: str) -> list[str]:
    """``text`` cut after each ``.``, ``!`` or ``?`` (closing quotes or
    brackets kept with it) that white space follows."""
    out: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        out.append(text[start : match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _essay_text(words: int) -> str:
    """The first ``words`` words of the essay haystack, repeating it from
    its start as often as needed."""
    source = _essay_words()
    repeats = -(-words // len(source))
    return " ".join((source * repeats)[:words])


# --- Random draws -----------------------------------------------------------


def _rng(seed: int, task: str, part: str | int) -> random.Random:
    """The generator of one sample (or of one shared part of a task)."""
    return random.Random(f"ruler/{task}/{seed}/{part}")


def _draw(rng: random.Random, kind: NeedleKind) -> str:
    """A random needle key or value of ``kind``: two hyphenated words, a
    seven-digit number or a uuid4 string."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    first, second = rng.sample(word_list(), 2)
    return f"{first}-{second}"


def _draw_distinct(
    rng: random.Random, kind: NeedleKind, count: int, taken: set[str]
) -> list[str]:
    """``count`` draws of ``kind``, none repeated or already in ``taken``
    (which gains them)."""
    out: list[str] = []
    while len(out) < count:
        item = _draw(rng, kind)
        if item not in taken:
            taken.add(item)
            out.append(item)
    return out


def _names(rng: random.Random, count: int, letters: int) -> list[str]:
    """``count`` different upper-case variable names of ``letters`` letters."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names and name != "VAR":
            names.append(name)
    return names


def _insert_lines(
    lines: Sequence[str], inserts: Sequence[tuple[int, str]]
) -> tuple[list[str], list[int]]:
    """``lines`` with each ``(position, text)`` put before ``lines[position]``
    (in the order given where positions tie), and where each insert ended up."""
    order = sorted(range(len(inserts)), key=lambda i: inserts[i][0])
    out: list[str] = []
    where = [0] * len(inserts)
    done = 0
    for i in order:
        position, text = inserts[i]
        out.extend(lines[done:position])
        done = max(done, position)
        where[i] = len(out)
        out.append(text)
    out.extend(lines[done:])
    return out, where


def _zeta(alpha: float) -> float:
    """Riemann zeta of ``alpha > 1`` (direct sum plus Euler-Maclaurin tail)."""
    terms = 1000
    head = math.fsum(k**-alpha for k in range(1, terms))
    tail = (
        terms ** (1 - alpha) / (alpha - 1)
        + terms**-alpha / 2
        + alpha * terms ** (-alpha - 1) / 12
    )
    return head + tail


# --- Task renderers ---------------------------------------------------------
#
# Each builder returns ``(render, smallest)``: ``render(index, size)`` gives
# sample ``index`` with a haystack of ``size`` units, the same text for the
# same arguments; ``smallest`` is the least size it accepts. In the needle
# and variable-tracking tasks the draws that do not depend on the size come
# first, so a sample keeps its needles and answers whatever its size.


Render = Callable[[int, int], _Draft]


def _niah(task: str, seed: int) -> tuple[Render, int]:
    """A needle-in-a-haystack variant of :data:`NIAH_CONFIGS` (``niah.py``)."""
    config = NIAH_CONFIGS[task]
    num_keys = max(config.num_keys, config.num_queries)
    single = config.num_queries * config.num_values == 1
    form = "singular" if single else "plural"
    kind = config.value_kind[:-1] if single else config.value_kind

    def render(index: int, size: int) -> _Draft:
        rng = _rng(seed, task, index)
        taken: set[str] = set()
        keys = _draw_distinct(rng, config.key_kind, num_keys, taken)
        values = [
            _draw_distinct(rng, config.value_kind, config.num_values, taken)
            for _ in keys
        ]
        needles = [(k, v) for k, key_values in enumerate(values) for v in key_values]
        rng.shuffle(needles)
        texts = [
            NEEDLE.format(kind=config.value_kind, key=keys[k], value=value)
            for k, value in needles
        ]
        asked = rng.sample(range(num_keys), config.num_queries)
        queries = [keys[k] for k in asked]
        answers = [value for k in asked for value in values[k]]

        depth_of: dict[str, float] = {}
        if config.haystack == "essay":
            sentences = _sentences(_essay_text(size))
            depths = sorted(rng.sample(ESSAY_DEPTHS, len(texts)))
            pieces: list[str] = []
            done = 0
            for depth, text, (_, value) in zip(depths, texts, needles, strict=True):
                cut = int(len(sentences) * depth / 100)
                pieces.append(" ".join(sentences[done:cut]))
                pieces.append(text)
                done = cut
                depth_of[value] = float(depth)
            pieces.append(" ".join(sentences[done:]))
            context = " ".join(piece for piece in pieces if piece)
        else:
            if config.haystack == "noise":
                lines = [NOISE_SENTENCE] * size
            else:
                lines = [
                    NEEDLE.format(
                        kind=config.value_kind,
                        key=_draw_distinct(rng, config.key_kind, 1, taken)[0],
                        value=_draw(rng, config.value_kind),
                    )
                    for _ in range(size)
                ]
            positions = sorted(rng.sample(range(size), len(texts)))
            lines, where = _insert_lines(
                lines, list(zip(positions, texts, strict=True))
            )
            for (_, value), line in zip(needles, where, strict=True):
                depth_of[value] = 100 * line / len(lines)
            context = "\n".join(lines)

        query = (
            queries[0]
            if len(queries) == 1
            else ", ".join(queries[:-1]) + ", and " + queries[-1]
        )
        prefix = _NIAH_ANSWER_PREFIX[form].format(kind=kind, query=query)
        prompt = (
            _NIAH_INSTRUCTION[form].format(kind=kind)
            + context
            + _NIAH_QUESTION[form].format(kind=kind, query=query)
            + prefix
        )
        return _Draft(prompt, answers, [depth_of[a] for a in answers], prefix)

    smallest = 50 if config.haystack == "essay" else num_keys * config.num_values
    return render, smallest


def _vt_text(
    size: int, chains: Sequence[Sequence[str]], rng: random.Random
) -> tuple[str, list[list[float]]]:
    """Noise lines with each chain's lines inserted in order at random places;
    each line's depth (percent of the lines) per chain."""
    lines: list[str] = [NOISE_SENTENCE] * size
    placed: list[list[int]] = []
    for chain in chains:
        positions = sorted(rng.sample(range(len(lines)), len(chain)))
        lines, where = _insert_lines(lines, list(zip(positions, chain, strict=True)))
        # Lines placed before move down past the new ones inserted above them.
        placed = [[w + sum(p <= w for p in positions) for w in ws] for ws in placed]
        placed.append(where)
    depths = [[100 * w / len(lines) for w in ws] for ws in placed]
    return "\n".join(lines), depths


def _vt_chain(names: Sequence[str], value: int) -> list[str]:
    """``VAR A = value`` then ``VAR B = VAR A`` down the names (RULER's lines
    end the copies with a space)."""
    first = [f"VAR {names[0]} = {value}"]
    return first + [
        f"VAR {b} = VAR {a} " for a, b in zip(names[:-1], names[1:], strict=True)
    ]


def _vt_prompt(context: str, value: int, names: int) -> tuple[str, str]:
    """The variable-tracking prompt around ``context`` and its answer prefix."""
    prefix = _VT_ANSWER_PREFIX.format(num_v=names, query=value)
    return _VT_TEMPLATE.format(context=context, query=value) + prefix, prefix


def _vt(task: str, seed: int, tokenizer: Tokenizer) -> tuple[Render, int]:
    """Variable tracking (``variable_tracking.py``) after its one-shot
    example: one chain with names of the example's letter count and its
    answer, the noise fitted once to
    :attr:`VariableTrackingConfig.example_tokens`; each sample gives the
    example new names and a new value, as RULER's ``randomize_icl`` does."""
    config = VT
    per_chain = config.num_hops + 1

    def example(size: int, names: Sequence[str], value: int) -> str:
        rng = _rng(seed, task, "example")  # the same places for every sample
        context, _ = _vt_text(size, [_vt_chain(names, value)], rng)
        return _vt_prompt(context, value, per_chain)[0]

    placeholder = _names(
        _rng(seed, task, "names"), per_chain, config.example_name_letters
    )
    example_size = _fit(
        lambda n: len(tokenizer.encode(example(n, placeholder, 12345))),
        config.example_tokens,
        per_chain,
    )

    def render(index: int, size: int) -> _Draft:
        rng = _rng(seed, task, index)
        names = _names(rng, config.num_chains * per_chain, config.name_letters)
        values = [rng.randint(10000, 99999) for _ in range(config.num_chains)]
        shot_names = _names(rng, per_chain, config.example_name_letters)
        shot = example(example_size, shot_names, rng.randint(10000, 99999))
        shot += " " + " ".join(shot_names) + "\n"
        chains = [
            _vt_chain(names[c * per_chain : (c + 1) * per_chain], values[c])
            for c in range(config.num_chains)
        ]
        context, depths = _vt_text(size, chains, rng)
        prompt, prefix = _vt_prompt(context, values[0], per_chain)
        return _Draft(shot + "\n" + prompt, names[:per_chain], depths[0], prefix)

    return render, per_chain * config.num_chains


def _cwe_counts(context_tokens: int) -> tuple[int, int, int, int, int]:
    """Common-word repeats, uncommon repeats, and the one-shot example's
    distinct words, common and uncommon repeats, for a target length."""
    c = CWE
    if context_tokens < c.short_below:
        return (
            c.short_freq_cw,
            c.short_freq_ucw,
            c.short_example_words,
            c.short_example_freq_cw,
            c.short_example_freq_ucw,
        )
    return (
        c.freq_cw,
        c.freq_ucw,
        c.example_words,
        c.example_freq_cw,
        c.example_freq_ucw,
    )


def _cwe_list(
    rng: random.Random, words: Sequence[str], common: int, freq_c: int, freq_u: int
) -> str:
    """The numbered list: the first ``common`` words ``freq_c`` times, the
    others ``freq_u`` times, shuffled."""
    entries = list(words[:common]) * freq_c + list(words[common:]) * freq_u
    rng.shuffle(entries)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(entries))


def _distinct_words(rng: random.Random, count: int) -> list[str]:
    """``count`` different entries for a word list, in random order: words
    of :func:`word_list` while it has enough; past that, the fewest of its
    words needed are set aside and only used joined in hyphenated pairs, so
    the list grows smoothly in length and no entry is part of another
    (a word and a pair holding it)."""
    base = word_list()
    if count <= len(base):
        return rng.sample(base, count)
    paired = 2
    while len(base) - paired + paired * (paired - 1) < count:
        paired += 1
        if paired > len(base):
            raise ValueError(f"cannot make {count} distinct words")
    order = rng.sample(base, len(base))
    parts, singles = order[:paired], order[paired:]
    chosen = rng.sample(range(paired * (paired - 1)), count - len(singles))
    pairs = []
    for pair in chosen:
        first, second = divmod(pair, paired - 1)
        second += second >= first  # skip the word paired with itself
        pairs.append(f"{parts[first]}-{parts[second]}")
    entries = singles + pairs
    rng.shuffle(entries)
    return entries


def _cwe(task: str, seed: int, context_tokens: int) -> tuple[Render, int]:
    """Common words extraction (``common_words_extraction.py``) after its
    one-shot example; the example's words differ from the sample's."""
    num_cw = CWE.num_cw
    freq_c, freq_u, example_words, example_c, example_u = _cwe_counts(context_tokens)
    template = _CWE_TEMPLATE.replace("{num_cw}", str(num_cw))
    prefix = _CWE_ANSWER_PREFIX.format(num_cw=num_cw)

    def render(index: int, size: int) -> _Draft:
        rng = _rng(seed, task, index)
        drawn = _distinct_words(rng, size + example_words)
        example, words = drawn[:example_words], drawn[example_words:]
        shot = template.format(
            context=_cwe_list(rng, example, num_cw, example_c, example_u)
        )
        shot += (
            prefix
            + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example[:num_cw]))
        )
        context = _cwe_list(rng, words, num_cw, freq_c, freq_u)
        prompt = shot + "\n" + template.format(context=context) + prefix
        return _Draft(prompt, list(words[:num_cw]), [], prefix)

    return render, num_cw + 1


def _fwe(task: str, seed: int, budget: int) -> tuple[Render, int]:
    """Frequent words extraction (``freq_words_extraction.py``): ``size``
    words split over the ranks as ``size * k**-alpha / zeta(alpha)``."""
    config = FWE
    vocab_size = max(budget // config.tokens_per_vocab_word, config.num_answers + 2)
    zeta = _zeta(config.alpha)

    def render(index: int, size: int) -> _Draft:
        rng = _rng(seed, task, index)
        vocab: list[str] = []
        seen: set[str] = set()
        while len(vocab) < vocab_size:
            word = "".join(
                rng.choices(string.ascii_lowercase, k=config.coded_word_letters)
            )
            if word not in seen:
                seen.add(word)
                vocab.append(word)
        vocab[0] = "..."  # the most frequent "word" is noise
        entries = [
            word
            for rank, word in enumerate(vocab, start=1)
            for _ in range(int(size * rank**-config.alpha / zeta))
        ]
        rng.shuffle(entries)
        prompt = _FWE_TEMPLATE.format(context=" ".join(entries)) + _FWE_ANSWER_PREFIX
        answers = vocab[1 : 1 + config.num_answers]
        return _Draft(prompt, answers, [], _FWE_ANSWER_PREFIX)

    # Twice the size at which rank ``num_answers + 2`` first appears: small,
    # yet the answers already appear more often than any rank after them.
    smallest = math.ceil(zeta * (config.num_answers + 2) ** config.alpha) * 2
    return render, smallest


# --- Length fitting ---------------------------------------------------------


def _fit(
    tokens_at: Callable[[int], int], budget: int, smallest: int, hi: int = 0
) -> int:
    """The largest size ``n >= smallest`` with ``tokens_at(n) <= budget``
    (``tokens_at`` growing with ``n``). Sizes are tried by linear
    interpolation between the known fitting and overflowing sizes, with a
    bisection whenever that interval did not halve. ``hi``, if given, is a
    size expected to overflow (if it fits, the search goes on above it)."""
    lo, t_lo = smallest, tokens_at(smallest)
    if t_lo > budget:
        raise ValueError(
            f"even the smallest haystack takes {t_lo} tokens, over the {budget} "
            "the target leaves for the prompt"
        )
    t_hi = 0
    if hi:
        if hi <= lo:
            return lo
        t_hi = tokens_at(hi)
        if t_hi <= budget:
            return _fit(tokens_at, budget, hi)
    slope = max(t_lo / lo, 1e-6)  # tokens per unit; overestimated at first
    bisect = False
    while not hi or hi - lo > 1:
        width = hi - lo if hi else 0
        if not hi:
            size = lo + max(1, math.ceil((budget - t_lo) / slope * 1.02) + 1)
        elif bisect:
            size = (lo + hi) // 2
        else:
            size = lo + int((budget - t_lo) * (hi - lo) / max(t_hi - t_lo, 1))
            size = min(max(size, lo + 1), hi - 1)
        tokens = tokens_at(size)
        if tokens <= budget:
            if tokens > t_lo:
                slope = (tokens - t_lo) / (size - lo)
            lo, t_lo = size, tokens
        else:
            hi, t_hi = size, tokens
        bisect = bool(width) and hi - lo > width // 2
    return lo


def build_samples(
    tokenizer: Tokenizer,
    task: str,
    context_tokens: int,
    count: int,
    seed: int = 42,
    *,
    reserved_tokens: int = 0,
) -> list[Sample]:
    """Samples ``0 .. count - 1`` of ``task``, each prompt as long as fits
    in ``context_tokens`` less ``reserved_tokens`` (a chat template's) and the
    task's generation length.

    The same arguments give the same samples, and sample ``i`` does not
    depend on ``count``. The haystack size is searched on sample 0 and kept
    for the others (RULER's way); a sample that does not fit with it is
    searched again with smaller haystacks.
    """
    if task not in MAX_NEW_TOKENS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    max_new_tokens = MAX_NEW_TOKENS[task]
    budget = context_tokens - reserved_tokens - max_new_tokens
    if task in NIAH_CONFIGS:
        render, smallest = _niah(task, seed)
    elif task == "vt":
        render, smallest = _vt(task, seed, tokenizer)
    elif task == "cwe":
        render, smallest = _cwe(task, seed, context_tokens)
    else:
        render, smallest = _fwe(task, seed, budget)

    drafts: dict[tuple[int, int], tuple[_Draft, int]] = {}

    def measured(index: int, size: int) -> tuple[_Draft, int]:
        key = (index, size)
        if key not in drafts:
            draft = render(index, size)
            drafts[key] = (draft, len(tokenizer.encode(draft.prompt)))
        return drafts[key]

    def tokens_of(index: int) -> Callable[[int], int]:
        return lambda size: measured(index, size)[1]

    size = _fit(tokens_of(0), budget, smallest)
    samples: list[Sample] = []
    for index in range(count):
        own = size
        if measured(index, size)[1] > budget:
            own = _fit(tokens_of(index), budget, smallest, size)
        draft, tokens = measured(index, own)
        samples.append(
            Sample(
                task=task,
                index=index,
                prompt=draft.prompt,
                answers=draft.answers,
                max_new_tokens=max_new_tokens,
                metric=METRICS[task],
                depths=draft.depths,
                answer_prefix=draft.answer_prefix,
                prompt_tokens=tokens,
                context_tokens=context_tokens,
                haystack_size=own,
            )
        )
    return samples


# --- Scoring ----------------------------------------------------------------


def postprocess(prediction: str) -> str:
    """A prediction cleaned as RULER's ``evaluate.py`` does: stripped, each
    control character (``\\x00``-``\\x1f``) made a newline, stripped again.
    The whole text is kept, not only its first line."""
    return _CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """The share (0 to 1) of ``references`` found in ``prediction``, case
    ignored (RULER's ``string_match_all`` for one sample)."""
    if not references:
        raise ValueError("no references to match")
    text = prediction.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1 if any of ``references`` is found in ``prediction``, case ignored,
    else 0 (RULER's ``string_match_part`` for one sample)."""
    if not references:
        raise ValueError("no references to match")
    text = prediction.lower()
    return float(any(ref.lower() in text for ref in references))


_METRIC_FNS: dict[Metric, Callable[[str, Sequence[str]], float]] = {
    "all": string_match_all,
    "part": string_match_part,
}


def score(task: str, prediction: str, answers: Sequence[str]) -> float:
    """One sample's score (0 to 1): the task's metric on the cleaned
    prediction."""
    return _METRIC_FNS[METRICS[task]](postprocess(prediction), answers)


def task_score(
    task: str, predictions: Sequence[str], answers: Sequence[Sequence[str]]
) -> float:
    """A task's score as RULER reports it: the mean sample score in percent,
    rounded to two decimals."""
    if len(predictions) != len(answers) or not predictions:
        raise ValueError("need one answer list per prediction, and at least one")
    total = sum(score(task, p, a) for p, a in zip(predictions, answers, strict=True))
    return round(100 * total / len(predictions), 2)
