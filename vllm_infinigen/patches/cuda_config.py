"""INFINIGEN's options on CUDA: what the CUDA path runs, and what it refuses.

Called by the platform hook (``patches/platform_config.py``) when INFINIGEN
is selected on a platform other than CPU, after the options were validated
(so in the API server, before any engine process starts). It touches no vLLM
function of its own: it reads the configuration vLLM built and, where the
user left ``swap_mode`` unset, writes the CUDA default into the
``--additional-config`` options, so that every process of the engine (they
unpickle the same configuration) reads the same value.

Nothing here touches CUDA (torch comes in only with the policy classes it
inspects): it runs on the CPU build too (``tests/patches/test_cuda_patches.py``).
The CUDA runtime (``engine/cuda_runtime.py``) applies the same swap-mode and
policy checks (:func:`check_cuda_swap_mode`, :func:`check_cuda_policies`) to
run-time reconfiguration.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from vllm_infinigen.config import ADDITIONAL_CONFIG_KEY, SWAP_MODES, InfiniGenConfig

#: ``swap_mode`` values the CUDA path runs. FlashAttention reads device
#: memory only, so the selected blocks always go through a staging buffer:
#: ``thread`` gathers them on a side CUDA stream started one layer ahead (the
#: config's stand-in for a side stream on CPU), ``sync`` gathers them on the
#: compute stream (the no-overlap baseline). ``in_place`` (the kernel reads
#: the host tier where it lies) is the CPU build's placement.
CUDA_SWAP_MODES: tuple[str, ...] = tuple(m for m in SWAP_MODES if m != "in_place")

#: ``swap_mode`` on CUDA when the user sets none: the overlapped gather.
CUDA_DEFAULT_SWAP_MODE = "thread"


def cuda_policies() -> tuple[str, ...]:
    """Policies the CUDA path runs: every registered policy that does not
    observe attention (the CUDA backend hands no attention weights to
    observers yet, so H2O's evidence would never grow)."""
    from vllm_infinigen.engine.policies.registry import POLICIES, policy_class

    return tuple(p for p in POLICIES if not policy_class(p).observes_attention)


def check_cuda_policies(policies: list[str] | tuple[str, ...]) -> None:
    """Refuse policies the CUDA path does not run (ValueError naming the
    option and the allowed values)."""
    allowed = cuda_policies()
    refused = [p for p in policies if p not in allowed]
    if refused:
        raise ValueError(
            f"infinigen option 'policy' must be one of {list(allowed)} on CUDA, "
            f"got {refused[0]!r}: the CUDA backend does not yet hand "
            "attention weights to policies that observe them"
        )


def check_cuda_swap_mode(swap_mode: str) -> None:
    """Refuse a ``swap_mode`` the CUDA path does not run (ValueError naming
    the option and the allowed values)."""
    if swap_mode not in CUDA_SWAP_MODES:
        raise ValueError(
            "infinigen option 'swap_mode' must be one of "
            f"{list(CUDA_SWAP_MODES)} on CUDA, got {swap_mode!r}: "
            "FlashAttention cannot read the host pool in place, so the "
            "selected blocks are gathered into a staging buffer"
        )


def _options(vllm_config: Any) -> MutableMapping[str, Any] | None:
    additional = getattr(vllm_config, "additional_config", None)
    if not isinstance(additional, MutableMapping):
        return None
    options = additional.get(ADDITIONAL_CONFIG_KEY)
    return options if isinstance(options, MutableMapping) else None


def _user_set(options: MutableMapping[str, Any] | None, name: str) -> bool:
    return options is not None and any(
        str(key).replace("-", "_") == name for key in options
    )


def check_cuda_options(vllm_config: Any, config: InfiniGenConfig) -> InfiniGenConfig:
    """Refuse what the CUDA path does not run, fill in its defaults, and
    return the effective options.

    Raises:
        ValueError: naming the option (ours or vLLM's) and what is allowed.
    """
    refusals = _refusals(vllm_config)
    if refusals:
        raise ValueError(refusals[0])
    options = _options(vllm_config)
    if _user_set(options, "swap_mode"):
        check_cuda_swap_mode(config.swap_mode)
    else:
        additional = vllm_config.additional_config
        if not isinstance(additional, MutableMapping):
            additional = {}
            vllm_config.additional_config = additional
        if options is None:
            options = additional[ADDITIONAL_CONFIG_KEY] = {}
        options["swap_mode"] = CUDA_DEFAULT_SWAP_MODE
        config = config.changed({"swap_mode": CUDA_DEFAULT_SWAP_MODE})
    check_cuda_policies([config.policy])
    return config


def _refusals(vllm_config: Any) -> list[str]:
    """vLLM features INFINIGEN's CUDA path cannot be combined with."""
    out = []
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        out.append(
            "--kv-transfer-config cannot be combined with --attention-backend "
            "infinigen (allowed: none): a KV connector moves whole requests' "
            "KV between the GPU cache and elsewhere, but INFINIGEN's KV cache "
            "already lives in its host pool"
        )
    cache_config = getattr(vllm_config, "cache_config", None)
    offload = getattr(cache_config, "kv_offloading_size", None)
    if offload is not None:
        # vLLM turns --kv-offloading-size into a KV connector only after the
        # platform hook ran (VllmConfig._post_init_kv_transfer_config), so the
        # connector is not in kv_transfer_config yet.
        out.append(
            f"--kv-offloading-size ({offload} GiB) cannot be combined with "
            "--attention-backend infinigen (allowed: unset); size INFINIGEN's "
            "host pool with the infinigen option 'host_pool_gib' instead"
        )
    parallel = getattr(vllm_config, "parallel_config", None)
    for name, flag in (
        ("decode_context_parallel_size", "--decode-context-parallel-size"),
        ("prefill_context_parallel_size", "--prefill-context-parallel-size"),
    ):
        size = int(getattr(parallel, name, 1) or 1)
        if size > 1:
            out.append(
                f"{flag} {size} cannot be combined with --attention-backend "
                "infinigen (allowed: 1): a request's KV blocks would be split "
                "over ranks that select them separately"
            )
    if getattr(vllm_config, "speculative_config", None) is not None:
        out.append(
            "--speculative-config cannot be combined with --attention-backend "
            "infinigen on CUDA (allowed: none): verification rows have several "
            "query tokens, which the sparse decode path does not select for"
        )
    return out
