"""Set up INFINIGEN's runtime (calibration, hooks) right after model load.

Touches: ``vllm.v1.worker.cpu_model_runner.CPUModelRunner.load_model``
(vLLM 0.32). After the original loads the model, and when the INFINIGEN
backend is selected, the wrapper calibrates the sparse layers (or loads the
cached calibration), installs the one-layer-ahead hooks and keeps the
runtime on the model runner (``model_runner.infinigen_runtime``), so the
server reports ready only once speculation can run.
"""

from __future__ import annotations

import functools
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

    original = CPUModelRunner.load_model
    if getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if infinigen_selected(self.vllm_config):
            from vllm_infinigen.engine.setup import setup_runtime

            previous = getattr(self, RUNTIME_ATTR, None)
            if previous is not None:
                previous.shutdown()
            setattr(self, RUNTIME_ATTR, setup_runtime(self.vllm_config, self.model))

    setattr(load_model, _MARK, True)
    CPUModelRunner.load_model = load_model  # type: ignore[method-assign]
    return True
