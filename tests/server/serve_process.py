"""Start ``vllm serve`` as a user would, on a free loopback port, and stop it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

VLLM_BIN = Path(sys.executable).with_name("vllm")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_stopped_cleanly(self) -> None:
        """After :func:`running_server`'s SIGINT: it exited, not killed."""
        assert self.process.returncode in (0, -signal.SIGINT, 130), self.log()[-3000:]


#: Loads the endpoint plugin (metrics, ``/infinigen``) beside the backend.
PLUGINS_ENV = {"VLLM_PLUGINS": "infinigen,infinigen_api"}


def infinigen_args(
    served_name: str, options: Mapping[str, object], *, eager: bool = True
) -> list[str]:
    """``vllm serve`` arguments of the tests' INFINIGEN server: Qwen in
    float32 with 32-token blocks, 2048 tokens at most, these options;
    ``eager``: with ``--enforce-eager`` (no compile at start-up, about a
    minute less per server on two cores; ``tests/server/test_vllm_serve.py``
    runs the compiled model users get by default)."""
    return [
        *(["--enforce-eager"] if eager else []),
        "--attention-backend",
        "infinigen",
        "--served-model-name",
        served_name,
        "--max-model-len",
        "2048",
        "--block-size",
        "32",
        "--dtype",
        "float32",
        "--additional-config",
        json.dumps({"infinigen": dict(options)}),
    ]


def serve_command(model: Path, port: int, extra: Sequence[str]) -> list[str]:
    return [
        str(VLLM_BIN),
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/health", timeout=5
        ) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def running_server(
    model: Path,
    extra: Sequence[str],
    log_path: Path,
    startup_timeout: float = 600,
    kv_cache_space: str | None = "2",
    env_extra: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """Yield a healthy server; SIGINT it afterwards and wait for it to exit.

    ``kv_cache_space``: ``VLLM_CPU_KVCACHE_SPACE`` in GiB, or ``None`` for
    vLLM's automatic KV cache size (the variable removed). ``env_extra``:
    more environment (e.g. ``VLLM_PLUGINS``).
    """
    port = free_port()
    env = {**os.environ, **(env_extra or {})}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if kv_cache_space is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = kv_cache_space
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            serve_command(model, port, extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    server = Server(process, port, log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(port):
            if process.poll() is not None:
                raise AssertionError(
                    f"vllm serve exited with {process.returncode}:\n"
                    + server.log()[-4000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    "vllm serve not healthy in time:\n" + server.log()[-4000:]
                )
            time.sleep(2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def run_to_exit(
    model: Path, extra: Sequence[str], timeout: float = 400
) -> subprocess.CompletedProcess[str]:
    """Run ``vllm serve`` expecting it to stop by itself (bad arguments)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return subprocess.run(
        serve_command(model, free_port(), extra),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
