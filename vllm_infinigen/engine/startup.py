"""The one start-up log line of the INFINIGEN backend, per process."""

from __future__ import annotations

import threading

from vllm.config import VllmConfig
from vllm.logger import init_logger

from vllm_infinigen.config import InfiniGenConfig

logger = init_logger("vllm.infinigen")

_lock = threading.Lock()
_announced = False


def announce(vllm_config: VllmConfig, config: InfiniGenConfig, mode: str) -> None:
    """Log the effective configuration once per process.

    Args:
        mode: what the backend does at decode in this build, e.g. ``exact``.
    """
    global _announced
    with _lock:
        if _announced:
            return
        _announced = True
    model_config = vllm_config.model_config
    logger.info(
        "INFINIGEN attention backend active: mode=%s enforce_eager=%s "
        "(forced by the plugin) block_size=%s %s",
        mode,
        getattr(model_config, "enforce_eager", None),
        vllm_config.cache_config.block_size,
        config.describe(),
    )
