"""Shared fixtures: repository paths, the real test models, hardware marks."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Outside text (public-domain book excerpt) is read in place, never copied.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# vLLM's CPU platform sizes its KV cache from this (GiB); keep tests small.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def load_benchmark(script: str) -> ModuleType:
    """A script of ``benchmarks/`` imported as module ``benchmark_<name>``
    (the scripts are not a package). Its folder goes on ``sys.path``, as
    when it runs as a script, so that it finds its siblings
    (``workloads``)."""
    folder = str(REPO_ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.append(folder)
    name = f"benchmark_{Path(script).stem}"
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "benchmarks" / script
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    has_cuda = _has_cuda()
    has_ray = importlib.util.find_spec("ray") is not None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    skip_ray = pytest.mark.skip(
        reason="needs ray installed and CUDA (vLLM's Ray executor is CUDA-only)"
    )
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "ray" in item.keywords and not (has_ray and has_cuda):
            item.add_marker(skip_ray)


@pytest.fixture(scope="session")
def qwen_model_dir() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as a Hugging Face folder (built once)."""
    from vllm_infinigen.models import build_model

    return build_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def gemma_model_dir() -> Path:
    """Gemma 3 270M as a Hugging Face folder (built once)."""
    from vllm_infinigen.models import build_model

    return build_model("gemma3-270m")
