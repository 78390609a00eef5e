"""Put the sparse layers' KV cache in INFINIGEN's pinned host pool on CUDA.

Touches: ``allocate_kv_cache`` as imported by vLLM 0.32's two GPU model
runners, ``vllm.v1.worker.gpu_model_runner`` (V1,
``GPUModelRunner.initialize_kv_cache_tensors``) and
``vllm.v1.worker.gpu.attn_utils`` (V2, ``init_kv_cache``); both call it
with ``(kv_cache_config, device, layout, kernel_block_sizes)``. Each module
name is rebound to one wrapper. When INFINIGEN is selected and the model
has sparse layers (their attention modules carry the runtime's state, set
after model load), the wrapper places:

* every sparse layer's paged cache in one exact-size
  :class:`~vllm_infinigen.engine.cuda_pool.PinnedHostPool`, viewed from the
  GPU through unified virtual addressing (vLLM's
  ``get_accelerator_view_from_cpu_tensor``), zeroed like vLLM's own;
* every other layer's in one GPU buffer (``torch.zeros``, inside whatever
  memory-pool context vLLM's caller opened);

each as vLLM's own view (``create_kv_cache_views``) with the strides of
vLLM's layout, which must be layer-compact (the INFINIGEN backend declares
``LBNHC``): a layer's blocks are one region, so a tier holds only its own
layers. Cache groups that vLLM lets alias the same bytes get separate
regions here (a block id then has one page per layer in its layer's tier).
Everything else is delegated unchanged.

The split (:func:`split_tiers`) and the views (:func:`place_views`) run on
CPU tensors in the tests; the pinned pool and the UVA view need CUDA
(``docs/cuda.md``, "What ran where").
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch

from vllm_infinigen.patches._version import require_vllm
from vllm_infinigen.patches.platform_config import infinigen_selected

PATCH_NAME = "cuda_kv_alloc"
TOUCHES = (
    "allocate_kv_cache in vllm.v1.worker.gpu_model_runner (V1) and "
    "vllm.v1.worker.gpu.attn_utils (V2)"
)
#: The modules whose ``allocate_kv_cache`` name is rebound.
RUNNER_MODULES: tuple[str, ...] = (
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.worker.gpu.attn_utils",
)
_MARK = "_vllm_infinigen_patched"

HOST, DEVICE = "host", "device"


@dataclass(frozen=True)
class TierRegion:
    """Consecutive layers of one of vLLM's ``KVCacheTensor``\\ s that live in
    one tier, laid out from ``tensor.offset`` of that tier's buffer."""

    tier: str
    tensor: Any
    """A ``KVCacheTensor`` of these layers, offset into the tier's buffer."""
    spec: Any
    """Their ``KVCacheSpec``."""
    num_blocks: int
    kernel_block_size: int | None


@dataclass(frozen=True)
class TierLayout:
    """Where every layer's KV cache goes: regions and each tier's bytes."""

    regions: tuple[TierRegion, ...]
    host_bytes: int
    device_bytes: int

    def layers(self, tier: str) -> list[str]:
        return [
            name for r in self.regions if r.tier == tier for name in r.tensor.layers
        ]


def split_tiers(
    kv_cache_config: Any,
    layout: Any,
    sparse_layers: Collection[str],
    kernel_block_sizes: list[int] | None = None,
) -> TierLayout:
    """Split vLLM's KV cache placement into a host tier (``sparse_layers``)
    and a device tier (every other layer), keeping vLLM's per-layer strides.

    Raises:
        ValueError: a layout that is not layer-compact, a cache without
            per-layer views, or a sparse layer whose kernel blocks split
            vLLM's blocks (the runtime indexes both by one block id).
    """
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    if not layout.is_layer_compact:
        raise ValueError(
            f"--attention-backend infinigen needs a layer-compact KV cache "
            f"layout (LBNHC), got {layout.name}; unset VLLM_KV_CACHE_LAYOUT"
        )
    offsets = {HOST: 0, DEVICE: 0}
    regions = []
    groups = kv_cache_config.kv_cache_groups
    for tensor in kv_cache_config.kv_cache_tensors:
        group_id = next(
            i for i, g in enumerate(groups) if tensor.layers[0] in g.layer_names
        )
        spec = groups[group_id].kv_cache_spec
        if isinstance(spec, UniformTypeKVCacheSpecs):
            spec = spec.kv_cache_specs[tensor.layers[0]]
        if not spec.has_layer_views:
            raise ValueError(
                "--attention-backend infinigen on CUDA serves attention-only "
                f"models; layers {tensor.layers} keep a KV state without "
                "per-layer views"
            )
        kernel = None
        if kernel_block_sizes is not None and group_id < len(kernel_block_sizes):
            kernel = kernel_block_sizes[group_id]
        for tier in (HOST, DEVICE):
            names = [n for n in tensor.layers if (n in sparse_layers) == (tier == HOST)]
            if not names:
                continue
            if tier == HOST and kernel not in (None, spec.block_size):
                raise ValueError(
                    f"--block-size {spec.block_size} splits into "
                    f"{kernel}-token FlashAttention blocks; INFINIGEN needs "
                    f"one block per KV block: use --block-size {kernel}"
                )
            sub = dataclasses.replace(tensor, layers=names, offset=offsets[tier])
            regions.append(
                TierRegion(
                    tier, sub, spec, kv_cache_config.num_blocks_of(tensor), kernel
                )
            )
            offsets[tier] += len(names) * tensor.layer_stride
    return TierLayout(tuple(regions), offsets[HOST], offsets[DEVICE])


