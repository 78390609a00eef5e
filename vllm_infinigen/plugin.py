"""vLLM plugin entry point (``vllm.general_plugins`` -> :func:`register`).

vLLM calls :func:`register` in every process it starts (API server, engine
core, workers, Ray workers), possibly several times: everything here is
idempotent.
"""

from __future__ import annotations

from typing import Any

BACKEND_NAME = "INFINIGEN"
CPU_BACKEND_PATH = "vllm_infinigen.engine.cpu_backend.InfiniGenCPUBackend"
CUDA_BACKEND_PATH = "vllm_infinigen.engine.cuda_backend.InfiniGenFlashAttnBackend"


def backend_class_path() -> str:
    """The INFINIGEN backend class for the current platform."""
    from vllm.platforms import current_platform

    return CPU_BACKEND_PATH if current_platform.is_cpu() else CUDA_BACKEND_PATH


def infinigen_backend_member() -> Any:
    """Register ``AttentionBackendEnum.INFINIGEN`` (once) and return it.

    Also the unpickling function of the member: vLLM pickles its config
    (holding the enum member) into spawned engine processes, which unpickle
    it before they load plugins. The member's ``__reduce_ex__`` points here,
    so the child registers the member on demand instead of failing with
    ``'...' is not a valid AttentionBackendEnum``.
    """
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

    member = AttentionBackendEnum.__members__.get(BACKEND_NAME)
    if member is None:
        register_backend(BACKEND_NAME, backend_class_path())
        member = AttentionBackendEnum[BACKEND_NAME]
        member.__reduce_ex__ = _reduce_member  # type: ignore[method-assign,assignment]
    return member


def _reduce_member(protocol: int) -> tuple[Any, tuple[()]]:
    return (infinigen_backend_member, ())


def register() -> None:
    """Register the INFINIGEN backend and apply our vLLM patches."""
    from vllm.platforms import current_platform

    from vllm_infinigen.patches import (
        cpu_backend_selection,
        cuda_kv_alloc,
        cuda_kv_memory,
        cuda_model_load,
        kv_memory,
        model_load,
        platform_config,
    )

    infinigen_backend_member()
    if current_platform.is_cpu():
        cpu_backend_selection.apply()
        model_load.apply()
        kv_memory.apply()
    else:
        cuda_model_load.apply()
        cuda_kv_memory.apply()
        cuda_kv_alloc.apply()
    platform_config.apply()
