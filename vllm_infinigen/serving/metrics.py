"""INFINIGEN's Prometheus metrics, built from the workers' counters.

The counters live in the workers (``engine/stats.py``), which hold the
runtime; vLLM's ``/metrics`` is served by the API server process. On each
scrape the endpoint plugin (``serving/api.py``) fetches every rank's
snapshot with one ``collective_rpc("infinigen_stats")`` (handled by the
engine between steps: nothing is added to the decode step) and
:class:`InfiniGenCollector` turns the snapshots into metric families,
appended to vLLM's own exposition. Names and labels follow vLLM's: a
``vllm:`` prefix, ``model_name`` and ``engine`` labels, counters ending in
``_total``; ``rank`` tells tensor-parallel workers apart.

Every value is cumulative on the worker since its start (or
``infinigen_reset_stats``), so any number of scrapers see the same series.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

PREFIX = "vllm:infinigen_"

#: (metric, help, snapshot total key) of the plain counters.
COUNTERS: tuple[tuple[str, str, str], ...] = (
    (
        "blocks_read",
        "KV blocks the decode attention of INFINIGEN's sparse layers read "
        "(every block on steps that read whole).",
        "blocks_selected",
    ),
    (
        "blocks_available",
        "KV blocks the decode requests of the sparse layers held (what dense "
        "attention would read); read share = blocks_read / blocks_available.",
        "blocks_total",
    ),
    (
        "kv_read_bytes",
        "Bytes of KV the sparse layers' decode attention read.",
        "kv_bytes_read",
    ),
    (
        "swapped_bytes",
        "Bytes copied from the host tier into staging buffers (0 when the "
        "kernel reads the host tier in place).",
        "bytes_swapped",
    ),
)

#: (metric, help, snapshot ``steps`` key) of the per-step histograms.
HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    (
        "step_selection_seconds",
        "Time one sparse decode step spent choosing blocks (speculation, "
        "scoring, selection and read planning, all sparse layers).",
        "selection_s",
    ),
    (
        "step_swap_wait_seconds",
        "Time one staged decode step's attention waited for its swap-in.",
        "swap_wait_s",
    ),
    (
        "selection_recall",
        "Sampled selection recall: the share of one decode request's exact "
        "attention mass (one sparse layer) held by the blocks read.",
        "recall",
    ),
)

#: (metric, help, snapshot key) of the gauges.
GAUGES: tuple[tuple[str, str, str], ...] = (
    (
        "host_tier_bytes",
        "Bytes of the host tier (vLLM's KV cache of the sparse layers).",
        "host_kv_bytes",
    ),
    (
        "device_tier_bytes",
        "Bytes of the device tier: partial keys, policy metadata, staging.",
        "device_tier_bytes",
    ),
    ("budget_fraction", "The selection budget in effect (share of blocks).", "budget"),
    (
        "sparse_min_tokens",
        "Decode steps with fewer context tokens read every block (the option, "
        "or what the start-up cost probe gave when it is unset; +Inf: sparse "
        "decode never pays on this machine).",
        "sparse_min_tokens",
    ),
)

#: (path label, ``step_costs`` key) of the measured per-token decode costs.
COST_PATHS: tuple[tuple[str, str], ...] = (
    ("dense", "dense_us_per_token"),
    ("choose", "choose_us_per_token"),
    ("read", "read_us_per_token"),
)


def _histogram(
    name: str, doc: str, labels: list[str], rows: Sequence[tuple[list[str], Any]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, hist in rows:
        running = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip(
            [*hist["bounds"], float("inf")], hist["counts"], strict=True
        ):
            running += count
            buckets.append((floatToGoString(bound), running))
        family.add_metric(values, buckets, hist["sum"])
    return family


def metric_families(
    snapshots: Sequence[Mapping[str, Any]], model_name: str, engine: str = "0"
) -> list[Metric]:
    """Metric families of every rank's ``infinigen_stats`` snapshot (ranks
    without INFINIGEN, whose snapshot is empty, are skipped)."""
    labels = ["model_name", "engine", "rank"]
    ranks = [
        ([model_name, engine, str(rank)], snap)
        for rank, snap in enumerate(snapshots)
        if snap
    ]
    if not ranks:
        return []
    out: list[Metric] = []
    for name, doc, key in COUNTERS:
        family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
        for values, snap in ranks:
            family.add_metric(values, float(snap["total"].get(key, 0)))
        out.append(family)
    path_labels = [*labels, "path"]
    requests = CounterMetricFamily(
        PREFIX + "decode_requests",
        "Decode request-steps of the sparse layers, by path: 'sparse' chose "
        "blocks, 'whole' read every block (short contexts, or a budget that "
        "covers them).",
        labels=path_labels,
    )
    steps = CounterMetricFamily(
        PREFIX + "decode_steps",
        "Decode steps, by path (see decode_requests).",
        labels=path_labels,
    )
    for values, snap in ranks:
        counts = snap["steps"]
        for path in ("sparse", "whole"):
            requests.add_metric([*values, path], float(counts[f"{path}_requests"]))
            steps.add_metric([*values, path], float(counts[f"{path}_steps"]))
    out += [requests, steps]
    for name, doc, key in HISTOGRAMS:
        rows = [(values, snap["steps"][key]) for values, snap in ranks]
        out.append(_histogram(PREFIX + name, doc, labels, rows))
    last = GaugeMetricFamily(
        PREFIX + "selection_recall_last",
        "The most recent sampled selection recall (NaN before the first sample).",
        labels=labels,
    )
    for values, snap in ranks:
        value = snap["steps"]["last_recall"]
        last.add_metric(values, float("nan") if value is None else float(value))
    out.append(last)
    for name, doc, key in GAUGES:
        gauge = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
        for values, snap in ranks:
            gauge.add_metric(values, float(snap.get(key, 0)))
        out.append(gauge)
    measured = [
        (values, snap["step_costs"]) for values, snap in ranks if snap.get("step_costs")
    ]
    if measured:
        per_token = GaugeMetricFamily(
            PREFIX + "decode_cost_seconds_per_token",
            "Decode attention cost per context token and sparse layer, measured "
            "at start-up on this machine: 'dense' vLLM's kernel over every "
            "block, 'choose' scoring and selecting blocks, 'read' the kernel "
            "over the selected blocks at the measured budget.",
            labels=path_labels,
        )
        fixed = GaugeMetricFamily(
            PREFIX + "decode_cost_choose_fixed_seconds",
            "Fixed cost of choosing blocks per sparse layer and step, measured "
            "at start-up on this machine.",
            labels=labels,
        )
        for values, costs in measured:
            for path, key in COST_PATHS:
                per_token.add_metric([*values, path], costs[key] * 1e-6)
            fixed.add_metric(values, costs["choose_fixed_ms"] * 1e-3)
        out += [per_token, fixed]
    return out


class InfiniGenCollector(Collector):
    """Yields the metric families of the last fetched snapshots."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.snapshots: Sequence[Mapping[str, Any]] = []

    def collect(self) -> Iterator[Metric]:
        yield from metric_families(self.snapshots, self.model_name)


def new_registry(collector: InfiniGenCollector) -> CollectorRegistry:
    """A registry holding only INFINIGEN's collector (appended to vLLM's
    exposition, whichever registry vLLM serves)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
