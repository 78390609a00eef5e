"""The CUDA patches against the installed vLLM 0.32, on its CPU build.

Each patch finds and wraps the vLLM function it names (and only once; that
each refuses another vLLM version is ``test_versions.py``'s). Registration
applies them on non-CPU platforms only, leaving the CPU path as it was. The
wrapped functions delegate unchanged when INFINIGEN is not selected; when it
is, the KV sizing hands vLLM a byte count from which vLLM's own arithmetic
derives the planned block count, and the allocation puts the sparse layers
in the host pool and the others on the device. The sizing arithmetic and the
CUDA option checks are tested directly.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.v1.kv_cache_layout import KVCacheLayout

from tests.engine.cuda_world import NAMES, SPEC, World, kv_cache_config
from tests.engine.tiny_model import BLOCK, DIM, KV
from vllm_infinigen.config import InfiniGenConfig
from vllm_infinigen.patches import (
    cuda_config,
    cuda_kv_alloc,
    cuda_kv_memory,
    cuda_model_load,
)
from vllm_infinigen.patches.cuda_kv_memory import (
    KVBlockPlan,
    SparseLayerShape,
    device_bytes_per_block,
    plan_kv_blocks,
    staging_blocks,
)
from vllm_infinigen.patches.model_load import RUNTIME_ATTR

GIB = 1 << 30


# ------------------------------------------------------------ model load
def test_model_load_wraps_the_gpu_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.worker.gpu_worker import Worker

    calls = []

    def original(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(kwargs)

    monkeypatch.setattr(Worker, "load_model", original)
    assert cuda_model_load.apply() is True
    assert cuda_model_load.apply() is False
    wrapped = Worker.load_model
    assert wrapped.__wrapped__ is original  # type: ignore[attr-defined]

    runner = SimpleNamespace(get_model=lambda: "model")
    worker = SimpleNamespace(vllm_config=_config("FLASH_ATTN"), model_runner=runner)
    wrapped(worker, load_dummy_weights=True)  # type: ignore[arg-type]
    assert calls == [{"load_dummy_weights": True}]
    assert not hasattr(runner, RUNTIME_ATTR)  # another backend: untouched

    from vllm_infinigen.engine import cuda_runtime

    built: list[Any] = []
    old = SimpleNamespace(
        swap=SimpleNamespace(pool="pool"), shutdown=lambda: built.append("shut")
    )
    new = SimpleNamespace(swap=SimpleNamespace(adopt_pool=built.append))
    monkeypatch.setattr(cuda_runtime, "setup_cuda_runtime", lambda c, m: new)
    setattr(runner, RUNTIME_ATTR, old)
    worker.vllm_config = _config("INFINIGEN")
    wrapped(worker)  # type: ignore[arg-type]
    assert getattr(runner, RUNTIME_ATTR) is new
    assert built == ["shut", "pool"]  # the KV cache's pool moved to the new one


# ------------------------------------------------------------- KV sizing
def _plan(**changes: Any) -> KVBlockPlan:
    """:func:`plan_kv_blocks` of a 2 GiB GPU share, 1000-byte vLLM blocks
    (900 of them host, 150 device), 0.5 GiB staging and a 1 GiB pool of
    100 GiB pinnable, with ``changes``."""
    args: dict[str, Any] = dict(
        gpu_kv_bytes=2 * GIB,
        vllm_block_bytes=1000,
        host_block_bytes=900,
        device_block_bytes=150,
        staging_bytes=GIB // 2,
        host_pool_bytes=GIB,
        host_available_bytes=100 * GIB,
        blocks_needed=100,
    )
    return plan_kv_blocks(**{**args, **changes})


def test_plan_is_bound_by_the_host_pool() -> None:
    plan = _plan(
        gpu_kv_bytes=10 * GIB,
        staging_bytes=GIB,
        host_pool_bytes=9_000_000,
        host_available_bytes=None,
    )
    assert plan.num_blocks == 10_000 and plan.limited_by == "host_pool_gib"
    assert plan.host_pool_bytes == 9_000_000
    assert plan.device_bytes == GIB + 10_000 * 150
    assert plan.available_memory // 1000 == plan.num_blocks


def test_plan_is_bound_by_the_gpu() -> None:
    plan = _plan(
        device_block_bytes=300,
        host_pool_bytes=100 * GIB,
        host_available_bytes=200 * GIB,
    )
    assert plan.limited_by == "gpu_memory"
    assert plan.num_blocks == (2 * GIB - GIB // 2) // 300
    assert plan.device_bytes <= 2 * GIB < plan.device_bytes + 300


def test_plan_defaults_the_pool_to_vllms_size_within_host_memory() -> None:
    common = dict(
        gpu_kv_bytes=GIB,
        host_block_bytes=1000,
        device_block_bytes=10,
        staging_bytes=0,
        host_pool_bytes=None,
        blocks_needed=1,
    )
    roomy = _plan(host_available_bytes=None, **common)
    assert roomy.num_blocks == GIB // 1000
    tight = _plan(host_available_bytes=GIB // 4, **common)
    assert tight.num_blocks == (GIB // 4) // 1000


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"host_pool_bytes": 300 * GIB},
            r"'host_pool_gib' must be in \(0, 100.00\] .* got 300.00",
        ),
        ({"host_pool_bytes": 50_000}, r"'host_pool_gib' must be at least 0.000"),
        ({"staging_bytes": 2 * GIB}, "--gpu-memory-utilization"),
        ({"staging_bytes": 2 * GIB}, "'max_blocks'"),
        ({"device_block_bytes": GIB}, "raise --gpu-memory-utilization"),
        ({"host_block_bytes": 0}, "bytes per block must be positive"),
    ],
)
def test_plan_refusals_name_the_option(changes: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _plan(**changes)


@pytest.mark.parametrize("options", [{}, {"partial_dtype": "int4"}])
def test_device_bytes_per_block_match_what_the_runtime_allocates(
    options: dict[str, Any],
) -> None:
    """Measured from the tensors a sparse layer allocates at its first KV
    write (partial keys, packed at 4 bits or not, residual sums and fill,
    counters), per block."""
    world = World([30, 41], **options)
    layer = world.layer(1)
    owned = [layer.partial_cache, layer.residual_sums, layer.residual_fill]
    owned.append(layer.counters)
    allocated = sum(t.nbytes for t in owned if t is not None)
    num_blocks = layer.host_cache.shape[0]
    spec = layer.speculator
    shape = SparseLayerShape(spec.num_kv_heads, spec.d_partial, spec.d_residual)
    dtype = layer.partial_cache.dtype
    assert dtype == world.runtime.partial_dtype(torch.float32)
    assert device_bytes_per_block([shape], BLOCK, dtype, 0) * num_blocks == (allocated)
    dense_page = KV * BLOCK * 2 * DIM * 4
    assert device_bytes_per_block([], BLOCK, dtype, dense_page) == dense_page


def test_staging_covers_both_buffers_and_a_prefill_context() -> None:
    """Two parity buffers of ``max_num_seqs`` rows at the widest selection
    (a fifth of the longest request's blocks, or all of them when exact),
    plus one ``max_model_len`` context for the prefill region."""
    selection = World([9], budget=0.2, min_blocks=8).runtime.selection
    longest = math.ceil(1000 / BLOCK)
    slots = {
        exact: staging_blocks(
            selection,
            exact=exact,
            max_num_seqs=8,
            max_model_len=1000,
            block_size=BLOCK,
            sparse_min_tokens=0,
        )
        for exact in (False, True)
    }
    assert slots[False] == 2 * 8 * math.ceil(0.2 * longest) + longest
    assert slots[True] == 2 * 8 * longest + longest


def _worker(world: World, gpu_bytes: int) -> Any:
    """A GPU worker as the sizing wrapper sees it, over ``world``'s layers."""
    runtime = world.runtime
    config = _config("INFINIGEN")
    return SimpleNamespace(
        vllm_config=config,
        cache_config=config.cache_config,
        scheduler_config=config.scheduler_config,
        model_config=SimpleNamespace(max_model_len=256),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        get_kv_cache_spec=lambda: dict.fromkeys(NAMES, SPEC),
        model_runner=SimpleNamespace(**{RUNTIME_ATTR: runtime}),
        gpu_bytes=gpu_bytes,
    )


def test_kv_memory_wrapper_sets_vllms_block_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the wrapper returns, divided by vLLM's own arithmetic
    (``get_kv_cache_config_from_groups``), gives the planned block count,
    and the tiers of that configuration fit the pool and the GPU."""
    from vllm.v1.core.kv_cache_utils import (
        get_kv_cache_config_from_groups,
        get_kv_cache_groups,
    )
    from vllm.v1.worker.gpu_worker import Worker

    monkeypatch.setattr(
        Worker, "determine_available_memory", lambda self: self.gpu_bytes
    )
    assert cuda_kv_memory.apply() is True
    assert cuda_kv_memory.apply() is False
    wrapped = Worker.determine_available_memory
    world = World([30, 41], budget=0.25, host_pool_gib=0.01)
    other = _worker(world, 64 << 20)
    other.vllm_config = _config("FLASH_ATTN")
    assert wrapped(other) == 64 << 20  # type: ignore[arg-type]

    worker = _worker(world, 64 << 20)
    returned = wrapped(worker)  # type: ignore[arg-type]
    plan = cuda_kv_memory.size_tiers(worker, world.runtime, 64 << 20)
    specs = worker.get_kv_cache_spec()
    groups = get_kv_cache_groups(worker.vllm_config, dict(specs))
    kv_config = get_kv_cache_config_from_groups(worker.vllm_config, groups, returned)
    assert kv_config.num_blocks == plan.num_blocks
    assert plan.limited_by == "host_pool_gib"
    tiers = cuda_kv_alloc.split_tiers(
        kv_config, KVCacheLayout.LBNHC, {NAMES[1], NAMES[2]}
    )
    assert tiers.host_bytes == plan.host_pool_bytes <= 0.01 * GIB
    assert tiers.device_bytes < plan.device_bytes <= 64 << 20


# --------------------------------------------------------- KV allocation
@pytest.fixture
def runner_modules(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Both runner modules, restored after the test."""
    import importlib

    modules = [importlib.import_module(n) for n in cuda_kv_alloc.RUNNER_MODULES]
    for module in modules:
        monkeypatch.setattr(module, "allocate_kv_cache", module.allocate_kv_cache)
    return modules


def test_kv_alloc_rebinds_both_runner_modules(runner_modules: list[Any]) -> None:
    from vllm.v1.worker import utils

    assert cuda_kv_alloc.apply() is True
    assert cuda_kv_alloc.apply() is False
    config = kv_cache_config(20)
    want = utils.allocate_kv_cache(config, torch.device("cpu"), KVCacheLayout.LBNHC)
    for module in runner_modules:
        wrapper = module.allocate_kv_cache
        assert wrapper is not utils.allocate_kv_cache
        assert wrapper.__wrapped__ is utils.allocate_kv_cache
        # No INFINIGEN (and no CUDA): vLLM's allocation, unchanged.
        got = wrapper(config, torch.device("cpu"), KVCacheLayout.LBNHC)
        assert {n: (t.shape, t.stride()) for n, t in got.items()} == {
            n: (t.shape, t.stride()) for n, t in want.items()
        }


def test_kv_alloc_refuses_a_foreign_rebinding(runner_modules: list[Any]) -> None:
    runner_modules[1].allocate_kv_cache = lambda *a: {}
    with pytest.raises(RuntimeError, match="another plugin rebound it"):
        cuda_kv_alloc.apply()


def test_tiered_allocation_puts_sparse_layers_in_the_pool() -> None:
    world = World([9])
    states = {NAMES[1]: world.layer(1), NAMES[2]: world.layer(2)}
    config = kv_cache_config(20)
    made: list[Any] = []

    def make_pool(nbytes: int, device: torch.device) -> Any:
        pool = SimpleNamespace(
            device_view=torch.zeros(nbytes, dtype=torch.uint8),
            register_s=0.0,
            release=lambda: None,
        )
        made.append(pool)
        return pool

    views = cuda_kv_alloc.allocate_tiers(
        config, torch.device("cpu"), KVCacheLayout.LBNHC, None, states, make_pool
    )
    (pool,) = made
    assert world.runtime.swap.pool is pool
    base = pool.device_view.data_ptr()
    for name in NAMES[1:]:
        start = views[name].data_ptr() - base
        assert 0 <= start < pool.device_view.numel()
        assert views[name].shape == (20, KV, BLOCK, 2 * DIM)
    dense = views[NAMES[0]]
    assert not base <= dense.data_ptr() < base + pool.device_view.numel()
    assert pool.device_view.numel() == 2 * 20 * KV * BLOCK * 2 * DIM * 4
    # Writes through one layer's view land in its own region only.
    views[NAMES[1]].fill_(1.0)
    assert views[NAMES[2]].abs().sum() == 0 and dense.abs().sum() == 0


def test_split_refuses_layouts_and_kernel_blocks_it_cannot_index() -> None:
    config = kv_cache_config(20)
    with pytest.raises(ValueError, match="layer-compact"):
        cuda_kv_alloc.split_tiers(config, KVCacheLayout.BLNHC, {NAMES[1]})
    with pytest.raises(ValueError, match="--block-size 2"):
        cuda_kv_alloc.split_tiers(config, KVCacheLayout.LBNHC, {NAMES[1]}, [2])
    dense_only = cuda_kv_alloc.split_tiers(config, KVCacheLayout.LBNHC, set(), [2])
    assert dense_only.host_bytes == 0  # dense layers may split their blocks


# ----------------------------------------------------------- registration
PLATFORM_CHECK = textwrap.dedent(
    """
    import importlib
    from unittest import mock

    import torch
    from vllm.platforms import current_platform

    from vllm_infinigen import plugin
    from vllm_infinigen.patches import cuda_kv_alloc

    MARK = "_vllm_infinigen_patched"

    def patched():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        from vllm.v1.worker.gpu_worker import Worker
        modules = [importlib.import_module(n) for n in cuda_kv_alloc.RUNNER_MODULES]
        return {
            "cpu_load": getattr(CPUModelRunner.load_model, MARK, False),
            "gpu_load": getattr(Worker.load_model, MARK, False),
            "gpu_memory": getattr(Worker.determine_available_memory, MARK, False),
            "gpu_alloc": [getattr(m.allocate_kv_cache, MARK, False) for m in modules],
        }

    if {cuda}:
        with mock.patch.object(type(current_platform), "is_cpu", return_value=False):
            plugin.register()
    else:
        plugin.register()
    print(patched())
    assert not torch.cuda.is_initialized()
    """
)


@pytest.mark.parametrize("cuda", [False, True])
def test_registration_applies_the_patches_of_its_platform(cuda: bool) -> None:
    script = PLATFORM_CHECK.replace("{cuda}", str(cuda))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    flags = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert flags == {
        "cpu_load": not cuda,
        "gpu_load": cuda,
        "gpu_memory": cuda,
        "gpu_alloc": [cuda, cuda],
    }


# ---------------------------------------------------------- CUDA options
def _config(backend: str, options: dict[str, Any] | None = None, **fields: Any) -> Any:
    """A VllmConfig as far as the CUDA option checks and patches read it."""
    from vllm.v1.kv_cache_layout import KVCacheLayout as Layout

    config = SimpleNamespace(
        attention_config=SimpleNamespace(
            backend=SimpleNamespace(name=backend), hisparse_config=None
        ),
        additional_config={} if options is None else {"infinigen": options},
        kv_transfer_config=None,
        speculative_config=None,
        cache_config=SimpleNamespace(
            kv_offloading_size=None,
            get_resolved_kv_cache_layout=lambda: Layout.LBNHC,
            num_gpu_blocks_override=None,
            prefix_cache_retention_interval=None,
        ),
        parallel_config=SimpleNamespace(
            decode_context_parallel_size=1, prefill_context_parallel_size=1
        ),
        scheduler_config=SimpleNamespace(
            disable_hybrid_kv_cache_manager=False, max_num_seqs=4
        ),
    )
    for name, value in fields.items():
        target = config
        *path, last = name.split("__")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return config


def test_cuda_defaults_swap_mode_to_the_side_stream() -> None:
    config = _config("INFINIGEN", {"budget": 0.3})
    effective = cuda_config.check_cuda_options(
        config, InfiniGenConfig.from_additional_config(config.additional_config)
    )
    assert effective.swap_mode == "thread" and effective.budget == 0.3
    # Written into the options every engine process unpickles.
    assert config.additional_config["infinigen"]["swap_mode"] == "thread"
    bare = _config("INFINIGEN")
    cuda_config.check_cuda_options(bare, InfiniGenConfig())
    assert bare.additional_config == {"infinigen": {"swap_mode": "thread"}}


@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_cuda_keeps_a_staging_swap_mode(mode: str) -> None:
    config = _config("INFINIGEN", {"swap-mode": mode})
    parsed = InfiniGenConfig.from_additional_config(config.additional_config)
    assert cuda_config.check_cuda_options(config, parsed).swap_mode == mode


@pytest.mark.parametrize(
    ("options", "fields", "message"),
    [
        (
            {"swap_mode": "in_place"},
            {},
            r"'swap_mode' must be one of \['sync', 'thread'\] on CUDA, "
            r"got 'in_place'",
        ),
        (
            {"policy": "h2o"},
            {},
            r"'policy' must be one of \['infinigen', 'quest', 'streaming', "
            r"'dense'\] on CUDA, got 'h2o'",
        ),
        ({}, {"kv_transfer_config": object()}, "--kv-transfer-config"),
        ({}, {"cache_config__kv_offloading_size": 8}, r"--kv-offloading-size \(8"),
        (
            {},
            {"parallel_config__decode_context_parallel_size": 2},
            r"--decode-context-parallel-size 2 .* \(allowed: 1\)",
        ),
        (
            {},
            {"parallel_config__prefill_context_parallel_size": 2},
            "--prefill-context-parallel-size",
        ),
        ({}, {"speculative_config": object()}, "--speculative-config"),
    ],
)
def test_cuda_refusals_name_the_option(
    options: dict[str, Any], fields: dict[str, Any], message: str
) -> None:
    config = _config("INFINIGEN", options, **fields)
    parsed = InfiniGenConfig.from_additional_config(config.additional_config)
    with pytest.raises(ValueError, match=message):
        cuda_config.check_cuda_options(config, parsed)


def test_cuda_checks_read_a_real_engine_config(qwen_model_dir: Path) -> None:
    """The attribute names the checks read exist on vLLM's own config (built
    here on the CPU platform, checked as the CUDA hook would)."""
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(
        model=str(qwen_model_dir),
        max_model_len=1024,
        attention_backend="infinigen",
        additional_config={"infinigen": {"budget": 0.25}},
    ).create_engine_config()
    parsed = InfiniGenConfig.from_additional_config(config.additional_config)
    assert cuda_config.check_cuda_options(config, parsed).swap_mode == "thread"
    config.cache_config.kv_offloading_size = 4.0
    with pytest.raises(ValueError, match="--kv-offloading-size"):
        cuda_config.check_cuda_options(config, parsed)
