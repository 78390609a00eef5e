"""Shared by the Ray Serve tests: whether Ray Serve LLM can load here, and
the deploy/ files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
SERVE_CONFIG: Path = DEPLOY / "ray" / "serve_config.yaml"
RAYSERVICE: Path = DEPLOY / "kuberay" / "rayservice.yaml"


def _ray_serve_llm_missing() -> str | None:
    """Why ``ray.serve.llm`` cannot load here, or None. Cheap (no import of
    ``ray.serve.llm`` itself, which takes seconds)."""
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'vllm-infinigen[ray]')"
    if importlib.util.find_spec("ray.serve.llm") is None:
        return "ray.serve.llm is missing (needs ray[serve] >= 2.60)"
    if importlib.util.find_spec("pyarrow") is None:
        return "pyarrow is missing (ray.serve.llm imports pyarrow.fs)"
    return None


RAY_SERVE_LLM_MISSING = _ray_serve_llm_missing()

#: Marks of every Ray Serve test module: the marker, and a skip with the
#: reason when Ray Serve LLM cannot load.
RAY_SERVE_MARKS = [
    pytest.mark.ray_serve,
    pytest.mark.skipif(
        RAY_SERVE_LLM_MISSING is not None, reason=str(RAY_SERVE_LLM_MISSING)
    ),
]
