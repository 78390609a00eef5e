"""Make vLLM's CPU platform honour ``--attention-backend infinigen``.

Touches: ``vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls`` (vLLM 0.32),
which returns ``CPU_ATTN`` for every non-MLA layer whatever was selected. The
wrapper returns the INFINIGEN backend's class path when INFINIGEN is selected
for a non-MLA layer and delegates every other call unchanged, so other
choices behave exactly as before. INFINIGEN on an MLA model is refused with a
clear error at model construction (start-up), never mid-request.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm_infinigen.patches._version import require_vllm

PATCH_NAME = "cpu_backend_selection"
TOUCHES = "vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls"
_MARK = "_vllm_infinigen_patched"


def _is_infinigen(selected_backend: Any) -> bool:
    return getattr(selected_backend, "name", None) == "INFINIGEN"


def apply() -> bool:
    """Wrap the classmethod once per process. Returns True if newly applied."""
    require_vllm(PATCH_NAME, TOUCHES)
    from vllm.platforms.cpu import CpuPlatform

    current = CpuPlatform.__dict__["get_attn_backend_cls"]
    original = current.__func__
    if getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def get_attn_backend_cls(
        cls: type,
        selected_backend: Any,
        attn_selector_config: Any,
        num_heads: int | None = None,
    ) -> str:
        if _is_infinigen(selected_backend):
            if attn_selector_config.use_mla or attn_selector_config.use_sparse:
                raise ValueError(
                    "--attention-backend infinigen supports multi-head, GQA and "
                    "MQA attention; this model uses MLA/sparse attention, which "
                    "it does not support. Choose another attention backend."
                )
            return str(selected_backend.get_path())
        return str(original(cls, selected_backend, attn_selector_config, num_heads))

    setattr(get_attn_backend_cls, _MARK, True)
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)  # type: ignore[method-assign,assignment]
    return True
