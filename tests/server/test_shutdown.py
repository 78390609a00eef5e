"""SIGTERM during decode ends `vllm serve --attention-backend infinigen` cleanly.

A process manager (systemd, Kubernetes) stops a server with SIGTERM to its
main process while requests are streaming. With ``--shutdown-timeout N``
vLLM drains them: running requests finish, new ones are refused, then the
engine stops. With INFINIGEN's sparse decode running (in place, or with its
staging copy thread), the drained streams must arrive whole and the server
must exit by itself, without a traceback in its log, leaving no process and
no shared-memory segment behind.

One traceback is vLLM 0.32's own and is let through: after its client has
shut down ("[shutdown] MPClient: complete"), the client's cleanup cancels the
task that reads engine outputs, which hands ``EngineDeadError`` to the API
server's output handler; when the event loop runs that before the handler's
own cancellation arrives, vLLM logs "AsyncLLM output_handler failed" with
the error. Which comes first is a matter of thread timing, with any backend.

vLLM 0.32's default, ``--shutdown-timeout 0`` ("abort"), force-kills the
engine process right after signalling it, and open streams then stay open
until their clients give up: the same with vLLM's own attention backend, so
not tested here (``docs/operations.md``, "Stopping the server").
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.server.serve_process import Server, infinigen_args, running_server

pytestmark = pytest.mark.slow
SERVED_NAME = "qwen-infinigen"
SHM = Path("/dev/shm")


def _shm() -> set[str]:
    return set(os.listdir(SHM)) if SHM.is_dir() else set()


def _stream(server: Server, max_tokens: int, out: dict[str, Any]) -> None:
    """One streamed completion; records the tokens seen, how it finished
    and any error (a connection closed by the server is an end too)."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="unused", timeout=300)
    out["chunks"] = 0
    try:
        stream = client.completions.create(
            model=SERVED_NAME,
            prompt="# A long list of prime numbers, one per line\n2\n3\n5\n",
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                out["chunks"] += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                out["finish_reason"] = chunk.choices[0].finish_reason
    except Exception as error:  # noqa: BLE001 - recorded, judged by the test
        out["error"] = repr(error)
    out["done"] = True


def _sigterm_during_decode(
    model: Path,
    tmp_path: Path,
    options: dict[str, object],
    extra: list[str],
    max_tokens: int,
) -> tuple[Server, list[dict[str, Any]], list[int]]:
    """Start a server, stream two requests, SIGTERM it once both decode, and
    wait for it to exit. Returns the server, the streams' records and the
    server's process tree as it was before the signal."""
    import psutil

    with running_server(
        model,
        [*infinigen_args(SERVED_NAME, options), *extra],
        tmp_path / "vllm-serve.log",
    ) as server:
        tree = [p.pid for p in psutil.Process(server.process.pid).children(True)]
        assert tree, "vllm serve started no engine process"
        records: list[dict[str, Any]] = [{}, {}]
        threads = [
            threading.Thread(target=_stream, args=(server, max_tokens, r))
            for r in records
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 240
        while not all(r.get("chunks", 0) >= 4 for r in records):
            assert time.monotonic() < deadline, (records, server.log()[-3000:])
            assert not any(r.get("done") for r in records), records
            time.sleep(0.2)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=120)
        for thread in threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), "a client stream never ended"
    return server, records, tree


def _unexpected_tracebacks(log: str) -> list[str]:
    """The log's tracebacks, as their first lines, less vLLM's teardown race
    (module docstring): a traceback logged by ``async_llm.py`` after the
    client's shutdown completed, whose last line is ``EngineDeadError``."""
    lines = log.splitlines()
    done = next(
        (i for i, line in enumerate(lines) if "[shutdown] MPClient: complete" in line),
        len(lines),
    )
    found = []
    for i, line in enumerate(lines):
        if "Traceback" not in line:
            continue
        if i > done and "[async_llm.py:" in line:
            start = line.index("[async_llm.py:")
            tag = line[start : line.index("]", start) + 1]
            block = [line]
            for following in lines[i + 1 :]:
                if tag not in following:
                    break
                block.append(following)
            if "EngineDeadError" in block[-1]:
                continue
        found.append(line)
    return found


def _assert_clean_exit(server: Server, tree: list[int], shm_before: set[str]) -> None:
    import psutil

    log = server.log()
    assert server.process.returncode in (0, -signal.SIGTERM), log[-3000:]
    assert not _unexpected_tracebacks(log), log[-6000:]
    time.sleep(2)  # children exit right after their parent
    left = []
    for pid in tree:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert not left, f"processes left running: {left}"
    assert _shm() <= shm_before, f"shared memory left: {_shm() - shm_before}"


@pytest.mark.parametrize("swap_mode", ["in_place", "thread"])
def test_sigterm_drains_running_requests(
    qwen_model_dir: Path, tmp_path: Path, swap_mode: str
) -> None:
    shm_before = _shm()
    max_tokens = 64
    server, records, tree = _sigterm_during_decode(
        qwen_model_dir,
        tmp_path,
        # "thread": the staging copy thread runs too; it must not hold the exit.
        {"budget": 0.3, "sparse_min_tokens": 0, "swap_mode": swap_mode},
        ["--shutdown-timeout", "120"],
        max_tokens,
    )
    for record in records:  # drained: every token, then a normal end
        assert "error" not in record, record
        assert record["finish_reason"] == "length", record
        assert record["chunks"] == max_tokens, record
    log = server.log()
    assert "mode=drain" in log
    assert "INFINIGEN attention backend active" in log
    _assert_clean_exit(server, tree, shm_before)
