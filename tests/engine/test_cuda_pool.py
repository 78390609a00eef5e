"""The CUDA tier's pinned host pool (``engine/cuda_pool.py``), and the import
boundary of the tier's torch-only modules.

On CPU: the pool's error without CUDA, and that ``cuda_pool``, ``cuda_copy``
and ``cuda_swap`` each import neither vLLM, nor Triton, nor any other module
of the package (``benchmarks/gpu_check.py`` runs them where only torch and
Triton exist). Registration, aliasing and release of the pool on a GPU are
``benchmarks/gpu_check.py``'s ``pool`` check (``tests/test_gpu_check.py``
runs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT
from vllm_infinigen.engine.cuda_pool import PinnedHostPool

#: The CUDA tier's modules that need torch (and Triton, lazily) alone.
TORCH_ONLY = (
    "vllm_infinigen.engine.cuda_pool",
    "vllm_infinigen.engine.cuda_copy",
    "vllm_infinigen.engine.cuda_swap",
)


@pytest.mark.parametrize("module", TORCH_ONLY)
def test_import_pulls_in_neither_vllm_nor_triton(module: str) -> None:
    """Importing the module in a fresh interpreter loads no vLLM, no Triton,
    and of the package only these modules (the others' imports, e.g. tqdm,
    a bare torch machine may lack)."""
    # Modules loaded before the import (the install's .pth file loads one
    # of the package's patches at interpreter start) do not count.
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        f"import {module}\n"
        "print(json.dumps(sorted(m for m in set(sys.modules) - before "
        "if m.split('.')[0] in ('vllm', 'triton', 'vllm_infinigen'))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert module in loaded
    assert loaded <= {"vllm_infinigen", "vllm_infinigen.engine", *TORCH_ONLY}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_pinned_pool_without_cuda_raises_clearly() -> None:
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        PinnedHostPool(4096)
