"""Leave room for INFINIGEN's device tier when vLLM sizes the CPU KV cache.

Touches: ``vllm.v1.worker.cpu_worker.CPUWorker.determine_available_memory``
(vLLM 0.32). With no explicit size (no ``--kv-cache-memory-bytes``,
``VLLM_CPU_KVCACHE_SPACE`` or ``host_pool_gib``) vLLM gives the KV cache all
the memory the worker may use (``--gpu-memory-utilization`` of the node)
minus what the process already holds. INFINIGEN then adds, per sparse layer,
a partial-key cache indexed by the same block ids and two staging buffers;
without room for them the first long request pushes the worker past the
node's memory. The wrapper shrinks the automatic size so that the host tier,
the partial keys and the staging buffers together fit in what vLLM would
have given the KV cache alone. An explicit size is the user's host-tier size
and is kept; the device tier comes on top of it (the start-up log says how
much).
"""

from __future__ import annotations

import functools
from typing import Any

from vllm_infinigen.method.partial_cache import RESIDUAL_DTYPE, partial_key_bytes
from vllm_infinigen.patches._version import require_vllm
from vllm_infinigen.patches.platform_config import infinigen_selected

PATCH_NAME = "kv_memory"
TOUCHES = "vllm.v1.worker.cpu_worker.CPUWorker.determine_available_memory"
_MARK = "_vllm_infinigen_patched"


def device_tier_share(
    num_layers: int,
    head_dim: int,
    kv_itemsize: int,
    partial_bytes: list[int],
    staging: bool = True,
    residual_dims: list[int] | None = None,
    block_size: int = 1,
) -> float:
    """Device-tier bytes per byte of host-tier KV cache.

    Per block, the host tier holds keys and values of every attention layer
    (``num_layers * 2 * head_dim`` numbers of ``kv_itemsize`` bytes per token
    and KV head); the partial key cache holds ``partial_bytes`` per token and
    KV head for each sparse layer
    (:func:`~vllm_infinigen.method.partial_cache.partial_key_bytes`: its
    channels at its storage type, or their 4-bit packing). The residual sums
    hold ``d_residual`` float32 numbers per *block* and KV head for each
    sparse layer (``residual_dims``), ``1 / block_size`` of that per token. A
    staging buffer holds one layer's blocks of the running requests (their
    selected blocks, and the whole context of prefilling ones), so each of
    the two is reserved one layer's share of the cache: ``2 / num_layers``;
    the in-place placement (``staging=False``) has none. This is an
    estimate, not a bound: a prefix block shared by several requests is
    staged once per request, so heavy prefix sharing can stage more.

    Args:
        num_layers: attention layers of the model (sparse and dense).
        head_dim: the layers' head size.
        kv_itemsize: bytes of one number of the host KV cache.
        partial_bytes: bytes per token and KV head of every sparse layer's
            partial keys.
    """
    if num_layers <= 0 or head_dim <= 0 or kv_itemsize <= 0:
        raise ValueError("num_layers, head_dim and kv_itemsize must be positive")
    host = num_layers * 2 * head_dim * kv_itemsize  # bytes per token and KV head
    partial = sum(partial_bytes) / host
    residual = sum(residual_dims or []) * RESIDUAL_DTYPE.itemsize
    partial += residual / (block_size * host)
    buffers = 2 / num_layers if partial_bytes and staging else 0.0
    return partial + buffers


def host_tier_bytes(auto_bytes: int, share: float) -> int:
    """The host-tier size that leaves room for a device tier of ``share``."""
    return int(auto_bytes / (1.0 + share))


def apply() -> bool:
    """Wrap the method once per process. Returns True if newly applied."""
    require_vllm(PATCH_NAME, TOUCHES)
    from vllm.v1.worker.cpu_worker import CPUWorker

    original = CPUWorker.determine_available_memory
    if getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def determine_available_memory(self: Any) -> int:
        explicit = self.cache_config.kv_cache_memory_bytes is not None
        size = int(original(self))
        if not infinigen_selected(self.vllm_config):
            return size
        from vllm.logger import init_logger

        from vllm_infinigen.patches.model_load import RUNTIME_ATTR

        logger = init_logger("vllm.infinigen.memory")
        runtime = getattr(self.model_runner, RUNTIME_ATTR, None)
        if runtime is None or not runtime.speculators:
            return size
        first = next(iter(runtime.speculators.values()))
        kv_dtype = self.model_runner.kv_cache_dtype
        partial_dtype = runtime.partial_dtype(kv_dtype)
        share = device_tier_share(
            len(runtime.layers),
            first.head_dim,
            kv_dtype.itemsize,
            [
                partial_key_bytes(partial_dtype, s.d_partial)
                for s in runtime.speculators.values()
            ],
            staging=not runtime.in_place,
            residual_dims=[s.d_residual for s in runtime.speculators.values()],
            block_size=self.cache_config.block_size or 1,
        )
        gib = float(1 << 30)
        if explicit:
            logger.info(
                "INFINIGEN host tier %.2f GiB (explicit); device tier up to "
                "%.2f GiB on top (partial keys, residual sums and staging)",
                size / gib,
                size * share / gib,
            )
            return size
        host = host_tier_bytes(size, share)
        logger.info(
            "INFINIGEN host tier %.2f GiB of vLLM's automatic %.2f GiB KV cache "
            "size: the rest (up to %.2f GiB) is left for partial keys, residual sums "
            "and staging",
            host / gib,
            size / gib,
            host * share / gib,
        )
        return host

    setattr(determine_available_memory, _MARK, True)
    CPUWorker.determine_available_memory = determine_available_memory  # type: ignore[method-assign]
    return True
