"""Per-layer counters of the INFINIGEN decode path (observability).

Updated by the runtime on every decode step of every sparse layer, read
through the worker extension's ``infinigen_stats`` (a ``collective_rpc``
target) and logged at debug level. Block counts are kept by each layer (as
device tensors, :attr:`~.layer_state.SparseLayer.tallies`, and host ints for
dense-path steps) and read here.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
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


#: Bucket upper bounds (seconds) of the per-step time histograms: selection
#: costs tens of microseconds per layer on short contexts and milliseconds per
#: layer at 16K x 4 (24 layers: up to a quarter of a second per step).
SECONDS_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

#: Bucket upper bounds of the sampled selection recall (a share in [0, 1]).
RECALL_BUCKETS: tuple[float, ...] = (
    0.5,
    0.6,
    0.7,
    0.8,
    0.85,
    0.9,
    0.95,
    0.98,
    0.99,
    1.0,
)


@dataclass
class Histogram:
    """A cumulative histogram kept on the worker: every reader (the metrics
    exporter, a benchmark) sees all observations since start-up."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    """Observations per bucket (``len(bounds) + 1``: the last is ``+Inf``)."""
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "bounds": list(self.bounds),
            "counts": list(self.counts),
            "sum": self.total,
            "count": self.count,
        }


@dataclass
class StepStats:
    """Worker-wide counters per decode step (every sparse layer together)."""

    sparse_steps: int = 0
    """Decode steps that chose blocks."""
    whole_steps: int = 0
    """Decode steps that read every block (short, or the budget covers all)."""
    sparse_requests: int = 0
    """Decode requests summed over sparse steps (request-steps)."""
    whole_requests: int = 0
    """Decode requests summed over read-whole steps."""
    selection_s: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    """Per sparse step: time choosing blocks, all sparse layers."""
    swap_wait_s: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    """Per staged step: time attention waited for staging copies."""
    recall: Histogram = field(default_factory=lambda: Histogram(RECALL_BUCKETS))
    """Sampled selection recall: the exact attention mass share held by the
    selected blocks, for one layer and request of a sampled step."""
    last_recall: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("selection_s", "swap_wait_s", "recall"):
            out[name] = getattr(self, name).to_dict()
        return out


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
