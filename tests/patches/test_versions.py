"""Each patch refuses to touch a vLLM release it was not written for."""

from __future__ import annotations

import pytest

from vllm_infinigen.patches import (
    _version,
    cpu_backend_selection,
    cuda_kv_alloc,
    cuda_kv_memory,
    cuda_model_load,
    kv_memory,
    model_load,
    platform_config,
)

CPU_PATCHES = [cpu_backend_selection, platform_config, model_load, kv_memory]
#: Applied on other platforms; that each applies once is checked, with the
#: wrapped vLLM functions restored after, in ``test_cuda_patches.py``.
CUDA_PATCHES = [cuda_model_load, cuda_kv_memory, cuda_kv_alloc]
ALL_PATCHES = CPU_PATCHES + CUDA_PATCHES


@pytest.mark.parametrize("patch", ALL_PATCHES)
def test_patch_refuses_unknown_vllm(
    monkeypatch: pytest.MonkeyPatch, patch: object
) -> None:
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.9")
    with pytest.raises(_version.UnsupportedVllmVersion) as info:
        patch.apply()  # type: ignore[attr-defined]
    message = str(info.value)
    assert "0.31.9" in message
    assert patch.TOUCHES in message  # type: ignore[attr-defined]


def test_patches_apply_once() -> None:
    for patch in CPU_PATCHES:
        patch.apply()
        assert patch.apply() is False
