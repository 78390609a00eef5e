"""``benchmarks/gpu_check.py`` as a script, at tiny shapes (``--small``).

On CPU every section is written: the torch paths pass and the CUDA-only
checks are skipped with a reason. On a GPU (``gpu`` mark) every check runs
and passes: pool registration and aliasing, the Triton copies, stream
overlap, CUDA-graph replay of the swap-in, attention over staging and the
absence of host syncs on the hot path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, load_benchmark

gpu_check = load_benchmark("gpu_check.py")

#: Checks that need CUDA (skipped on CPU).
CUDA_ONLY = {"pcie", "pool", "overlap", "graph", "no_host_sync"}


def _run(device: str, out: Path) -> dict[str, dict]:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "gpu_check.py"),
            "--device",
            device,
            "--small",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks: dict[str, dict] = json.loads(out.read_text())["checks"]
    assert set(checks) == set(gpu_check.CHECKS)
    return checks


def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    checks = _run("cpu", tmp_path / "gpu_check.json")
    ran = {name for name, c in checks.items() if c["ok"] is True}
    skipped = {name for name, c in checks.items() if c["ok"] is None}
    assert ran == set(gpu_check.CHECKS) - CUDA_ONLY, checks
    assert skipped == CUDA_ONLY
    assert all("CUDA" in checks[name]["skipped"] for name in skipped)
    assert "needs a CUDA device" in checks["pool"]["skipped"]
    cases = checks["decode_model"]["cases"]
    assert len(cases) == 2
    for case in cases.values():
        assert set(case["ms_per_step"]) >= {
            "all_on_gpu",
            "full_fetch_serial",
            "full_fetch_overlapped",
            "selected_overlapped",
        }


@pytest.mark.gpu
def test_gpu_check_passes_on_cuda(tmp_path: Path) -> None:
    checks = _run("cuda", tmp_path / "gpu_check.json")
    failed = {name: c for name, c in checks.items() if c["ok"] is not True}
    assert not failed
