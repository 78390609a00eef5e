"""INFINIGEN's metric families and the ``/metrics`` appender, without a server.

The snapshots come from a real runtime on small tensors (the engine tests'
``World``); the appender wraps ``prometheus_client``'s own ASGI metrics app,
as vLLM mounts it, and its output is read back with Prometheus' text and
OpenMetrics parsers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, make_asgi_app
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tests.engine.test_runtime import World
from vllm_infinigen.serving.api import MetricsAppender, _Server
from vllm_infinigen.serving.metrics import metric_families


def _snapshot() -> dict[str, Any]:
    world = World(
        [40, 65], budget=0.4, min_blocks=0, sparse_min_tokens=0, recall_sample_rate=0.5
    )
    runtime = world.runtime
    import torch

    query = torch.randn(2, 4, 8)
    for _ in range(4):
        for index in (1, 2):
            layer = world.layer(index)
            world.prepare(index)
            read = runtime.take(layer)
            if runtime.recall_due(layer):
                assert read is not None
                runtime.sample_recall(layer, query, world.table, world.seq_lens, read)
            runtime.layer_done(layer)
    return runtime.stats_snapshot()


@pytest.fixture(scope="module")
def snapshot() -> dict[str, Any]:
    return _snapshot()


def _samples(families: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families
        for s in family.samples
    }


def test_families_carry_the_snapshot(snapshot: dict[str, Any]) -> None:
    families = metric_families([snapshot, {}], "m")  # rank 1 has no INFINIGEN
    labels = (("engine", "0"), ("model_name", "m"), ("rank", "0"))
    samples = _samples(families)
    total = snapshot["total"]
    assert (
        samples[("vllm:infinigen_blocks_read_total", labels)]
        == total["blocks_selected"]
    )
    assert (
        samples[("vllm:infinigen_blocks_available_total", labels)]
        == total["blocks_total"]
    )
    assert not any(dict(k[1]).get("rank") == "1" for k in samples)
    sparse = (*labels, ("path", "sparse"))
    sparse = tuple(sorted(sparse))
    assert samples[("vllm:infinigen_decode_requests_total", sparse)] == 8
    recall = snapshot["steps"]["recall"]
    assert (
        samples[("vllm:infinigen_selection_recall_count", labels)]
        == recall["count"]
        == 2
    )
    inf = tuple(sorted((*labels, ("le", "+Inf"))))
    assert samples[("vllm:infinigen_selection_recall_bucket", inf)] == 2
    assert 0 <= samples[("vllm:infinigen_selection_recall_last", labels)] <= 1
    assert metric_families([{}], "m") == []


class _Fixed(_Server):
    def __init__(self, snapshots: list[dict[str, Any]]) -> None:
        super().__init__()
        self.fixed = snapshots
        self.collector.model_name = "m"

    async def snapshots(self) -> list[dict[str, Any]]:
        return self.fixed


def _get(app: Any, headers: dict[str, str]) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t"
        ) as client:
            return await client.get("/metrics", headers=headers)

    return asyncio.run(run())


@pytest.mark.parametrize("openmetrics", [False, True])
def test_appender_completes_the_exposition(
    snapshot: dict[str, Any], openmetrics: bool
) -> None:
    registry = CollectorRegistry()
    Counter("vllm:own", "one of vLLM's own", registry=registry).inc(3)
    inner = make_asgi_app(registry=registry)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope = {**scope, "path": "/"} if scope["type"] == "http" else scope
        await inner(scope, receive, send)

    wrapped = MetricsAppender(app, _Fixed([snapshot]))
    accept = "application/openmetrics-text; version=1.0.0" if openmetrics else "*/*"
    # a scraper asking for gzip gets plain text it can still parse
    reply = _get(wrapped, {"Accept": accept, "Accept-Encoding": "gzip"})
    assert reply.status_code == 200
    assert "content-encoding" not in reply.headers
    text = reply.text
    assert int(reply.headers["content-length"]) == len(reply.content)
    parse = parse_openmetrics if openmetrics else parse_text
    names = {f.name for f in parse(text)}
    assert "vllm:own" in names
    assert "vllm:infinigen_blocks_read" in names
    assert "vllm:infinigen_selection_recall" in names
    if openmetrics:
        assert text.endswith("# EOF\n") and text.count("# EOF") == 1


def test_dashboard_queries_name_exported_series(snapshot: dict[str, Any]) -> None:
    import json
    import re

    from prometheus_client import generate_latest

    from tests.conftest import REPO_ROOT
    from vllm_infinigen.serving.metrics import InfiniGenCollector, new_registry

    collector = InfiniGenCollector("m")
    collector.snapshots = [snapshot]
    exported = {
        s.name
        for f in parse_text(generate_latest(new_registry(collector)).decode())
        for s in f.samples
    }
    path = REPO_ROOT / "deploy" / "grafana" / "infinigen-dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"vllm:infinigen_[a-z_]+", e)}
    assert len(used) >= 10
    assert used <= exported, used - exported
