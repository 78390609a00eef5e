"""Set up INFINIGEN's CUDA runtime (calibration, hooks) right after model load.

Touches: ``vllm.v1.worker.gpu_worker.Worker.load_model`` (vLLM 0.32), which
loads the model through either GPU model runner (V1 or V2). After the
original, and when the INFINIGEN backend is selected, the wrapper
(``patches/model_load.py``'s :func:`~.model_load.after_model_load`) builds
the worker's :class:`~vllm_infinigen.engine.cuda_runtime.CudaRuntime`
(calibrates the sparse layers or loads the cached calibration, installs
the one-layer-ahead hooks) and keeps it on the model runner
(``model_runner.infinigen_runtime``, where the worker extension and the KV
patches find it). It runs before vLLM profiles memory and allocates the KV
cache, which both need to know the sparse layers.

Applied on non-CPU platforms only (``docs/cuda.md``, "Patches").
"""

from __future__ import annotations

from typing import Any

from vllm_infinigen.patches._version import require_vllm
from vllm_infinigen.patches.model_load import RUNTIME_ATTR, after_model_load

PATCH_NAME = "cuda_model_load"
TOUCHES = "vllm.v1.worker.gpu_worker.Worker.load_model"


def apply() -> bool:
    """Wrap the method once per process. Returns True if newly applied."""
    require_vllm(PATCH_NAME, TOUCHES)
    from vllm.v1.worker.gpu_worker import Worker

    return after_model_load(Worker, _install)


def _install(worker: Any) -> None:
    from vllm_infinigen.engine.cuda_runtime import setup_cuda_runtime

    runner = worker.model_runner
    runtime = setup_cuda_runtime(worker.vllm_config, runner.get_model())
    previous = getattr(runner, RUNTIME_ATTR, None)
    if previous is not None:
        # A KV cache allocated before this load stays in its pool.
        pool, previous.swap.pool = previous.swap.pool, None
        previous.shutdown()
        if pool is not None:
            runtime.swap.adopt_pool(pool)
    setattr(runner, RUNTIME_ATTR, runtime)
