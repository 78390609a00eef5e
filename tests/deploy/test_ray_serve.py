"""Ray Serve LLM serves INFINIGEN: a real local Ray cluster, the real model.

One module-scoped application: a local Ray cluster started by this process
(small object store, no dashboard, a short temporary folder), Serve's HTTP
proxy on a free loopback port, and :func:`vllm_infinigen.ray_serve.build_app`
deployed with Qwen2.5-Coder-0.5B. The tests talk to it with the ``openai``
client and read Ray's session logs for the backend's start-up line. Teardown
shuts Serve and Ray down and ends any descendant process still alive, by
pid. Start-up time and peak memory (this process and its descendants) are
written to the terminal. Minutes on 2 cores; keep no other engine running.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.support import RAY_SERVE_MARKS
from tests.server.serve_process import free_port

pytestmark = [pytest.mark.slow, *RAY_SERVE_MARKS, pytest.mark.timeout(1200)]

SERVED_NAME = "qwen-infinigen"
MODEL = "qwen2.5-coder-0.5b"
#: Options of the served backend: select at every length (the prompts are
#: shorter than the CPU's default threshold for sparse steps).
OPTIONS = {"budget": 0.3, "sparse_min_tokens": 0}


class PeakMemory:
    """Samples the summed RSS of this process and its descendants (Ray's
    processes, the replicas, vLLM's engine core) once a second."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.peak_bytes = max(self.peak_bytes, self._sample())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class RayApp:
    base_url: str
    logs_dir: Path
    timings: dict[str, float] = field(default_factory=dict)

    def logs(self) -> str:
        """Every file under Ray's session logs (workers, Serve, raylet)."""
        texts = []
        for path in sorted(self.logs_dir.rglob("*")):
            if path.is_file():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)


def _report(line: str) -> None:
    """The module's start-up time and peak memory, to the terminal (run with
    ``-s`` to see it: pytest captures a fixture's teardown output)."""
    print(line, flush=True)


@pytest.fixture(scope="module")
def ray_app() -> Iterator[RayApp]:
    from vllm_infinigen.models import is_built, model_path

    if not is_built(MODEL):
        pytest.skip(
            f"{MODEL} not built (python -m vllm_infinigen.models build {MODEL})"
        )
    import ray
    from ray import serve

    from vllm_infinigen.ray_serve import build_app, descendant_pids, end_processes

    # Short: Ray's AF_UNIX socket paths under it must stay below 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        # One constructor try per replica, not three full vLLM start-ups.
        "RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1",
        "HF_HUB_OFFLINE": "1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    port = free_port()
    app = RayApp(base_url=f"http://127.0.0.1:{port}/v1", logs_dir=Path(temp_dir))
    leftovers: list[int] = []
    with PeakMemory() as memory:
        started = time.monotonic()
        try:
            ray.init(
                address="local",  # never a stray RAY_ADDRESS
                num_cpus=4,  # logical: the replica's bundle (2) + slack
                num_gpus=0,
                object_store_memory=256 * 2**20,  # default: 30% of RAM
                include_dashboard=False,
                log_to_driver=False,
                _temp_dir=temp_dir,
            )
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            app.timings["ray_and_serve_start_s"] = time.monotonic() - started
            application = build_app(
                {
                    "model_source": str(model_path(MODEL)),
                    "model_id": SERVED_NAME,
                    "accelerator": "cpu",
                    "num_cpus": 2,
                    "infinigen": OPTIONS,
                    "engine_kwargs": {
                        "dtype": "float32",
                        "max_model_len": 2048,
                        "block_size": 32,
                        "enforce_eager": True,  # no compile: a minute less
                    },
                    "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
                }
            )
            # Blocks until RUNNING; raises on DEPLOY_FAILED.
            serve.run(application, name="infinigen", route_prefix="/")
            app.timings["until_running_s"] = time.monotonic() - started
            logs = Path(temp_dir) / "session_latest" / "logs"
            app.logs_dir = logs if logs.is_dir() else Path(temp_dir)
            yield app
        finally:
            leftovers = descendant_pids()
            try:
                if ray.is_initialized():
                    serve.shutdown()
            finally:
                ray.shutdown()
                survivors = end_processes(leftovers)
                app.timings["total_s"] = time.monotonic() - started
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
    _report(
        "Ray Serve INFINIGEN: "
        + ", ".join(f"{k}={v:.1f}" for k, v in app.timings.items())
        + f", peak RSS (pytest + descendants) {memory.peak_bytes / 2**30:.2f} GiB"
        + f", processes ended after shutdown: {len(survivors)}",
    )
    shutil.rmtree(temp_dir, ignore_errors=True)
    import psutil

    alive = [pid for pid in leftovers if psutil.pid_exists(pid)]
    assert not [p for p in alive if psutil.Process(p).status() != "zombie"], alive


def _client(app: RayApp) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=app.base_url, api_key="unused", timeout=600)


def test_models_lists_served_name(ray_app: RayApp) -> None:
    ids = [model.id for model in _client(ray_app).models.list().data]
    assert SERVED_NAME in ids


def test_chat_completion_temperature_zero(ray_app: RayApp) -> None:
    client = _client(ray_app)
    messages = [
        {
            "role": "user",
            "content": "Write a Python function add(a, b) that returns a + b.",
        }
    ]
    started = time.monotonic()
    replies = [
        client.chat.completions.create(
            model=SERVED_NAME, messages=messages, max_tokens=48, temperature=0
        )
        for _ in range(2)
    ]
    ray_app.timings["two_chat_completions_s"] = time.monotonic() - started
    texts = [reply.choices[0].message.content or "" for reply in replies]
    assert "def add" in texts[0], texts[0]
    assert texts[0] == texts[1]  # greedy: the same answer twice
    assert replies[0].usage is not None and replies[0].usage.completion_tokens > 0


def test_streamed_completion_matches_unstreamed(ray_app: RayApp) -> None:
    client = _client(ray_app)
    prompt = "def fibonacci(n):\n"
    stream = client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=32, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 1  # arrived in several chunks
    whole = client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=32, temperature=0
    )
    assert "".join(pieces) == whole.choices[0].text
    assert whole.choices[0].text.strip()


def test_infinigen_active_in_ray_logs(ray_app: RayApp) -> None:
    logs = ray_app.logs()
    assert "INFINIGEN attention backend active" in logs, logs[-3000:]
    line = next(
        text
        for text in logs.splitlines()
        if "INFINIGEN attention backend active" in text
    )
    assert "budget=0.3" in line, line
