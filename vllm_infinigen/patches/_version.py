"""The vLLM versions our patches were written against, checked before use."""

from __future__ import annotations

#: Every patch module was written by reading and running these releases.
SUPPORTED_VLLM_PREFIXES: tuple[str, ...] = ("0.32.",)


class UnsupportedVllmVersion(RuntimeError):
    """Raised instead of patching a vLLM release we have not read."""


def installed_vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def require_vllm(patch_name: str, touches: str) -> str:
    """Return the vLLM version, or refuse to apply ``patch_name``.

    Args:
        patch_name: our patch module, for the message.
        touches: the vLLM function the patch wraps, for the message.
    """
    version = installed_vllm_version()
    if not version.startswith(SUPPORTED_VLLM_PREFIXES):
        raise UnsupportedVllmVersion(
            f"vllm-infinigen patch {patch_name} wraps {touches} and was written "
            f"for vLLM {', '.join(p + 'x' for p in SUPPORTED_VLLM_PREFIXES)}; "
            f"installed vLLM is {version}. Install a supported vLLM "
            "(pip install 'vllm-infinigen[cpu]' or '[cuda]')."
        )
    return version
