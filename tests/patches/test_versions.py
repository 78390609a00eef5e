"""Each patch refuses to touch a vLLM release it was not written for."""

from __future__ import annotations

import pytest

from vllm_infinigen.patches import (
    _version,
    cpu_backend_selection,
    model_load,
    platform_config,
)


@pytest.mark.parametrize("patch", [cpu_backend_selection, platform_config, model_load])
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
    for patch in (cpu_backend_selection, platform_config, model_load):
        patch.apply()
        assert patch.apply() is False
