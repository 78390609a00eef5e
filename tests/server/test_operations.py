"""Operating INFINIGEN on `vllm serve`: metrics, the stats and options API.

One server with the endpoint plugin allowlisted (``VLLM_PLUGINS``), HTTP
reconfiguration on and the recall sampled on a quarter of the sparse steps.
Requests go through the ``openai`` client; ``/metrics`` is parsed with
``prometheus_client``'s own text parser.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.serve_process import (
    PLUGINS_ENV,
    Server,
    infinigen_args,
    running_server,
)

pytestmark = pytest.mark.slow
SERVED_NAME = "qwen-ops"
BUDGET = 0.3
SPARSE_LAYERS = 23  # Qwen2.5-0.5B: 24 layers, layer 0 dense


@pytest.fixture(scope="module")
def server(
    qwen_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("ops") / "vllm-serve.log"
    options = {
        "budget": BUDGET,
        "sparse_min_tokens": 0,
        "min_blocks": 0,
        "recall_sample_rate": 0.25,
        "http_reconfigure": True,
    }
    with running_server(
        qwen_model_dir,
        infinigen_args(SERVED_NAME, options),
        log_path,
        env_extra=PLUGINS_ENV,
    ) as srv:
        yield srv
    srv.assert_stopped_cleanly()


def _client(server: Server):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="unused", timeout=300)


def _prompt() -> str:
    from tests.conftest import SHARED_DATA
    from tests.engine.prompts import book_text

    # ~600 tokens: 19 blocks of 32, so a 30% budget leaves most unread.
    return book_text(SHARED_DATA, 2400, offset=3000) + "\n\nIn one sentence, the story"


def _complete(server: Server, max_tokens: int = 16) -> str:
    reply = _client(server).completions.create(
        model=SERVED_NAME,
        prompt=_prompt(),
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},  # a fixed number of decode steps
    )
    assert reply.usage is not None and reply.usage.completion_tokens == max_tokens
    return reply.choices[0].text


def _scrape(server: Server) -> dict[str, Any]:
    """``{(metric sample name, frozen labels): value}`` of ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    reply = httpx.get(f"{server.root_url}/metrics", timeout=60)
    assert reply.status_code == 200
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def _value(samples: dict[str, Any], name: str, **labels: str) -> float:
    want = {"model_name": SERVED_NAME, "engine": "0", "rank": "0", **labels}
    matches = [
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and dict(sample_labels) == want
    ]
    assert len(matches) == 1, (name, labels, [k for k in samples if k[0] == name])
    return float(matches[0])


def _delta(
    before: dict[str, Any], after: dict[str, Any], name: str, **labels: str
) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def test_metrics_move_as_the_requests_imply(server: Server) -> None:
    before = _scrape(server)
    _complete(server)
    after = _scrape(server)
    # vLLM's own series are still there: ours are appended, not substituted.
    assert any(name.startswith("vllm:num_requests_running") for name, _ in after)
    prefix = "vllm:infinigen_"
    requests = _delta(before, after, prefix + "decode_requests_total", path="sparse")
    assert requests >= 15  # 16 tokens: the first comes from prefill
    assert _delta(before, after, prefix + "decode_requests_total", path="whole") == 0
    read = _delta(before, after, prefix + "blocks_read_total")
    available = _delta(before, after, prefix + "blocks_available_total")
    assert 0 < read < available
    # The budget, rounded up per request and layer (sink and newest blocks
    # fit in it at 19+ blocks).
    assert read <= BUDGET * available + requests * SPARSE_LAYERS
    assert read <= 0.4 * available
    stats = httpx.get(f"{server.root_url}/infinigen/stats", timeout=60).json()
    block_bytes = stats["ranks"][0]["block_bytes"]
    assert _delta(before, after, prefix + "kv_read_bytes_total") == read * block_bytes
    assert _delta(before, after, prefix + "swapped_bytes_total") == 0  # in place
    steps = _delta(before, after, prefix + "decode_steps_total", path="sparse")
    assert steps == requests  # one request at a time
    selection = _delta(before, after, prefix + "step_selection_seconds_count")
    assert selection == steps
    assert _delta(before, after, prefix + "step_selection_seconds_sum") > 0
    # a quarter of the sparse steps sample the recall
    samples = _delta(before, after, prefix + "selection_recall_count")
    assert steps // 4 - 1 <= samples <= steps // 4 + 1
    assert 0.0 <= _value(after, prefix + "selection_recall_last") <= 1.0
    recall_sum = _delta(before, after, prefix + "selection_recall_sum")
    assert 0.0 < recall_sum <= samples
    inf_bucket = _value(after, prefix + "selection_recall_bucket", le="+Inf")
    assert inf_bucket == _value(after, prefix + "selection_recall_count")
    host = _value(after, prefix + "host_tier_bytes")
    device = _value(after, prefix + "device_tier_bytes")
    assert 0 < device < host
    assert _value(after, prefix + "budget_fraction") == BUDGET