def place_views(
    tiers: TierLayout,
    layout: Any,
    host_raw: torch.Tensor,
    device_raw: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """vLLM's per-layer views (``create_kv_cache_views``) over the two tier
    buffers (flat byte tensors of ``tiers.host_bytes`` and
    ``tiers.device_bytes``)."""
    from vllm.v1.kv_cache_interface import create_kv_cache_views

    views: dict[str, torch.Tensor] = {}
    for region in tiers.regions:
        raw = host_raw if region.tier == HOST else device_raw
        views.update(
            zip(
                region.tensor.layers,
                create_kv_cache_views(
                    raw,
                    region.spec,
                    region.num_blocks,
                    layout,
                    region.tensor,
                    kernel_block_size=region.kernel_block_size,
                ),
                strict=True,
            )
        )
    return views


def _sparse_states(vllm_config: Any) -> dict[str, Any]:
    """Layer name -> the runtime's state, for the sparse layers."""
    from vllm_infinigen.engine.layer_state import LAYER_ATTR

    forward_context = vllm_config.compilation_config.static_forward_context
    return {
        name: state
        for name, module in forward_context.items()
        if (state := getattr(module, LAYER_ATTR, None)) is not None
    }


def _pinned_pool(nbytes: int, device: torch.device) -> Any:
    """An exact-size pinned host pool with its UVA view (CUDA only)."""
    from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

    from vllm_infinigen.engine.cuda_pool import PinnedHostPool

    pool = PinnedHostPool(nbytes, device, view_fn=get_accelerator_view_from_cpu_tensor)
    pool.host.zero_()  # as vLLM zeroes its own KV cache
    return pool


def _selected_states(kv_cache_config: Any, device: torch.device) -> dict[str, Any]:
    """The sparse layers' states when this allocation is INFINIGEN's to
    place (INFINIGEN selected, a CUDA device, sparse layers set up); else
    empty."""
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    if (
        vllm_config is None
        or not infinigen_selected(vllm_config)
        or torch.device(device).type != "cuda"
        or not kv_cache_config.kv_cache_tensors
    ):
        return {}
    return _sparse_states(vllm_config)


def allocate_tiers(
    kv_cache_config: Any,
    device: torch.device,
    layout: Any,
    kernel_block_sizes: list[int] | None,
    states: dict[str, Any],
    make_pool: Callable[[int, torch.device], Any] = _pinned_pool,
) -> dict[str, torch.Tensor]:
    """Place the sparse layers (``states``: name -> runtime state) in a host
    pool from ``make_pool`` and the others in a zeroed ``device`` buffer;
    the runtime keeps the pool."""
    from vllm.logger import init_logger

    tiers = split_tiers(kv_cache_config, layout, states, kernel_block_sizes)
    pool = make_pool(tiers.host_bytes, torch.device(device))
    next(iter(states.values())).runtime.swap.adopt_pool(pool)
    device_raw = torch.zeros(
        max(tiers.device_bytes, 1), dtype=torch.int8, device=device
    )
    views = place_views(tiers, layout, pool.device_view, device_raw)
    gib = float(1 << 30)
    init_logger("vllm.infinigen.memory").info(
        "INFINIGEN KV cache: %d blocks; %d sparse layers in a %.2f GiB pinned "
        "host pool (registered in %.1f s), %d dense layers in %.2f GiB of GPU "
        "memory",
        kv_cache_config.num_blocks,
        len(tiers.layers(HOST)),
        tiers.host_bytes / gib,
        pool.register_s,
        len(tiers.layers(DEVICE)),
        tiers.device_bytes / gib,
    )
    return views


def apply() -> bool:
    """Rebind ``allocate_kv_cache`` in both runner modules once per process.
    Returns True if newly applied."""
    require_vllm(PATCH_NAME, TOUCHES)
    from vllm.v1.worker import utils

    original = utils.allocate_kv_cache
    applied = False
    for name in RUNNER_MODULES:
        module: Any = importlib.import_module(name)
        current = module.allocate_kv_cache
        if getattr(current, _MARK, False):
            continue
        if current is not original:
            raise RuntimeError(
                f"vllm-infinigen patch {PATCH_NAME}: {name}.allocate_kv_cache is "
                f"not vLLM's vllm.v1.worker.utils.allocate_kv_cache ({current!r}); "
                "another plugin rebound it"
            )
        module.allocate_kv_cache = _wrap(original)
        applied = True
    return applied


def _wrap(original: Callable[..., dict[str, torch.Tensor]]) -> Any:
    @functools.wraps(original)
    def allocate_kv_cache(
        kv_cache_config: Any,
        device: torch.device,
        layout: Any,
        kernel_block_sizes: list[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        states = _selected_states(kv_cache_config, device)
        if not states:
            return original(kv_cache_config, device, layout, kernel_block_sizes)
        return allocate_tiers(
            kv_cache_config, device, layout, kernel_block_sizes, states
        )

    setattr(allocate_kv_cache, _MARK, True)
    return allocate_kv_cache
