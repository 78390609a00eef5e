"""Soak: a real ``vllm serve`` with INFINIGEN under mixed load, client
cancellations and a KV pool small enough that vLLM must preempt.

Starts ``vllm serve MODEL --attention-backend infinigen`` (with the
endpoint plugin, so ``/metrics`` carries INFINIGEN's series) with a KV pool
of ``--pool-tokens`` tokens (the ``host_pool_gib`` option; on CPU it is
vLLM's own paged cache) and ``sparse_min_tokens`` 0, so that selection runs
at these context lengths. Then, at ``--concurrency`` requests in flight:

* long prompts: a PG-19 passage of ``--long-tokens`` tokens (read in
  place from ``../shared/data``; a shared prefix, so prefix caching
  prefills it once while it stays cached) with a question of its own, and
  long outputs (written to the end: ``ignore_eos``); the pool holds the
  passage and only a few requests' outputs, so running requests outgrow
  it and vLLM preempts;
* short prompts: a line of Python source from the standard library;
* half streamed, half not; a ``--cancel-share`` of the streamed ones
  closed by the client after a random number of chunks (vLLM aborts them).

Reports requests completed, cancelled and failed (an error, or a finished
request with no text or no finish reason), vLLM's preemption counter,
output tokens per second, INFINIGEN's counters, and the resident memory of
the server's process tree sampled every second: where it settled after
warm-up (median of the first sampled tenth after the first
``--warmup`` requests), where it ended, and the change. A greedy probe is
asked before and after the load; its answers must match. Writes
``benchmarks/results/soak[_quick].json``:

    python benchmarks/soak.py            # 240 requests
    python benchmarks/soak.py --quick    # 60 requests, shorter prompts (< 10 min)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_infinigen.models import MODEL_NAMES, kv_pool_gib

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BOOK = REPO.parent / "shared" / "data" / "pg19_firstbook.txt"
VLLM_BIN = Path(sys.executable).with_name("vllm")
PROBE = "def fibonacci(n):"


@dataclass
class Outcome:
    kind: str  # "long" / "short"
    streamed: bool
    cancel_after: int | None  # chunks read before closing; None: read all
    status: str = "pending"  # completed / cancelled / failed
    output_tokens: int = 0
    error: str = ""


@dataclass
class MemorySampler:
    """Summed RSS of a process and its descendants, once a second."""

    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self._stop.wait(1.0):
            total = 0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.samples.append((time.monotonic(), total))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return str(reply.read().decode())


def counter(metrics_text: str, name: str) -> float:
    """Sum of a counter's samples (every label set) in a Prometheus scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in (name, f"{name}_total"):
                total += sample.value
    return total


def prompts(tokenizer: Any, args: argparse.Namespace, rng: random.Random) -> list[Any]:
    """(kind, prompt, max_tokens) per request."""
    import inspect
    import textwrap as source_module

    words = BOOK.read_text(encoding="utf-8").split()
    ids = tokenizer(" ".join(words[: args.long_tokens]))["input_ids"]
    passage = tokenizer.decode(ids[: args.long_tokens])
    lines = [
        line.strip()
        for line in inspect.getsource(source_module).splitlines()
        if len(line.strip()) > 20
    ]
    questions = (
        "Who is speaking in the last paragraph?",
        "Summarise the passage in one sentence.",
        "What happens next?",
        "Name a place mentioned above.",
    )
    out = []
    for i in range(args.requests):
        if rng.random() < args.long_share:
            question = f"{questions[rng.randrange(len(questions))]} (request {i})"
            out.append(("long", f"{passage}\n\n{question}\n", args.long_output))
        else:
            line = lines[rng.randrange(len(lines))]
            out.append(("short", f"# request {i}\n{line}\n", args.short_output))
    return out


