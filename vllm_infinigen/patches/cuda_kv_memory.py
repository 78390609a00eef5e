"""Size INFINIGEN's tiers when vLLM sizes the KV cache on CUDA.

Touches: ``vllm.v1.worker.gpu_worker.Worker.determine_available_memory``
(vLLM 0.32, shared by both GPU model runners). vLLM turns the bytes it
returns into the scheduler's block count (``available //
bytes_per_block``, ``v1/core/kv_cache_utils.py``), so returning ``N *
bytes_per_block`` sets ``N``. With INFINIGEN one block id costs:

* host: one page of every sparse layer (the pinned host pool,
  ``patches/cuda_kv_alloc.py``);
* device: one page of every dense layer, plus, per sparse layer, its
  partial keys, residual sums and counters (the runtime's device tier);

and the device also holds the staging buffers, sized from the start-up
options. The wrapper profiles as vLLM does (its result ``G`` is what the
GPU may give the KV cache), then :func:`plan_kv_blocks` picks the largest
``N`` whose host pages fit ``host_pool_gib`` (default: ``G``, what vLLM
would have given its own cache, capped by the host memory available) and
whose device share fits ``G`` after staging. Options that cannot fit stop
start-up with a message naming the option.

The arithmetic is tested on CPU; the wrapper itself runs only inside a GPU
worker (``docs/cuda.md``, "Sizing" and "What ran where").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from vllm_infinigen.method.partial_cache import RESIDUAL_DTYPE, partial_key_bytes
from vllm_infinigen.patches._version import require_vllm
from vllm_infinigen.patches.platform_config import infinigen_selected

PATCH_NAME = "cuda_kv_memory"
TOUCHES = "vllm.v1.worker.gpu_worker.Worker.determine_available_memory"
_MARK = "_vllm_infinigen_patched"

GIB = 1 << 30

#: Bytes per block of the runtime's per-block counters of a sparse layer:
#: the selection counter (int64) and the residual-sum fill (int32).
COUNTER_BYTES = 8
FILL_BYTES = 4


@dataclass(frozen=True)
class SparseLayerShape:
    """What one sparse layer keeps on the device per block."""

    num_kv_heads: int
    d_partial: int
    d_residual: int


def device_bytes_per_block(
    sparse: list[SparseLayerShape],
    block_size: int,
    partial_dtype: torch.dtype,
    dense_page_bytes: int,
) -> int:
    """Device bytes one block id costs: the dense layers' pages
    (``dense_page_bytes``, summed over dense layers) plus, per sparse layer,
    the partial keys ``[block_size, kv_heads, d_partial]`` stored as
    ``partial_dtype`` (``partial_key_bytes`` of ``method/partial_cache.py``:
    the packed bytes for 4-bit keys), the residual sums
    ``[kv_heads, d_residual]`` float32 with their fill, and the counter (what
    :meth:`~vllm_infinigen.engine.layer_state.SparseLayer.allocate` makes)."""
    total = dense_page_bytes
    for layer in sparse:
        per_token = partial_key_bytes(partial_dtype, layer.d_partial)
        total += block_size * layer.num_kv_heads * per_token
        if layer.d_residual:
            total += layer.num_kv_heads * layer.d_residual * RESIDUAL_DTYPE.itemsize
            total += FILL_BYTES
        total += COUNTER_BYTES
    return total


@dataclass(frozen=True)
class KVBlockPlan:
    """The block count INFINIGEN gives vLLM, and what it costs."""

    num_blocks: int
    host_pool_bytes: int
    """Pinned host memory: ``num_blocks`` pages of every sparse layer."""
    device_bytes: int
    """GPU memory: dense pages and the device tier for ``num_blocks``,
    plus staging."""
    limited_by: str
    """``host_pool_gib`` or ``gpu_memory``: which bound set ``num_blocks``."""
    available_memory: int
    """What the wrapper returns to vLLM (``num_blocks * vllm_block_bytes``)."""


def plan_kv_blocks(
    *,
    gpu_kv_bytes: int,
    vllm_block_bytes: int,
    host_block_bytes: int,
    device_block_bytes: int,
    staging_bytes: int,
    host_pool_bytes: int | None,
    host_available_bytes: int | None,
    blocks_needed: int,
) -> KVBlockPlan:
    """The most blocks that fit both tiers.

    Args:
        gpu_kv_bytes: what vLLM's profiling leaves for the KV cache (``G``).
        vllm_block_bytes: what vLLM divides that by (all layers' pages).
        host_block_bytes: host bytes per block (sparse layers' pages).
        device_block_bytes: device bytes per block
            (:func:`device_bytes_per_block`).
        staging_bytes: fixed device buffers (staging, prefill region).
        host_pool_bytes: the ``host_pool_gib`` option in bytes; ``None``:
            ``G``, capped by ``host_available_bytes``.
        host_available_bytes: host memory this worker may pin (``None``:
            unknown, not checked).
        blocks_needed: blocks one request of ``max_model_len`` needs (with
            vLLM's null block).

    Raises:
        ValueError: naming the option that cannot fit.
    """
    if min(vllm_block_bytes, host_block_bytes, device_block_bytes) <= 0:
        raise ValueError(
            "bytes per block must be positive, got "
            f"{vllm_block_bytes}, {host_block_bytes}, {device_block_bytes}"
        )
    if host_pool_bytes is None:
        host_pool_bytes = gpu_kv_bytes
        if host_available_bytes is not None:
            host_pool_bytes = min(host_pool_bytes, host_available_bytes)
    elif host_available_bytes is not None and host_pool_bytes > host_available_bytes:
        raise ValueError(
            f"infinigen option 'host_pool_gib' must be in (0, "
            f"{host_available_bytes / GIB:.2f}] on this worker (the host "
            f"memory it may pin), got {host_pool_bytes / GIB:.2f}"
        )
    room = gpu_kv_bytes - staging_bytes
    if room < device_block_bytes * blocks_needed:
        needed = staging_bytes + device_block_bytes * blocks_needed
        raise ValueError(
            f"INFINIGEN needs {needed / GIB:.2f} GiB of GPU memory (staging "
            f"{staging_bytes / GIB:.2f} GiB, dense "
            f"layers and partial keys for {blocks_needed} blocks) but vLLM left "
            f"{gpu_kv_bytes / GIB:.2f} GiB for the KV cache: raise "
            "--gpu-memory-utilization, or lower --max-num-seqs, "
            "--max-model-len or the infinigen option 'max_blocks'"
        )
    by_host = host_pool_bytes // host_block_bytes
    by_device = room // device_block_bytes
    num_blocks = min(by_host, by_device)
    limited_by = "host_pool_gib" if by_host <= by_device else "gpu_memory"
    if num_blocks < blocks_needed:
        raise ValueError(
            f"infinigen option 'host_pool_gib' must be at least "
            f"{blocks_needed * host_block_bytes / GIB:.3f} to hold {blocks_needed} "
            f"blocks (one request of --max-model-len), got "
            f"{host_pool_bytes / GIB:.3f}"
        )
    return KVBlockPlan(
        num_blocks=num_blocks,
        host_pool_bytes=num_blocks * host_block_bytes,
        device_bytes=staging_bytes + num_blocks * device_block_bytes,
        limited_by=limited_by,
        available_memory=num_blocks * vllm_block_bytes,
    )


def staging_blocks(
    selection: Any,
    *,
    exact: bool,
    max_num_seqs: int,
    max_model_len: int,
    block_size: int,
    sparse_min_tokens: int,
) -> int:
    """Staging slots the start-up options can need: two parity buffers of
    ``max_num_seqs`` rows at the widest selection, plus a prefill region of
    one ``max_model_len`` context (it grows past that on demand).

    Args:
        selection: the runtime's ``SelectionPolicy``.
        exact: every block is read (full budget or ``dense`` policy).
        sparse_min_tokens: steps with fewer context tokens read every block.
    """
    from vllm_infinigen.engine.cuda_runtime import staging_width
    from vllm_infinigen.method.selection import blocks_for

    longest = blocks_for(max_model_len, block_size)
    width = staging_width(selection, longest, whole=exact)
    if sparse_min_tokens > 0:  # whole steps below the threshold
        whole = blocks_for(min(sparse_min_tokens, max_model_len), block_size)
        width = max(width, whole)
    return 2 * max_num_seqs * width + longest


def _vllm_block_bytes(worker: Any, specs: dict[str, Any]) -> int:
    """Bytes per block vLLM's engine core divides the KV memory by (its own
    grouping of the worker's layer specs)."""
    from vllm.v1.core.kv_cache_utils import (
        _get_kv_cache_bytes_per_block,
        get_kv_cache_groups,
    )

    groups = get_kv_cache_groups(worker.vllm_config, dict(specs))
    layout = worker.cache_config.get_resolved_kv_cache_layout()
    return int(_get_kv_cache_bytes_per_block(groups, layout))


def _page_bytes(spec: Any) -> int:
    return int(getattr(spec, "page_size_padded", None) or spec.page_size_bytes)


def _host_available(worker: Any) -> int:
    """Host memory one worker may pin: what is free, shared by the node's
    tensor-parallel ranks."""
    import psutil

    ranks = max(1, int(worker.parallel_config.tensor_parallel_size))
    return int(psutil.virtual_memory().available) // ranks


def size_tiers(worker: Any, runtime: Any, gpu_kv_bytes: int) -> KVBlockPlan:
    """:func:`plan_kv_blocks` for a GPU worker and its runtime."""
    from vllm_infinigen.method.selection import blocks_for

    specs = worker.get_kv_cache_spec()
    sparse_names = {layer.info.name for layer in runtime.sparse.values()}
    host = sum(_page_bytes(s) for n, s in specs.items() if n in sparse_names)
    dense = sum(_page_bytes(s) for n, s in specs.items() if n not in sparse_names)
    kv_dtype = next(s.dtype for s in specs.values() if hasattr(s, "dtype"))
    block_size = runtime.block_size
    shapes = [
        SparseLayerShape(s.num_kv_heads, s.d_partial, s.d_residual)
        for s in runtime.speculators.values()
    ]
    device = device_bytes_per_block(
        shapes, block_size, runtime.partial_dtype(kv_dtype), dense
    )
    page = max(_page_bytes(specs[n]) for n in sparse_names)
    config = runtime.config
    slots = staging_blocks(
        runtime.selection,
        exact=config.is_exact or runtime.policy.reads_everything,
        max_num_seqs=worker.scheduler_config.max_num_seqs,
        max_model_len=worker.model_config.max_model_len,
        block_size=block_size,
        sparse_min_tokens=runtime.sparse_min_tokens,
    )
    pool = config.host_pool_gib
    return plan_kv_blocks(
        gpu_kv_bytes=gpu_kv_bytes,
        vllm_block_bytes=_vllm_block_bytes(worker, specs),
        host_block_bytes=host,
        device_block_bytes=device,
        staging_bytes=slots * page,
        host_pool_bytes=None if pool is None else int(pool * GIB),
        host_available_bytes=_host_available(worker),
        blocks_needed=blocks_for(worker.model_config.max_model_len, block_size) + 1,
    )


def apply() -> bool:
    """Wrap the method once per process. Returns True if newly applied."""
    require_vllm(PATCH_NAME, TOUCHES)
    from vllm.v1.worker.gpu_worker import Worker

    original = Worker.determine_available_memory
    if getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def determine_available_memory(self: Any) -> int:
        size = int(original(self))
        if not infinigen_selected(self.vllm_config):
            return size
        from vllm.logger import init_logger

        from vllm_infinigen.patches.model_load import RUNTIME_ATTR

        runtime = getattr(self.model_runner, RUNTIME_ATTR, None)
        if runtime is None or not runtime.sparse:
            return size
        plan = size_tiers(self, runtime, size)
        init_logger("vllm.infinigen.memory").info(
            "INFINIGEN KV blocks: %d (bound by %s): host pool %.2f GiB pinned, "
            "GPU %.2f GiB (dense layers, partial keys, staging) of the %.2f GiB "
            "vLLM left for the KV cache",
            plan.num_blocks,
            plan.limited_by,
            plan.host_pool_bytes / GIB,
            plan.device_bytes / GIB,
            size / GIB,
        )
        return plan.available_memory

    setattr(determine_available_memory, _MARK, True)
    Worker.determine_available_memory = determine_available_memory  # type: ignore[method-assign]
    return True
