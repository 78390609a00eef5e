"""Prompts and machine facts the serving benchmarks share.

Every long-context workload gives each request its own text (a shared
prefix would let dense attention read the same few megabytes per layer from
the CPU cache for every request and hide what sparse decode removes):

- ``stdlib``: Python standard-library source, request ``i`` starting at a
  different module (the same text :mod:`speed` decodes over);
- ``pg19``: the public-domain book in ``shared/data/pg19_firstbook.txt``,
  request ``i`` starting at a different offset.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PG19 = REPO.parent / "shared" / "data" / "pg19_firstbook.txt"
#: vLLM 0.32's CPU default KV block size (``vllm/platforms/cpu.py``).
VLLM_CPU_BLOCK_SIZE = 128
#: Modules between two requests' starting points in the standard library.
STDLIB_STRIDE = 11


def stdlib_ids(tokenizer: Any, tokens: int, seed: int) -> list[int]:
    """Exactly ``tokens`` token ids of standard-library source; ``seed``
    picks the module the text starts at."""
    from vllm_infinigen.method.calibration_text import stdlib_dir

    files = sorted(stdlib_dir().glob("*.py"))
    ids: list[int] = []
    index = seed * STDLIB_STRIDE
    while len(ids) < tokens:
        chunk = files[index % len(files)].read_text(encoding="utf-8", errors="replace")
        ids += tokenizer(chunk)["input_ids"]
        index += 1
    return ids[:tokens]


def pg19_ids(tokenizer: Any, tokens: int, seed: int) -> list[int]:
    """Exactly ``tokens`` token ids of the PG-19 book, request ``seed``
    starting ``seed / 16`` of the way in (wrapping around)."""
    text = PG19.read_text(encoding="utf-8", errors="replace")
    ids: list[int] = tokenizer(text)["input_ids"]
    start = (len(ids) * (seed % 16)) // 16
    out: list[int] = []
    while len(out) < tokens:
        out += ids[start:]
        start = 0
    return out[:tokens]


SOURCES = {"stdlib": stdlib_ids, "pg19": pg19_ids}


def distinct_prompts(tokenizer: Any, source: str, tokens: int, count: int) -> list[str]:
    """``count`` prompts of about ``tokens`` tokens each, every one its own
    text (decoded from exact token counts; re-tokenizing may move the count
    by a few tokens)."""
    build = SOURCES[source]
    return [tokenizer.decode(build(tokenizer, tokens, seed)) for seed in range(count)]


def cpu_model() -> str:
    """The CPU's model name and the vector extensions the kernels care about."""
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [
        f
        for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
        if f in flags
    ]
    extensions = " ".join(isa) or "no AVX2"
    return f"{platform.machine()}, {os.cpu_count()} cores, {name} ({extensions})"


def commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
