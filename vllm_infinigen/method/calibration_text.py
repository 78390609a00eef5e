"""The default calibration text: Python standard library source, read in place.

Calibration needs a prompt that exists on every install without network
access. Every Python install ships its standard library as source, so the
default text is the opening of each module in :data:`STDLIB_CALIBRATION_MODULES`
(module docstrings, i.e. English prose, then code), read from
``sysconfig.get_paths()["stdlib"]`` at run time and joined in that fixed
order. The text therefore depends on the Python version (3.11 on our
machines); its checksum is part of the calibration cache key, so a different
text never reuses a stale calibration. Users may pass their own file instead.
"""

from __future__ import annotations

import logging
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

STDLIB_CALIBRATION_MODULES: tuple[str, ...] = (
    "heapq.py",
    "textwrap.py",
    "json/__init__.py",
    "argparse.py",
    "collections/__init__.py",
    "functools.py",
    "bisect.py",
    "string.py",
    "dataclasses.py",
    "enum.py",
    "fractions.py",
    "statistics.py",
    "shlex.py",
    "difflib.py",
    "calendar.py",
    "csv.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "fnmatch.py",
    "glob.py",
    "gettext.py",
    "sched.py",
    "colorsys.py",
    "base64.py",
)
"""Standard library files (relative to the stdlib directory), in text order.
Chosen for long prose docstrings followed by ordinary code; all exist in
CPython 3.11 to 3.13."""

CHARS_PER_MODULE = 1200
"""Characters taken from the start of each module (cut back to a line end):
25 modules x 1200 chars is about 8K tokens with the Qwen2 tokenizer, more
than the default ``max_tokens`` of calibration."""


def stdlib_dir() -> Path:
    """The directory of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_calibration_text(chars_per_module: int = CHARS_PER_MODULE) -> str:
    """The concatenated openings of :data:`STDLIB_CALIBRATION_MODULES`.

    Missing modules (a trimmed install) are skipped with a warning.

    Raises:
        FileNotFoundError: if none of the modules can be read.
    """
    root = stdlib_dir()
    pieces: list[str] = []
    for name in STDLIB_CALIBRATION_MODULES:
        path = root / name
        try:
            source = path.read_text(encoding="utf-8")
        except OSError:
            logger.warning("calibration text: cannot read %s, skipped", path)
            continue
        head = source[:chars_per_module]
        if len(source) > chars_per_module and "\n" in head:
            head = head[: head.rindex("\n") + 1]
        pieces.append(f"# {name}\n{head}")
    if not pieces:
        raise FileNotFoundError(f"no calibration module found under {root}")
    return "\n".join(pieces)


def load_calibration_text(path: str | Path | None = None) -> str:
    """The text of ``path`` (UTF-8), or :func:`default_calibration_text`."""
    if path is None:
        return default_calibration_text()
    return Path(path).read_text(encoding="utf-8")