async def one(
    client: Any, model: str, prompt: str, max_tokens: int, outcome: Outcome
) -> None:
    # Long requests write their whole output (vLLM's ``ignore_eos``): their
    # growth is what outgrows the pool.
    extra = {"ignore_eos": outcome.kind == "long"}
    try:
        reply = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.7,
            stream=outcome.streamed,
            extra_body=extra,
        )
        if outcome.streamed:
            chunks, text, finish = 0, "", None
            async for chunk in reply:
                chunks += 1
                if chunk.choices:
                    text += chunk.choices[0].text or ""
                    finish = chunk.choices[0].finish_reason or finish
                if outcome.cancel_after is not None and chunks >= outcome.cancel_after:
                    await reply.close()
                    outcome.status = "cancelled"
                    outcome.output_tokens = chunks
                    return
            outcome.output_tokens = chunks
        else:
            choice = reply.choices[0]
            text, finish = choice.text, choice.finish_reason
            outcome.output_tokens = reply.usage.completion_tokens if reply.usage else 0
        ok = bool(text) and finish in ("stop", "length")
        outcome.status = "completed" if ok else "failed"
        if not ok:
            outcome.error = f"no text or no finish reason: {finish!r}"
    except Exception as error:  # a failure to report, never to hide
        outcome.status = "failed"
        outcome.error = f"{type(error).__name__}: {error}"[:300]


async def load(
    base_url: str, model: str, work: list[Any], outcomes: list[Outcome], limit: int
) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="soak", timeout=1800, max_retries=0)
    gate = asyncio.Semaphore(limit)

    async def guarded(index: int) -> None:
        async with gate:
            _, prompt, max_tokens = work[index]
            await one(client, model, prompt, max_tokens, outcomes[index])

    await asyncio.gather(*(guarded(i) for i in range(len(work))))
    await client.close()


def probe(base_url: str, model: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="soak", timeout=600)
    reply = client.completions.create(
        model=model, prompt=PROBE, max_tokens=24, temperature=0
    )
    return str(reply.choices[0].text)


def start_server(
    model: Path, port: int, args: argparse.Namespace, log_path: Path
) -> subprocess.Popen[bytes]:
    options = {
        "host_pool_gib": kv_pool_gib(model, args.pool_tokens),
        "sparse_min_tokens": 0,
    }
    env = dict(os.environ, VLLM_PLUGINS="infinigen,infinigen_api")
    cmd = [
        str(VLLM_BIN),
        "serve",
        str(model),
        "--attention-backend",
        "infinigen",
        "--served-model-name",
        "soak",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(args.long_tokens + 256),
        "--additional-config",
        json.dumps({"infinigen": options}),
    ]
    with log_path.open("wb") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited with {proc.returncode}")
        try:
            get(f"http://127.0.0.1:{port}/health", timeout=5)
            return
        except OSError:
            time.sleep(2)
    raise SystemExit("vllm serve not healthy in time")


