"""The options of the INFINIGEN backend and its one start-up log line, per
process."""

from __future__ import annotations

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger

from vllm_infinigen.config import InfiniGenConfig

logger = init_logger("vllm.infinigen")


def announce(vllm_config: VllmConfig, config: InfiniGenConfig, mode: str) -> None:
    """Log the effective configuration once per process (every attention
    layer's implementation calls this: vLLM's ``info_once`` keeps the
    first of identical lines).

    Args:
        mode: what the backend does at decode in this build, e.g. ``exact``.
    """
    model_config = vllm_config.model_config
    logger.info_once(
        "INFINIGEN attention backend active: mode=%s enforce_eager=%s block_size=%s %s",
        mode,
        getattr(model_config, "enforce_eager", None),
        vllm_config.cache_config.block_size,
        config.describe(),
    )


def start_backend(staging: str) -> tuple[VllmConfig, InfiniGenConfig]:
    """The current vLLM configuration and INFINIGEN's options in it, logged
    once per process (what an attention implementation reads at start-up).

    Args:
        staging: what the platform copies selected blocks into, for the log
            line (e.g. ``device staging``); ``swap_mode`` ``in_place``
            reads them from the host tier instead.
    """
    vllm_config = get_current_vllm_config()
    config = InfiniGenConfig.from_additional_config(vllm_config.additional_config)
    where = (
        "in place from the host tier"
        if config.swap_mode == "in_place"
        else f"through {staging} ({config.swap_mode} copy)"
    )
    mode = (
        f"budget covers every block (exact), read {where}"
        if config.is_exact
        else f"sparse decode, selected blocks read {where}"
    )
    announce(vllm_config, config, mode=mode)
    return vllm_config, config
