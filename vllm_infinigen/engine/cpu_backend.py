"""The INFINIGEN attention backend on vLLM's CPU platform.

Shape follows vLLM's ``cpu_attn.py``: a backend class naming the builder and
the implementation. This version computes exact attention with vLLM's own CPU
kernels (``cpu_attention_with_kv_cache`` over the paged cache) for
full-attention and sliding-window layers, prefill, chunked prefill and decode
in mixed batches; block selection and the host swap space build on it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_infinigen.config import InfiniGenConfig
from vllm_infinigen.engine.startup import announce

BACKEND_NAME = "INFINIGEN"


class InfiniGenCPUBackend(CPUAttentionBackend):
    """Backend registered as ``INFINIGEN`` on the CPU platform."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[InfiniGenCPUImpl]:
        return InfiniGenCPUImpl

    @staticmethod
    def get_builder_cls() -> type[InfiniGenCPUMetadataBuilder]:
        return InfiniGenCPUMetadataBuilder


class InfiniGenCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """Builds one step's metadata for a KV cache group (all its layers)."""

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.infinigen_config = InfiniGenConfig.from_additional_config(
            vllm_config.additional_config
        )


class InfiniGenCPUImpl(CPUAttentionBackendImpl):
    """Per-layer attention of the INFINIGEN backend (exact in this version)."""

    supported_modes: ClassVar[tuple[str, ...]] = ("exact",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config()
        self.infinigen_config = InfiniGenConfig.from_additional_config(
            vllm_config.additional_config
        )
        announce(vllm_config, self.infinigen_config, mode="exact")
