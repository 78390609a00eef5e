"""Test prompts of different lengths, built from text already on the machine.

Code comes from the Python standard library's own sources (read in place);
natural text from the public-domain PG-19 excerpt in ``../shared/data``.
"""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path


def stdlib_source(chars: int) -> str:
    """The first ``chars`` characters of ``textwrap``'s own source file."""
    return inspect.getsource(textwrap)[:chars]


def book_text(shared_data: Path, chars: int, offset: int = 0) -> str:
    text = (shared_data / "pg19_firstbook.txt").read_text(encoding="utf-8")
    return text[offset : offset + chars]


def mixed_length_prompts(shared_data: Path) -> list[str]:
    """Short, medium, longer than one 128-token block, and long enough to be
    chunked at 256 batched tokens (and to pass a 512-token sliding window)."""
    return [
        "def fibonacci(n):",
        "The capital of France is",
        "Summarise the following passage in one sentence.\n\n"
        + book_text(shared_data, 700, offset=2000),
        "# Complete the next function of this module.\n" + stdlib_source(2600),
        book_text(shared_data, 3200, offset=6000)
        + "\n\nWhat happens next in the story?",
    ]


FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "There and back again. "
)


def passkey_prompt(passkey: int, depth: float, filler_repeats: int) -> str:
    """A pass key hidden at ``depth`` (0..1) of repeated filler, asked back."""
    before = int(filler_repeats * depth)
    return (
        "There is an important pass key hidden inside a lot of irrelevant "
        "text. Find it and memorize it.\n\n"
        + FILLER * before
        + f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
        + FILLER * (filler_repeats - before)
        + "\n\nWhat is the pass key? The pass key is"
    )


def code_prompt(module_name: str, chars: int) -> str:
    """The first ``chars`` characters of a standard-library module's source."""
    import importlib

    module = importlib.import_module(module_name)
    return inspect.getsource(module)[:chars]
