"""Plugin entry point: registration, idempotence, the pickling of the member."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from importlib.metadata import entry_points

import pytest
import torch

from vllm_infinigen import plugin


def test_entry_point_declared() -> None:
    eps = entry_points(group="vllm.general_plugins")
    values = {ep.name: ep.value for ep in eps}
    assert values.get("infinigen") == "vllm_infinigen.plugin:register"


def test_endpoint_plugin_declared_and_satisfies_vllms_protocol() -> None:
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin

    eps = {ep.name: ep for ep in entry_points(group="vllm.endpoint_plugins")}
    plugin_object = eps["infinigen_api"].load()()
    assert isinstance(plugin_object, EndpointPlugin)
    assert plugin_object.name == "infinigen_api"


def test_register_is_idempotent() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    first = AttentionBackendEnum["INFINIGEN"]
    plugin.register()
    plugin.register()
    assert AttentionBackendEnum["INFINIGEN"] is first
    assert AttentionBackendEnum._member_names_.count("INFINIGEN") == 1


def test_backend_name_parses_in_any_case() -> None:
    from vllm.config.attention import AttentionConfig

    plugin.register()
    for spelling in ("infinigen", "INFINIGEN", "InfiniGen"):
        member = AttentionConfig.validate_backend_before(spelling)
        assert member.name == "INFINIGEN"


def test_backend_class_resolves() -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    backend = AttentionBackendEnum["INFINIGEN"].get_class()
    assert backend.get_name() == "INFINIGEN"
    # The CPU builder picks its sliding window from CPU impl instances.
    assert issubclass(backend.get_impl_cls(), CPUAttentionBackendImpl)


def _unpickle_in_fresh_process(payload: bytes, queue: mp.Queue) -> None:
    # A spawned child has not loaded plugins, like vLLM's engine core when it
    # unpickles its config.
    member = pickle.loads(payload)
    queue.put((member.name, member.get_path()))


def test_member_unpickles_in_spawned_child() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    payload = pickle.dumps(AttentionBackendEnum["INFINIGEN"])
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    child = ctx.Process(target=_unpickle_in_fresh_process, args=(payload, queue))
    child.start()
    name, path = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert name == "INFINIGEN"
    assert path == plugin.CPU_BACKEND_PATH


def _selector(**kwargs: object):  # type: ignore[no-untyped-def]
    from vllm.v1.attention.selector import AttentionSelectorConfig

    return AttentionSelectorConfig(
        head_size=64,
        dtype=torch.bfloat16,
        kv_cache_dtype="auto",
        block_size=None,
        **kwargs,  # type: ignore[arg-type]
    )


def test_cpu_platform_honours_infinigen_only() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    infinigen = AttentionBackendEnum["INFINIGEN"]
    assert CpuPlatform.get_attn_backend_cls(infinigen, _selector()) == (
        plugin.CPU_BACKEND_PATH
    )
    assert CpuPlatform.get_attn_backend_cls(
        infinigen, _selector(has_sliding_window=True)
    ) == (plugin.CPU_BACKEND_PATH)
    cpu_path = AttentionBackendEnum.CPU_ATTN.get_path()
    assert CpuPlatform.get_attn_backend_cls(None, _selector()) == cpu_path
    assert (
        CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, _selector())
        == cpu_path
    )
    # Other non-CPU choices still fall back exactly as before.
    assert (
        CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.FLASH_ATTN, _selector())
        == cpu_path
    )


def test_cpu_platform_refuses_infinigen_for_mla() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    with pytest.raises(ValueError, match="MLA"):
        CpuPlatform.get_attn_backend_cls(
            AttentionBackendEnum["INFINIGEN"], _selector(use_mla=True)
        )
