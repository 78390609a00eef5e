"""What both INFINIGEN attention backends do around vLLM's kernels.

Each platform's backend (``engine/cpu_backend.py``, ``engine/cuda_backend.py``)
computes one step's metadata per KV cache group, which vLLM's forward
context hands to every layer. :func:`step_metadata` finds a layer's there
(the backends' KV writes, the one-layer-ahead hook on CUDA), and
:func:`after_kv_write` hands each KV write of a sparse layer to its runtime,
which stores the partial keys and every tracked policy's metadata.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available

from vllm_infinigen.engine.layer_state import LAYER_ATTR, SparseLayer
from vllm_infinigen.engine.runtime import KVWrite


class StepMetadata(Protocol):
    """An INFINIGEN backend's per-step metadata, as far as the hooks read it."""

    kv_write: KVWrite | None
    """Where this step's new tokens go (the same for every layer)."""


MetadataT = TypeVar("MetadataT", bound=StepMetadata)


def step_metadata(layer_name: str, kind: type[MetadataT]) -> MetadataT | None:
    """This step's metadata of a layer from vLLM's forward context: ``None``
    outside a step, or when the layer's is not a ``kind`` (another
    backend's layer)."""
    if not is_forward_context_available():
        return None
    all_metadata = get_forward_context().attn_metadata
    if not isinstance(all_metadata, dict):
        return None
    meta = all_metadata.get(layer_name)
    return meta if isinstance(meta, kind) else None


def after_kv_write(
    layer: torch.nn.Module,
    key: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kind: type[StepMetadata],
) -> None:
    """Hand a KV write vLLM just made to a sparse layer's runtime (nothing
    for a dense layer), with the step's write plan when the step's metadata
    (a ``kind``) holds one.

    Args:
        key: ``[tokens, num_kv_heads, head_dim]`` the keys written.
        kv_cache: the layer's paged cache (host tier).
        slot_mapping: ``[tokens]`` their slots (``-1`` for padding).
    """
    state: SparseLayer | None = getattr(layer, LAYER_ATTR, None)
    if state is None:
        return
    meta = step_metadata(state.info.name, kind)
    write = None if meta is None else meta.kv_write
    state.runtime.on_kv_write(state, key, kv_cache, slot_mapping, write)
