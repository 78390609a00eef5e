"""Validate INFINIGEN options and force eager mode when the backend is chosen.

Touches: ``check_and_update_config`` of the current platform class
(``vllm.platforms.cpu.CpuPlatform`` or the CUDA platform, vLLM 0.32), which
``VllmConfig.__post_init__`` calls once the whole configuration is known. The
wrapper runs the original first; then, when ``--attention-backend infinigen``
is selected, it validates ``--additional-config '{"infinigen": {...}}'``
(a ``ValueError`` naming the option stops start-up in the API server, before
any engine process starts). Where selection needs the previous layer's
input (CUDA; on CPU a staging ``swap_mode`` or ``query_source:
speculated`` at start-up) it turns compilation and CUDA graphs off, like
``--enforce-eager``: that speculation runs from a forward pre-hook between
layers, which a traced graph would bake in. On CPU with the kernel reading
in place (the default) it keeps vLLM's compilation: everything INFINIGEN
does then runs inside vLLM's attention and KV-update ops, which the graph
calls as opaque ops (:func:`needs_eager`). On CPU it also sizes the host
tier (vLLM's KV cache) from ``host_pool_gib`` and, unless the user set
``--block-size``, takes the block size from timing vLLM's kernel on this
machine: the smallest of 32, 64 and 128 tokens within 3% of the fastest
(``engine/cost_probe.probe_block_size``; smaller blocks select more
precisely, and the kernel's speed at each size depends on the CPU and the
model's head size).
"""

from __future__ import annotations

import functools
from typing import Any

from vllm_infinigen.config import (
    ADDITIONAL_CONFIG_KEY,
    InfiniGenConfig,
    check_model_support,
    check_parallel_layout,
)
from vllm_infinigen.patches._version import require_vllm

PATCH_NAME = "platform_config"
TOUCHES = "vllm.platforms.<current>.check_and_update_config"
_MARK = "_vllm_infinigen_patched"


def infinigen_selected(vllm_config: Any) -> bool:
    attention_config = getattr(vllm_config, "attention_config", None)
    backend = getattr(attention_config, "backend", None)
    return getattr(backend, "name", None) == "INFINIGEN"


def needs_eager(config: InfiniGenConfig, is_cpu: bool) -> bool:
    """Whether the start-up options need the one-layer-ahead pre-hooks, so
    eager mode: on CUDA always; on CPU when blocks are copied to staging
    (the copy overlaps the previous layer) or the query is speculated."""
    if not is_cpu:
        return True
    return config.swap_mode != "in_place" or config.query_source == "speculated"


def _force_eager(vllm_config: Any) -> None:
    from vllm.config import CompilationMode, CUDAGraphMode

    model_config = vllm_config.model_config
    if model_config is not None:
        model_config.enforce_eager = True
    compilation = vllm_config.compilation_config
    compilation.mode = CompilationMode.NONE
    compilation.cudagraph_mode = CUDAGraphMode.NONE
    compilation.max_cudagraph_capture_size = 0
    compilation.cudagraph_capture_sizes = []


def _measured_block_size(vllm_config: Any) -> tuple[int, str]:
    """The CPU block size from timing vLLM's kernel on this machine at the
    model's attention shape (``engine/cost_probe.probe_block_size``)."""
    from vllm_infinigen.engine.cost_probe import probe_block_size

    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    choice = probe_block_size(
        model_config.get_num_attention_heads(parallel),
        model_config.get_num_kv_heads(parallel),
        model_config.get_head_size(),
        model_config.dtype,
    )
    return choice.block_size, choice.describe()


def _apply_memory_and_blocks(
    vllm_config: Any, config: InfiniGenConfig, logger: Any
) -> None:
    from vllm.platforms import current_platform

    cache_config = vllm_config.cache_config
    if current_platform.is_cpu():
        if not cache_config.user_specified_block_size and (
            vllm_config.model_config is not None
        ):
            cache_config.block_size, reason = _measured_block_size(vllm_config)
            # Fixed from here on: vLLM's engine core runs this hook again on
            # the configuration the front-end sends it (``__post_init__``
            # after its handshake), and a second probe could choose another
            # size than the one the front-end logged.
            cache_config.user_specified_block_size = True
            logger.info_once("INFINIGEN %s", reason)
        if config.host_pool_gib is not None:
            # On CPU the host tier is vLLM's own paged cache: size it.
            cache_config.kv_cache_memory_bytes = int(config.host_pool_gib * (1 << 30))


WORKER_EXTENSION = "vllm_infinigen.engine.worker_extension.InfiniGenWorkerExtension"


def _add_worker_extension(vllm_config: Any) -> None:
    """Expose the counters through ``collective_rpc("infinigen_stats")``."""
    parallel = vllm_config.parallel_config
    if not parallel.worker_extension_cls:
        parallel.worker_extension_cls = WORKER_EXTENSION


def validate(vllm_config: Any) -> InfiniGenConfig:
    """Parse and validate our options against the model. Raises ValueError."""
    config = InfiniGenConfig.from_additional_config(vllm_config.additional_config)
    check_parallel_layout(vllm_config.parallel_config.pipeline_parallel_size)
    model_config = vllm_config.model_config
    if model_config is not None:
        check_model_support(
            architecture=", ".join(getattr(model_config, "architectures", None) or [])
            or "this model",
            use_mla=bool(getattr(model_config, "use_mla", False)),
            is_encoder_decoder=bool(getattr(model_config, "is_encoder_decoder", False)),
            is_attention_free=bool(getattr(model_config, "is_attention_free", False)),
            runner_type=str(getattr(model_config, "runner_type", "generate")),
        )
        text_config = model_config.hf_text_config
        num_layers = int(getattr(text_config, "num_hidden_layers", 0) or 0)
        if num_layers > 0:
            config.check_model(num_layers)
    return config


def apply() -> bool:
    """Wrap the current platform's hook once per process."""
    require_vllm(PATCH_NAME, TOUCHES)
    from vllm.logger import init_logger
    from vllm.platforms import current_platform

    logger = init_logger("vllm.infinigen")
    platform_cls = type(current_platform)
    original = platform_cls.check_and_update_config.__func__  # type: ignore[attr-defined]
    if getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def check_and_update_config(cls: type, vllm_config: Any) -> None:
        original(cls, vllm_config)
        if infinigen_selected(vllm_config):
            config = validate(vllm_config)
            if not current_platform.is_cpu():
                from vllm_infinigen.patches.cuda_config import check_cuda_options

                config = check_cuda_options(vllm_config, config)
            if needs_eager(config, current_platform.is_cpu()):
                _force_eager(vllm_config)
            _apply_memory_and_blocks(vllm_config, config, logger)
            _add_worker_extension(vllm_config)
        elif (
            isinstance(vllm_config.additional_config, dict)
            and ADDITIONAL_CONFIG_KEY in vllm_config.additional_config
        ):
            logger.warning(
                "--additional-config has '%s' options but the attention backend "
                "is not infinigen; they are ignored",
                ADDITIONAL_CONFIG_KEY,
            )

    setattr(check_and_update_config, _MARK, True)
    platform_cls.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[method-assign,assignment]
    return True