def test_stats_and_options_endpoints(server: Server) -> None:
    stats = httpx.get(f"{server.root_url}/infinigen/stats", timeout=60).json()
    assert len(stats["ranks"]) == 1
    rank = stats["ranks"][0]
    assert set(rank["layers"]) == {str(i) for i in range(1, 24)}
    assert rank["policy"] == "infinigen"
    config = httpx.get(f"{server.root_url}/infinigen/config", timeout=60).json()
    assert config["options"]["budget"] == BUDGET
    assert config["options"]["recall_sample_rate"] == 0.25
    assert config["http_reconfigure"] is True
    assert "partial_ratio" not in config["runtime_options"]


def _read_share(server: Server) -> float:
    before = _scrape(server)
    _complete(server, max_tokens=8)
    after = _scrape(server)
    read = _delta(before, after, "vllm:infinigen_blocks_read_total")
    return read / _delta(before, after, "vllm:infinigen_blocks_available_total")


def test_changing_the_budget_changes_what_the_next_request_reads(
    server: Server,
) -> None:
    url = f"{server.root_url}/infinigen/config"
    share = _read_share(server)
    changed = httpx.post(url, json={"budget": 0.7}, timeout=60)
    assert changed.status_code == 200, changed.text
    assert changed.json()["options"]["budget"] == 0.7
    try:
        wider = _read_share(server)
        assert wider > share + 0.3
        assert wider <= 0.8
    finally:
        restored = httpx.post(url, json={"budget": BUDGET}, timeout=60)
        assert restored.status_code == 200
    assert abs(_read_share(server) - share) < 0.02


STREAM_TOKENS = 96


#: Bad ``POST /infinigen/config`` bodies and what their 400 must say.
BAD_BODIES: list[tuple[Any, str]] = [
    ({"budget": 2}, "'budget' must be a number in (0.0, 1.0]"),
    ({"policy": "lru"}, "'policy' must be one of"),
    ({"partial_ratio": 0.5}, "fixed at start-up"),
    ({"budgte": 0.5}, "known options"),
    ([0.5], "JSON object"),
]


def test_bad_options_are_400_and_leave_a_concurrent_request_alone(
    server: Server,
) -> None:
    # Long enough that the stream is still decoding when the last reply
    # comes back (24 tokens have finished before one POST returned on a busy
    # host).
    alone = _complete(server, max_tokens=STREAM_TOKENS)
    result: dict[str, str] = {}
    decoding = threading.Event()

    def stream() -> None:
        chunks = _client(server).completions.create(
            model=SERVED_NAME,
            prompt=_prompt(),
            max_tokens=STREAM_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        pieces = []
        for chunk in chunks:
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                decoding.set()
        result["text"] = "".join(pieces)

    worker = threading.Thread(target=stream)
    worker.start()
    try:
        assert decoding.wait(timeout=300)  # the request is mid-decode
        replies = [
            httpx.post(f"{server.root_url}/infinigen/config", json=body, timeout=60)
            for body, _ in BAD_BODIES
        ]
        in_flight = worker.is_alive()
    finally:
        worker.join(timeout=300)
    assert in_flight
    for (body, expected), reply in zip(BAD_BODIES, replies, strict=True):
        assert reply.status_code == 400, body
        assert expected in reply.json()["error"], body
    assert result["text"] == alone
    options = httpx.get(f"{server.root_url}/infinigen/config", timeout=60).json()
    assert options["options"]["budget"] == BUDGET
    assert options["options"]["policy"] == "infinigen"
