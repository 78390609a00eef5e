"""Each patch refuses to touch a vLLM release it was not written for."""

from __future__ import annotations

import pytest

from vllm_infinigen.patches import (
    _version,
    cpu_backend_selection,
    kv_memory,
    model_load,
    platform_config,
)

ALL_PATCHES = [cpu_backend_selection, platform_config, model_load, kv_memory]


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
    for patch in ALL_PATCHES:
        patch.apply()
        assert patch.apply() is False
