"""`vllm serve --attention-backend infinigen` answers the OpenAI API."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.serve_process import (
    PLUGINS_ENV,
    Server,
    infinigen_args,
    run_to_exit,
    running_server,
)

pytestmark = pytest.mark.slow
SERVED_NAME = "qwen-infinigen"
API_KEY = "unused"


@pytest.fixture(scope="module")
def server(
    qwen_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    # Select at every length: the test prompts are shorter than the CPU's
    # default threshold for sparse steps.
    options = {"budget": 0.3, "sparse_min_tokens": 0}
    extra = [
        # vLLM's compilation on, as a plain `vllm serve` runs.
        *infinigen_args(SERVED_NAME, options, eager=False),
        # vLLM's automatic KV cache size (no VLLM_CPU_KVCACHE_SPACE), as a
        # user's plain `vllm serve` gets it, on a share of this machine.
        "--gpu-memory-utilization",
        "0.6",
        # vLLM guards /v1 with it; INFINIGEN's POST checks it too.
        "--api-key",
        API_KEY,
    ]
    with running_server(
        qwen_model_dir,
        extra,
        log_path,
        kv_cache_space=None,
        env_extra=PLUGINS_ENV,
    ) as srv:
        yield srv
    srv.assert_stopped_cleanly()


def _client(server: Server):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key=API_KEY, timeout=300)


def test_backend_in_use(server: Server) -> None:
    log = server.log()
    assert "INFINIGEN attention backend active" in log
    assert "mode=sparse decode, selected blocks read in place" in log
    assert "budget=0.3" in log
    assert "swap_mode=in_place" in log  # the default placement on CPU
    assert "INFINIGEN calibration ready" in log
    # Compiled, the ahead step runs inside each layer's attention op.
    assert "enforce_eager=False" in log
    assert "ahead step runs inside each sparse layer's attention" in log


def test_automatic_kv_size_leaves_room_for_device_tier(server: Server) -> None:
    match = re.search(
        r"INFINIGEN host tier ([\d.]+) GiB of vLLM's automatic ([\d.]+) GiB",
        server.log(),
    )
    assert match, server.log()[-3000:]
    host, automatic = float(match.group(1)), float(match.group(2))
    # 23 sparse layers of 24, whole keys at 4 bits (Qwen's default): 34
    # bytes per token and KV head against 512 of this float32 model's key and
    # value, 6.4% of the host tier's bytes; in place there are no staging
    # buffers: host = auto / 1.064.
    assert 0.93 * automatic < host < 0.95 * automatic


def test_models_endpoint(server: Server) -> None:
    models = _client(server).models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]


def test_completion(server: Server) -> None:
    reply = _client(server).completions.create(
        model=SERVED_NAME, prompt="def add(a, b):\n", max_tokens=16, temperature=0
    )
    choice = reply.choices[0]
    assert reply.usage is not None and reply.usage.completion_tokens == 16
    assert "return" in choice.text


def _blocks(server: Server) -> tuple[float, float]:
    """(blocks read, blocks available) so far, over every sparse layer."""
    import httpx

    stats = httpx.get(f"{server.root_url}/infinigen/stats", timeout=60).json()
    total = stats["ranks"][0]["total"]
    return float(total["blocks_selected"]), float(total["blocks_total"])


def test_long_prompt_sparse_decode(server: Server) -> None:
    """A ~1.2K-token prompt over 32-token blocks (longer than the 8-block
    floor) decodes sparse in the compiled server: its decode steps read
    about the budget's share of the blocks, and it completes with text."""
    from tests.conftest import SHARED_DATA
    from tests.engine.prompts import book_text

    text = book_text(SHARED_DATA, 5000, offset=1000)
    read_before, available_before = _blocks(server)
    reply = _client(server).completions.create(
        model=SERVED_NAME,
        prompt=text + "\n\nThe name of the book's main character is",
        max_tokens=24,
        temperature=0,
    )
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 1000
    assert reply.usage.completion_tokens == 24
    assert reply.choices[0].text.strip()
    read_after, available_after = _blocks(server)
    available = available_after - available_before
    share = (read_after - read_before) / available
    # ~38 blocks per step, 23 sparse layers, 23 decode steps; a 30% budget
    # plus the sink and recent blocks reads well under half of them.
    assert available > 23 * 23 * 30, available
    assert 0.2 < share < 0.5, share


def test_short_chat_keeps_its_context(server: Server) -> None:
    """A chat that grows past a few blocks still sees its whole prompt: with
    a 30% budget and no floor, a 3-block request read only its first and
    newest blocks and answered ``s[::-11111111``."""
    messages = [
        {
            "role": "user",
            "content": "Write a Python one-liner that reverses a string s.",
        }
    ]
    reply = _client(server).chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=40, temperature=0
    )
    assert "s[::-1]" in (reply.choices[0].message.content or "")


def test_chat_and_streaming_agree(server: Server) -> None:
    client = _client(server)
    messages = [{"role": "user", "content": "What is 2 + 3? Answer with a number."}]
    reply = client.chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=12, temperature=0
    )
    text = reply.choices[0].message.content or ""
    assert "5" in text

    messages = [{"role": "user", "content": "Describe Python in one sentence."}]
    reply = client.chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=16, temperature=0
    )
    text = reply.choices[0].message.content or ""
    stream = client.chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=16, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == text
    assert "Python" in text


def test_options_api_reads_but_does_not_change_by_default(server: Server) -> None:
    """Without ``http_reconfigure`` the options can be read, not changed."""
    import httpx

    url = f"{server.root_url}/infinigen/config"
    options = httpx.get(url, timeout=60).json()
    assert options["options"]["budget"] == 0.3
    assert options["http_reconfigure"] is False
    assert "budget" in options["runtime_options"]
    anonymous = httpx.post(url, json={"budget": 0.5}, timeout=60)
    assert anonymous.status_code == 401
    key = {"Authorization": f"Bearer {API_KEY}"}
    refused = httpx.post(url, json={"budget": 0.5}, headers=key, timeout=60)
    assert refused.status_code == 403
    assert "http_reconfigure" in refused.json()["error"]
    assert httpx.get(url, timeout=60).json()["options"]["budget"] == 0.3


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"budget": 2}, "'budget' must be a number in (0.0, 1.0]"),
        ({"budgte": 0.2}, "known options"),
    ],
)
def test_bad_additional_config_stops_startup(
    qwen_model_dir: Path, options: dict[str, object], expected: str
) -> None:
    result = run_to_exit(
        qwen_model_dir,
        [
            "--attention-backend",
            "infinigen",
            "--additional-config",
            json.dumps({"infinigen": options}),
        ],
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert expected in output, output[-3000:]


def test_unsupported_model_stops_startup(tmp_path: Path) -> None:
    from tests.patches.test_platform_config import unsupported_model

    folder, message = unsupported_model(tmp_path, "mla")
    result = run_to_exit(folder, ["--attention-backend", "infinigen"])
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output, output[-3000:]
    assert "EngineCore" not in output  # refused before any engine process