def memory_summary(
    samples: list[tuple[float, int]], warm_from: float
) -> dict[str, Any]:
    after = [rss for t, rss in samples if t >= warm_from]
    if len(after) < 10:
        return {"samples": len(samples), "note": "too few samples after warm-up"}
    settled = statistics.median(after[: max(3, len(after) // 10)])
    end = statistics.median(after[-max(3, len(after) // 20) :])
    return {
        "samples": len(samples),
        "settled_gib": settled / (1 << 30),
        "end_gib": end / (1 << 30),
        "peak_gib": max(after) / (1 << 30),
        "change": end / settled - 1,
        "series_gib": [
            round(rss / (1 << 30), 3)
            for _, rss in samples[:: max(1, len(samples) // 200)]
        ],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Arguments with the ``--quick`` or full defaults filled in; a value out
    of its range stops with a message naming the option."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", choices=MODEL_NAMES)
    parser.add_argument("--requests", type=int, default=None, help="240 | 60")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--long-share", type=float, default=0.4)
    parser.add_argument("--long-tokens", type=int, default=None, help="3000 | 1200")
    parser.add_argument("--long-output", type=int, default=None, help="192 | 96")
    parser.add_argument("--short-output", type=int, default=32)
    parser.add_argument("--cancel-share", type=float, default=0.3)
    parser.add_argument(
        "--pool-tokens",
        type=int,
        default=None,
        help="KV pool in tokens (3400 | 1800): the passage and a few "
        "requests' outputs; more in flight do not fit, so vLLM preempts",
    )
    parser.add_argument("--warmup", type=int, default=None, help="requests (24 | 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    quick = args.quick
    args.requests = args.requests or (60 if quick else 240)
    args.long_tokens = args.long_tokens or (1200 if quick else 3000)
    args.long_output = args.long_output or (96 if quick else 192)
    args.pool_tokens = args.pool_tokens or (1800 if quick else 3400)
    args.warmup = args.warmup or (8 if quick else 24)
    for name in (
        "requests",
        "concurrency",
        "long_tokens",
        "long_output",
        "short_output",
        "pool_tokens",
        "warmup",
    ):
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
            )
    for name in ("long_share", "cancel_share"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(
                f"--{name.replace('_', '-')} must be in [0, 1], "
                f"got {getattr(args, name)}"
            )
    return args


def main() -> None:
    args = parse_args()
    quick = args.quick
    out = args.out or RESULTS / ("soak_quick.json" if quick else "soak.json")

    from transformers import AutoTokenizer

    from vllm_infinigen.models import model_path

    model = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(args.seed)
    work = prompts(tokenizer, args, rng)
    outcomes = []
    for kind, _, _ in work:
        streamed = rng.random() < 0.5
        cancel = None
        if streamed and rng.random() < args.cancel_share:
            cancel = rng.randint(1, 24)
        outcomes.append(Outcome(kind, streamed, cancel))

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = out.with_name(f".{out.stem}.log")  # the server's log
    started = time.monotonic()
    proc = start_server(model, port, args, log_path)
    sampler = MemorySampler(proc.pid)
    try:
        wait_healthy(port, proc, timeout=900)
        startup_s = time.monotonic() - started
        sampler.start()
        before = probe(f"{base}/v1", "soak")
        t0 = time.monotonic()
        # Warm-up: the first requests (the passage prefilled), then the rest.
        asyncio.run(
            load(
                f"{base}/v1",
                "soak",
                work[: args.warmup],
                outcomes[: args.warmup],
                args.concurrency,
            )
        )
        warm_at = time.monotonic()
        asyncio.run(
            load(
                f"{base}/v1",
                "soak",
                work[args.warmup :],
                outcomes[args.warmup :],
                args.concurrency,
            )
        )
        elapsed = time.monotonic() - t0
        after = probe(f"{base}/v1", "soak")
        metrics = get(f"{base}/metrics")
        stats = json.loads(get(f"{base}/infinigen/stats"))
    finally:
        sampler.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    count = {
        s: sum(o.status == s for o in outcomes)
        for s in ("completed", "cancelled", "failed")
    }
    tokens = sum(o.output_tokens for o in outcomes)
    totals = [rank.get("total", {}) for rank in stats.get("ranks", [])]
    result = {
        "command": " ".join(["python", "benchmarks/soak.py", *sys.argv[1:]]),
        "model": args.model,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "startup_s": startup_s,
        "load_s": elapsed,
        "requests": len(outcomes),
        **count,
        "long": sum(o.kind == "long" for o in outcomes),
        "streamed": sum(o.streamed for o in outcomes),
        "errors": [o.error for o in outcomes if o.status == "failed"][:20],
        "preemptions": counter(metrics, "vllm:num_preemptions"),
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed,
        "probe_before": before,
        "probe_after": after,
        "probe_same": before == after,
        "infinigen_total": totals[0] if totals else {},
        "memory": memory_summary(sampler.samples, warm_at),
        "server_exit": proc.returncode,
    }
    out.write_text(json.dumps(result, indent=1))
    mem = result["memory"]
    print(
        f"{len(outcomes)} requests: {count['completed']} completed, "
        f"{count['cancelled']} cancelled, {count['failed']} failed; "
        f"{result['preemptions']:.0f} preemptions; "
        f"{result['output_tokens_per_s']:.1f} output tok/s over {elapsed:.0f} s; "
        f"memory settled {mem.get('settled_gib', float('nan')):.2f} GiB, "
        f"end {mem.get('end_gib', float('nan')):.2f} GiB "
        f"({mem.get('change', float('nan')):+.1%}); probe same: {before == after}"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
