"""The INFINIGEN attention backend on CUDA (vLLM's FlashAttention kernels).

Registered instead of the CPU backend when the platform is not CPU. This
version is exact: it runs vLLM's FlashAttention backend under the INFINIGEN
name and logs the effective configuration. It needs the official ``vllm``
wheel with CUDA and is exercised by the ``gpu``-marked tests only.
"""

from __future__ import annotations

from typing import Any

from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
)

from vllm_infinigen.config import InfiniGenConfig
from vllm_infinigen.engine.startup import announce

BACKEND_NAME = "INFINIGEN"


class InfiniGenFlashAttnBackend(FlashAttentionBackend):
    """Backend registered as ``INFINIGEN`` on CUDA platforms."""

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[InfiniGenFlashAttnImpl]:
        return InfiniGenFlashAttnImpl


class InfiniGenFlashAttnImpl(FlashAttentionImpl):
    """Per-layer attention of the INFINIGEN backend on CUDA (exact)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config()
        self.infinigen_config = InfiniGenConfig.from_additional_config(
            vllm_config.additional_config
        )
        announce(vllm_config, self.infinigen_config, mode="exact")
