"""Per-layer counters of the INFINIGEN decode path (observability).

Updated by the runtime on every decode step of every sparse layer, read
through the worker extension's ``infinigen_stats`` (a ``collective_rpc``
target) and logged at debug level. Block counts are kept by each layer (as
device tensors, :attr:`~.layer_state.SparseLayer.tallies`, and host ints for
dense-path steps) and read here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_infinigen.engine.layer_state import SparseLayer


@dataclass
class LayerStats:
    """Host-side counters of one sparse layer since start-up (or reset)."""

    steps: int = 0
    """Decode steps this layer ran (sparse or read whole)."""
    dense_steps: int = 0
    """Of those, steps where every request fitted its budget (or the policy
    reads everything): the engine took vLLM's dense path, no selection."""
    prefill_blocks_read: int = 0
    """Blocks copied whole for prefill rows of mixed batches (staging)."""
    speculation_s: float = 0.0
    """Time choosing blocks (scores, selection, plan)."""
    swap_s: float = 0.0
    """Time in host -> staging copies (staging placement only)."""
    wait_s: float = 0.0
    """Time attention waited for its staging copy."""
    attention_s: float = 0.0
    """Time in the sparse decode attention kernel."""


def layer_snapshot(layer: SparseLayer, staging: bool) -> dict[str, Any]:
    """One layer's counters, JSON-ready (reads its tallies: a host sync)."""
    total, selected, requests = layer.counts()
    out: dict[str, Any] = asdict(layer.stats)
    block_bytes = layer.block_bytes
    out.update(
        decode_requests=requests,
        blocks_total=total,
        blocks_selected=selected,
        kv_bytes_read=selected * block_bytes,
        bytes_swapped=selected * block_bytes if staging else 0,
    )
    return out


def snapshot(layers: Iterable[SparseLayer], staging: bool) -> dict[str, Any]:
    """Per-layer counters and totals of every sparse layer."""
    per_layer = {str(layer.index): layer_snapshot(layer, staging) for layer in layers}
    total: dict[str, Any] = {}
    for values in per_layer.values():
        for name, value in values.items():
            total[name] = total.get(name, 0) + value
    blocks = total.get("blocks_total", 0)
    total["selection_fraction"] = (
        total.get("blocks_selected", 0) / blocks if blocks else 0.0
    )
    return {"layers": per_layer, "total": total}
