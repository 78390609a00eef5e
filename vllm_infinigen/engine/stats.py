"""Per-layer counters of the INFINIGEN decode path (observability).

Updated by the runtime on every decode step of every sparse layer, read by
benchmarks through :func:`vllm_infinigen.engine.runtime.stats_snapshot` (a
``collective_rpc`` target) and logged at debug level.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerStats:
    """Counters of one sparse layer since start-up (or the last reset)."""

    steps: int = 0
    """Decode steps in which this layer ran sparse attention."""
    decode_requests: int = 0
    """Decode requests summed over those steps."""
    blocks_total: int = 0
    """Blocks dense attention would have read (sum of requests' blocks)."""
    blocks_selected: int = 0
    """Blocks speculation selected (what was swapped in)."""
    bytes_swapped: int = 0
    """Bytes copied host -> staging for this layer (selected blocks)."""
    prefill_blocks_read: int = 0
    """Blocks read whole by prefill (exact, no selection)."""
    speculation_s: float = 0.0
    """Time in speculation and selection (scores, choice, plan)."""
    swap_s: float = 0.0
    """Time in the host -> staging copies (on the thread or inline)."""
    wait_s: float = 0.0
    """Time attention waited for its swap-in to finish."""
    attention_s: float = 0.0
    """Time in the sparse decode attention kernel."""

    @property
    def selection_fraction(self) -> float:
        return self.blocks_selected / self.blocks_total if self.blocks_total else 0.0


@dataclass
class EngineStats:
    """All layers' counters plus the bytes one block of one layer holds."""

    block_bytes: int = 0
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def layer(self, index: int) -> LayerStats:
        stats = self.layers.get(index)
        if stats is None:
            stats = self.layers[index] = LayerStats()
        return stats

    def reset(self) -> None:
        self.layers.clear()

    def snapshot(self) -> dict[str, object]:
        """JSON-ready copy: per-layer counters and totals."""
        layers = {str(i): asdict(s) for i, s in sorted(self.layers.items())}
        totals = LayerStats()
        for s in self.layers.values():
            for name, value in asdict(s).items():
                setattr(totals, name, getattr(totals, name) + value)
        total = asdict(totals)
        total["selection_fraction"] = totals.selection_fraction
        return {"block_bytes": self.block_bytes, "layers": layers, "total": total}
