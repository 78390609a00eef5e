"""Set up INFINIGEN's runtime (calibration, hooks) right after model load.

Touches: ``vllm.v1.worker.cpu_model_runner.CPUModelRunner.load_model``
(vLLM 0.32). After the original loads the model, and when the INFINIGEN
backend is selected, the wrapper calibrates the sparse layers (or loads the
cached calibration), installs the one-layer-ahead hooks and keeps the
runtime on the model runner (``model_runner.infinigen_runtime``), so the
server reports ready only once speculation can run.

:func:`after_model_load` is the wrapper itself, shared with the CUDA
platform's patch (``patches/cuda_model_load.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from vllm_infinigen.patches._version import require_vllm
from vllm_infinigen.patches.platform_config import infinigen_selected

PATCH_NAME = "model_load"
TOUCHES = "vllm.v1.worker.cpu_model_runner.CPUModelRunner.load_model"
_MARK = "_vllm_infinigen_patched"
#: Attribute of vLLM's model runner that holds the worker's INFINIGEN runtime.
RUNTIME_ATTR = "infinigen_runtime"


def apply() -> bool:
    """Wrap the method once per process. Returns True if newly applied."""
    require_vllm(PATCH_NAME, TOUCHES)
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    return after_model_load(CPUModelRunner, _install)


def _install(runner: Any) -> None:
    from vllm_infinigen.engine.setup import setup_runtime

    previous = getattr(runner, RUNTIME_ATTR, None)
    if previous is not None:
        previous.shutdown()
    setattr(runner, RUNTIME_ATTR, setup_runtime(runner.vllm_config, runner.model))


def after_model_load(owner: type, install: Callable[[Any], None]) -> bool:
    """Wrap ``owner.load_model`` once per process so that, after the original
    loaded the model and when INFINIGEN is selected (``self.vllm_config``),
    ``install(self)`` runs. Returns True if newly applied."""
    original = owner.load_model  # type: ignore[attr-defined]
    if getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if infinigen_selected(self.vllm_config):
            install(self)

    setattr(load_model, _MARK, True)
    owner.load_model = load_model  # type: ignore[attr-defined]
    return True
