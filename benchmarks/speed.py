"""Decode speed, KV bytes and time to first token: dense vLLM vs every policy.

One run measures, per shape (context x batch), vLLM's default CPU attention
(the baseline, its own engine) next to one INFINIGEN engine that switches
between the block-selection policies (``dense`` reads every block through
our path; ``infinigen``, ``quest``, ``h2o``, ``streaming`` read a
``--budget`` share of them), and writes ``benchmarks/results/speed.json``
plus ``speed.png`` (``--quick``: ``speed_quick.*``)::

    python benchmarks/speed.py --quick                 # 2K x1, x4 (~10 min)
    python benchmarks/speed.py                         # 2K x1, 8K x4, 8K x8
    python benchmarks/speed.py --shapes 16384x4        # 16K x4 (~1 h)
    python benchmarks/speed.py --plan                  # print the plan, exit

Each request of a batch holds its own context (request ``i`` is Python
standard-library source starting at a different module), as in serving: a
shared prefix would let dense attention read the same few megabytes per
layer from the CPU cache for every request and hide the cost sparse decode
removes.

Every engine runs the model as users get it, compiled by vLLM (``--eager``:
every engine with ``--enforce-eager``).

How one context length runs: every engine is a child process that runs
vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no EngineCore process
polling beside the worker), bound to core 0 (``VLLM_CPU_OMP_THREADS_BIND``;
the two cores of this virtual machine differ, and drift, with the host's
load): vLLM's engines (``--baseline-block-sizes``, by default vLLM's own
default and INFINIGEN's block size) and INFINIGEN's. They start one after
another and prefill their prompts one after another (a cold 8K prompt
takes about a minute here, 16K a few), each alone. The engines then take
orders one at a time, so that exactly one computes while the others wait,
stopped (SIGSTOP): every timed round measures each vLLM engine and then each
policy, and rounds repeat (``--repeats``; the median is kept), so the
machine's drift falls on all of them alike. Ratios are against the fastest
vLLM engine of the shape (the configuration a user would pick instead); the
``dense`` policy is also compared with vLLM at INFINIGEN's block size. Every
timed request decodes from the prefix cache (it does not prefill).

Measured, per shape and policy:

- decode tokens/s from vLLM's per-request first/last token timestamps, and
  its ratio to the baseline measured in the same run;
- KV bytes read per decoded token, from the engine's counters (sparse
  layers: the selected blocks; dense layers: every block);
- the selection share of the decode step: time in speculation, scoring,
  selection and placement over the decode time;
- the ceiling: the speedup that reading only the counted KV bytes could
  give at most. The baseline's decode step is split into its KV-reading
  part and the rest by timing the same batch on short (128-token) prompts
  in the baseline engine (the rest: weights, MLP, sampling, scheduling);
  a policy reading a share ``f`` of the KV bytes can at best take ``rest +
  f * kv_part``;
- time to first token of one cold prompt in each engine (prefill is dense
  in every policy; the two engines prefill at the same time, each on its
  own core, so both see the same shared memory traffic).

Modelled, not measured (a GPU that offloads its KV to host memory): per decode
step, the time to move a full-KV fetch across a ``--pcie-gbps`` host-to-device
link next to the time to move each policy's counted bytes, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from workloads import (
    REPO,
    RESULTS,
    VLLM_CPU_BLOCK_SIZE,
    commit,
    cpu_model,
    stdlib_ids,
)

from vllm_infinigen.engine.policies.registry import POLICIES

#: Every registered policy, then InfiniGen read through staging (the GPU
#: shape: the selected blocks copied into a staging buffer before the kernel).
STAGED = "infinigen-staging"
SERIES = (*POLICIES, STAGED)
#: The child kind of vLLM's own backend (one engine per block size measured;
#: each is a series named :func:`baseline_name`).
BASELINE = "baseline"
FULL_FETCH = "full-KV fetch"
TAG = "SPEED "
#: The core every engine computes on (one engine runs at a time): the two
#: cores of this virtual machine differ, and drift, with the host's load.
ENGINE_CORE = 0
#: Tokens of each short prompt that times the non-KV part of a decode step.
SHORT_CONTEXT = 128


# --------------------------------------------------------------------- prompts


def baseline_sizes(sizes: list[int], our_block: int) -> list[int]:
    """vLLM's engines to start: one per distinct block size (0, vLLM's
    default, and 128 are the same engine on CPU; -1 is INFINIGEN's)."""
    named = {}
    for size in sizes:
        if size < -1:
            raise ValueError(
                f"--baseline-block-sizes: {size}; a block size, 0 (vLLM's "
                "default) or -1 (INFINIGEN's)"
            )
        size = our_block if size < 0 else size
        named.setdefault(baseline_name(size), size)
    return list(named.values())


def baseline_name(block_size: int) -> str:
    """The series of vLLM's own backend at ``block_size`` (0: its default)."""
    return f"vllm-{block_size or VLLM_CPU_BLOCK_SIZE}"


def is_baseline(series: str) -> bool:
    return series.startswith("vllm-")


def tracked_policies(series: list[str]) -> list[str]:
    """The engine policies behind the measured series (the staged series is
    InfiniGen's)."""
    names = {"infinigen" if s == STAGED else s for s in series}
    return [p for p in POLICIES if p in names]


def policy_options(series: str, budget: float) -> dict[str, Any]:
    """The run-time ``infinigen`` options of one series at ``budget``. The
    other options keep their defaults (the engine as a user gets it: steps
    shorter than ``sparse_min_tokens`` take the dense path; ``--options``
    changes that)."""
    if series == STAGED:
        return {"policy": "infinigen", "budget": budget, "swap_mode": "sync"}
    return {
        "policy": series,
        "budget": 1.0 if series == "dense" else budget,
        "swap_mode": "in_place",
    }


# ------------------------------------------------------------ child: one engine


def emit(kind: str, payload: dict[str, Any]) -> None:
    print(TAG + json.dumps({"kind": kind, **payload}), flush=True)


def decode_measure(outs: list[Any]) -> dict[str, Any]:
    """Decode tokens/s of one generate call, from vLLM's request timestamps:
    tokens after each request's first, over the span from the earliest first
    token to the latest last token."""
    first = min(o.metrics.first_token_ts for o in outs)
    last = max(o.metrics.last_token_ts for o in outs)
    decoded = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
    prompt = sum(len(o.prompt_token_ids or []) for o in outs)
    cached = sum(o.num_cached_tokens or 0 for o in outs)
    return {
        "decode_s": last - first,
        "decode_tokens": decoded,
        "decode_tok_s": decoded / max(last - first, 1e-9),
        "prompt_cached_fraction": cached / max(prompt, 1),
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
    }


def run_child(args: argparse.Namespace) -> None:
    """One engine for one context length, driven by JSON orders on stdin:
    ``prefill`` (every prompt), ``measure`` (one batch, one policy),
    ``short`` (the same batch on short prompts), ``quit``."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = [
        TokensPrompt(prompt_token_ids=stdlib_ids(tokenizer, args.context, seed))
        for seed in range(args.max_batch)
    ]
    ours = args.child == "infinigen"
    kwargs: dict[str, Any] = {}
    if ours:
        initial = {
            **json.loads(args.options),
            **policy_options("infinigen", args.budget),
        }
        kwargs["attention_backend"] = "INFINIGEN"
        kwargs["additional_config"] = {"infinigen": initial}
    if args.block_size:  # 0: vLLM's default (the baseline as users get it)
        kwargs["block_size"] = args.block_size
    start = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.context + args.decode_tokens + 16,
        max_num_batched_tokens=2048,
        max_num_seqs=max(args.max_batch, 8),
        enable_prefix_caching=True,
        enforce_eager=args.eager,
        disable_log_stats=False,
        **kwargs,
    )
    tracked: list[str] = []
    if ours:
        # The measured policies' device metadata is kept from the first
        # prefill on, so the cached prompts serve each of them (one prefill
        # per engine); policies not measured are not tracked (their upkeep
        # would slow every one measured).
        tracked = llm.collective_rpc(
            "infinigen_track", args=(tracked_policies(args.policies),)
        )[0]
    # Warm the kernels on a text no timed prompt starts with.
    marker = tokenizer("# warm-up\n")["input_ids"]
    llm.generate(
        [
            TokensPrompt(
                prompt_token_ids=(marker + prompts[0]["prompt_token_ids"])[:512]
            )
        ],
        SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
    )
    emit(
        "ready",
        {
            "seconds": time.perf_counter() - start,
            "tracked": tracked,
            "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
        },
    )

    timed = SamplingParams(
        max_tokens=args.decode_tokens, temperature=0, ignore_eos=True
    )
    for line in sys.stdin:
        order = json.loads(line)
        cmd = order["cmd"]
        if cmd == "quit":
            break
        if cmd == "prefill":
            start = time.perf_counter()
            probe = llm.generate(prompts[:1], SamplingParams(max_tokens=1))[0]
            metrics = probe.metrics
            assert metrics is not None, "request metrics need disable_log_stats=False"
            llm.generate(prompts[1:], SamplingParams(max_tokens=1))
            emit(
                "prefilled",
                {
                    "ttft_s": metrics.first_token_latency,
                    "cached_tokens": probe.num_cached_tokens or 0,
                    "seconds": time.perf_counter() - start,
                },
            )
            continue
        batch, policy = order["batch"], order.get("policy", BASELINE)
        if cmd == "short":
            shorts = [
                TokensPrompt(prompt_token_ids=stdlib_ids(tokenizer, SHORT_CONTEXT, s))
                for s in range(1000, 1000 + batch)
            ]
            llm.generate(shorts, SamplingParams(max_tokens=2, ignore_eos=True))
            emit("measured", decode_measure(llm.generate(shorts, timed)))
            continue
        effective: dict[str, Any] = {}
        if ours:
            # Configure every time: clears the decode-time H2O mass earlier
            # runs added, so every timed run starts from prefill's.
            effective = llm.collective_rpc(
                "infinigen_configure", args=(policy_options(policy, args.budget),)
            )[0]
        # Untimed steps of the same batch before every timed run: the
        # series measured first after its engine resumed (SIGCONT) ran up to
        # 10% slower than the next one on the same path.
        llm.generate(prompts[:batch], SamplingParams(max_tokens=2, ignore_eos=True))
        if ours:
            llm.collective_rpc("infinigen_reset_stats")
        run = decode_measure(llm.generate(prompts[:batch], timed))
        run["options"] = effective
        if ours:
            run["stats"] = llm.collective_rpc("infinigen_stats")[0]
        emit("measured", run)


# -------------------------------------------------------------- parent: a run


class Engine:
    """A child engine process and the orders it takes."""

    def __init__(
        self,
        args: argparse.Namespace,
        kind: str,
        context: int,
        core: int,
        block_size: int,
    ) -> None:
        self.kind = kind
        self.name = "infinigen" if kind != BASELINE else baseline_name(block_size)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            kind,
            "--model",
            args.model,
            "--context",
            str(context),
            "--max-batch",
            str(args.max_batch_of[context]),
            "--budget",
            str(args.budget),
            "--decode-tokens",
            str(args.decode_tokens),
            "--options",
            args.options,
            "--policies",
            *args.policies,
            "--dtype",
            args.dtype,
            "--block-size",
            str(block_size),
            *(["--eager"] if args.eager else []),
        ]
        env = dict(os.environ)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kvcache_gib)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if (os.cpu_count() or 1) > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
        self.log: IO[str] = open(  # noqa: SIM115 (closed in close())
            RESULTS / f".speed-{self.name}-{context}.log", "w"
        )
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=REPO,
        )

    def hold(self, stop: bool) -> None:
        """Stop (SIGSTOP) or continue (SIGCONT) this engine's processes: a
        waiting engine takes no core from the engine being timed."""
        sig = signal.SIGSTOP if stop else signal.SIGCONT
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                os.kill(pid, sig)
            except OSError:
                continue

    def read(self, kind: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(TAG):
                record = json.loads(line[len(TAG) :])
                if record.pop("kind") == kind:
                    return record
        self.proc.wait()
        self.log.flush()
        tail = Path(self.log.name).read_text()[-4000:]
        raise RuntimeError(
            f"{self.name} engine ended ({self.proc.returncode}):\n{tail}"
        )

    def order(self, **order: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(order) + "\n")
        self.proc.stdin.flush()

    def ask(self, kind: str, **order: Any) -> dict[str, Any]:
        self.order(**order)
        return self.read(kind)

    def close(self) -> None:
        """End the engine and every process below it. A held (stopped)
        engine is continued first: stopped, it could neither quit nor act
        on SIGTERM, and would outlive the run holding its memory."""
        tree = {pid: _comm(pid) for pid in _descendants(self.proc.pid)}
        if self.proc.poll() is None:
            self.hold(False)
            try:
                self.order(cmd="quit")
                self.proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 15  # room for a clean shutdown
        while time.monotonic() < deadline and any(
            comm and _comm(pid) == comm for pid, comm in tree.items()
        ):
            time.sleep(0.5)
        for pid, comm in tree.items():
            if comm and _comm(pid) == comm:  # still that process, not a reused pid
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(pid, sig)
                    except OSError:
                        break
        self.log.close()


def _comm(pid: int) -> str | None:
    """A process's name, or None once it has gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: float(r["decode_tok_s"]))
    run = dict(ordered[len(ordered) // 2])
    run["decode_tok_s_rounds"] = [r["decode_tok_s"] for r in runs]
    run["decode_s_all_rounds"] = sum(r["decode_s"] for r in runs)
    return run


def run_context(
    args: argparse.Namespace, context: int, batches: list[int], started: float
) -> dict[str, Any]:
    """Every engine at one context length, one at a time on one core:
    prefill, then interleaved rounds (module docstring)."""

    def say(text: str) -> None:
        print(
            f"  [{time.perf_counter() - started:6.0f} s] {context}: {text}", flush=True
        )

    # Started one at a time: started together (weights loading, INFINIGEN's
    # calibration), the third found too little free memory for its KV cache.
    engines: list[Engine] = []
    ready: list[dict[str, Any]] = []

    def start(kind: str, core: int, block_size: int) -> Engine:
        engine = Engine(args, kind, context, core=core, block_size=block_size)
        engines.append(engine)
        ready.append(engine.read("ready"))
        return engine

    def only(engine: Engine) -> None:
        """Let ``engine`` run; stop every other."""
        for other in engines:
            if other is not engine:
                other.hold(True)
        engine.hold(False)

    try:
        ours = start("infinigen", ENGINE_CORE, args.block_size or 0)
        ours.hold(True)
        our_block = int(ready[0]["block_size"])
        bases = []
        for size in baseline_sizes(args.baseline_block_sizes, our_block):
            bases.append(start(BASELINE, ENGINE_CORE, size))
            bases[-1].hold(True)
        say(
            "engines ready ("
            + ", ".join(
                f"{e.name} {r['seconds']:.0f} s"
                for e, r in zip(engines, ready, strict=True)
            )
            + ")"
        )
        prefill: dict[str, dict[str, Any]] = {}
        for engine in engines:  # alone, each on the same core
            only(engine)
            prefill[engine.name] = engine.ask("prefilled", cmd="prefill")
        say(
            f"prefilled {args.max_batch_of[context]} prompts ("
            + ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in prefill.items())
            + ")"
        )
        shapes = []
        for batch in batches:
            rounds: dict[str, list[dict[str, Any]]] = {b.name: [] for b in bases}
            rounds.update({p: [] for p in args.policies})
            for _ in range(args.repeats):
                for base in bases:
                    only(base)  # the waiting engines take no core
                    rounds[base.name].append(
                        base.ask("measured", cmd="measure", batch=batch)
                    )
                only(ours)
                for policy in args.policies:
                    rounds[policy].append(
                        ours.ask("measured", cmd="measure", batch=batch, policy=policy)
                    )
                say(
                    f"x{batch}: "
                    + ", ".join(
                        f"{name} {runs[-1]['decode_tok_s']:.2f}"
                        for name, runs in rounds.items()
                    )
                    + " tok/s"
                )
            runs = {name: median_run(r) for name, r in rounds.items()}
            # The non-KV part of the step, in the fastest vLLM engine.
            fastest = max(bases, key=lambda b: runs[b.name]["decode_tok_s"])
            only(fastest)
            short = [
                fastest.ask("measured", cmd="short", batch=batch)
                for _ in range(args.repeats)
            ]
            shapes.append(
                {
                    "context": context,
                    "batch": batch,
                    "runs": runs,
                    "short": median_run(short),
                    "short_from": fastest.name,
                }
            )
        for engine in engines:
            engine.hold(False)
        return {
            "context": context,
            "ready_s": {
                e.name: r["seconds"] for e, r in zip(engines, ready, strict=True)
            },
            "prefill": prefill,
            "ttft_pair": [bases[0].name, ours.name],
            "infinigen_block_size": our_block,
            "shapes": shapes,
        }
    finally:
        for engine in engines:
            engine.close()


def kv_bytes(stats: dict[str, Any], num_layers: int) -> dict[str, float]:
    """Counted KV bytes per decoded token (one request's step): ``full``
    reads every block of every layer; ``read`` is what the policy read
    (selected blocks in its sparse layers, every block in its dense layers).
    Normalised by the counted decode requests, not steps, because the
    requests of a batch may start decoding one step apart."""
    total = stats["total"]
    sparse = max(len(stats["layers"]), 1)
    tokens = total["decode_requests"] / sparse  # decode requests per layer
    block = stats["block_bytes"]
    blocks_per_layer = total["blocks_total"] / max(tokens * sparse, 1)
    selected = total["kv_bytes_read"] / max(tokens, 1)
    dense_layers = (num_layers - sparse) * blocks_per_layer * block
    return {
        "full": blocks_per_layer * block * num_layers,
        "read": selected + dense_layers,
        "selected_blocks_per_layer": total["blocks_selected"] / max(tokens * sparse, 1),
        "blocks_per_layer": blocks_per_layer,
    }


def prefix_agreement(ref: list[list[int]], other: list[list[int]]) -> float:
    """Mean share of each request's greedy tokens that match ``ref`` before
    the first difference."""
    from vllm_infinigen.method.agreement import prefix_agreement as one

    shares = [one(a, b) for a, b in zip(ref, other, strict=True)]
    return sum(shares) / max(len(shares), 1)


def summarise(
    shape: dict[str, Any], num_layers: int, gbps: float, our_block: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Measured rows (vLLM's engines first, then each policy) and modelled
    transfer rows of one shape. Ratios are against the fastest vLLM engine
    (``speed_ratio``) and against vLLM at INFINIGEN's block size
    (``vs_same_block``, where that engine ran)."""
    context, batch = shape["context"], shape["batch"]
    runs = shape["runs"]
    bases = {name: run for name, run in runs.items() if is_baseline(name)}
    best = max(bases, key=lambda name: bases[name]["decode_tok_s"])
    ref = bases[best]
    same = bases.get(baseline_name(our_block))
    step = batch / ref["decode_tok_s"]  # seconds per decode step
    rest = min(batch / shape["short"]["decode_tok_s"], step)
    kv_part = step - rest
    counted = {
        p: kv_bytes(r["stats"], num_layers) for p, r in runs.items() if "stats" in r
    }
    full_token = max(c["full"] for c in counted.values())
    full_step = full_token * batch
    link = gbps * 1e9
    common = {"context": context, "batch": batch}
    measured = [
        {
            **common,
            "policy": name,
            "decode_tok_s": run["decode_tok_s"],
            "step_s": batch / run["decode_tok_s"],
            "speed_ratio": run["decode_tok_s"] / ref["decode_tok_s"],
            "fastest_vllm": name == best,
            "kv_bytes_per_token": full_token,
            "bytes_ratio": 1.0,
            "ceiling": 1.0,
            "kv_part_of_step": kv_part / step,
        }
        for name, run in bases.items()
    ]
    modelled = [
        {
            **common,
            "policy": FULL_FETCH,
            "bytes_per_step": full_step,
            "transfer_ms_per_step": full_step / link * 1e3,
            "full_over_policy": 1.0,
        }
    ]
    for policy, run in runs.items():
        if policy in bases:
            continue
        c = counted[policy]
        total = run["stats"]["total"]
        decode_s = max(run["decode_s"], 1e-9)
        share = c["read"] / max(c["full"], 1.0)
        measured.append(
            {
                **common,
                "policy": policy,
                "decode_tok_s": run["decode_tok_s"],
                "step_s": batch / run["decode_tok_s"],
                "speed_ratio": run["decode_tok_s"] / ref["decode_tok_s"],
                "vs_same_block": (
                    None if same is None else run["decode_tok_s"] / same["decode_tok_s"]
                ),
                "kv_bytes_per_token": c["read"],
                "bytes_ratio": share,
                "ceiling": step / (rest + share * kv_part),
                "selection_fraction": total["selection_fraction"],
                "selected_blocks_per_layer_token": c["selected_blocks_per_layer"],
                "dense_step_share": total["dense_steps"] / max(total["steps"], 1),
                "speculation_share": total["speculation_s"] / decode_s,
                "swap_share": total["swap_s"] / decode_s,
                "attention_share": total["attention_s"] / decode_s,
                "greedy_prefix_agreement": prefix_agreement(
                    ref["token_ids"], run["token_ids"]
                ),
            }
        )
        modelled.append(
            {
                **common,
                "policy": policy,
                "bytes_per_step": c["read"] * batch,
                "transfer_ms_per_step": c["read"] * batch / link * 1e3,
                "full_over_policy": full_token / max(c["read"], 1.0),
            }
        )
    return measured, modelled


#: One colour per series in every panel.
COLOURS = {
    FULL_FETCH: "#4d4d4d",
    "dense": "#9e9e9e",
    "infinigen": "#d62728",
    "quest": "#1f77b4",
    "h2o": "#2ca02c",
    "streaming": "#ff7f0e",
    STAGED: "#8c564b",
}
#: vLLM's engines in greys, the first (its default block size) darkest.
BASELINE_GREYS = ("#4d4d4d", "#7a7a7a", "#b0b0b0", "#d0d0d0")


def colour(name: str, bases: list[str]) -> str | None:
    if name in bases:
        return BASELINE_GREYS[bases.index(name) % len(BASELINE_GREYS)]
    return COLOURS.get(name)


def label(name: str) -> str:
    if is_baseline(name):
        return f"vLLM's backend, block {name.split('-', 1)[1]}"
    return "full-KV fetch" if name == FULL_FETCH else name


def plot(
    measured: list[dict[str, Any]],
    modelled: list[dict[str, Any]],
    ttft: list[dict[str, Any]],
    gbps: float,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["context"], r["batch"]) for r in measured})
    bases = list(
        dict.fromkeys(r["policy"] for r in measured if is_baseline(r["policy"]))
    )
    labels = [f"{c // 1024}K x{b}" for c, b in configs]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))

    def bars(
        ax: Any, rows: list[dict[str, Any]], key: str, names: list[str], scale: float
    ) -> list[Any]:
        width = 0.8 / max(len(names), 1)
        drawn = []
        for j, name in enumerate(names):
            values = [
                next(
                    (
                        r[key] * scale
                        for r in rows
                        if (r["context"], r["batch"]) == cfg and r["policy"] == name
                    ),
                    float("nan"),
                )
                for cfg in configs
            ]
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(configs))]
            drawn.append(
                ax.bar(
                    xs,
                    values,
                    width,
                    label=label(name),
                    color=colour(name, bases),
                )
            )
        ax.set_xticks(range(len(configs)), labels)
        ax.legend(fontsize=8)
        return drawn

    policies = list(dict.fromkeys(r["policy"] for r in measured))
    ax = axes[0][0]
    bars(ax, measured, "speed_ratio", policies, 1.0)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("decode tokens/s / fastest vLLM engine")
    ax.set_title("Measured decode speed vs the faster vLLM block size (CPU, same run)")
    ax = axes[0][1]
    bars(ax, measured, "kv_bytes_per_token", policies, 1e-6)
    ax.set_ylabel("MB of KV read per decoded token")
    ax.set_title("Measured (engine counters) KV bytes per decoded token")
    ax = axes[1][0]
    names = list(dict.fromkeys(r["policy"] for r in modelled))
    drawn = bars(ax, modelled, "transfer_ms_per_step", names, 1.0)
    for name, container in zip(names, drawn, strict=True):
        if name == FULL_FETCH:
            continue
        ratios = [
            next(
                (
                    r["full_over_policy"]
                    for r in modelled
                    if (r["context"], r["batch"]) == cfg and r["policy"] == name
                ),
                float("nan"),
            )
            for cfg in configs
        ]
        ax.bar_label(container, [f"{x:.1f}x" for x in ratios], fontsize=6)
    ax.set_ylabel("ms per decode step (modelled)")
    ax.set_title(
        f"MODELLED host-to-device KV transfer per step at {gbps:g} GB/s\n"
        "(counted bytes / bandwidth; labels: full-KV time / policy time)"
    )
    ax = axes[1][1]
    xs = list(range(len(ttft)))
    ax.bar(
        [x - 0.18 for x in xs],
        [r["baseline_ttft_s"] for r in ttft],
        0.36,
        label=label(ttft[0]["baseline"]) if ttft else "vLLM",
        color=BASELINE_GREYS[0],
    )
    ax.bar(
        [x + 0.18 for x in xs],
        [r["infinigen_ttft_s"] for r in ttft],
        0.36,
        label="INFINIGEN engine",
        color=COLOURS["infinigen"],
    )
    ax.set_xticks(xs, [f"{r['context'] // 1024}K" for r in ttft])
    ax.set_xlim(-0.8, len(xs) - 0.2)
    ax.set_ylabel("seconds")
    ax.set_title("Measured time to first token (one cold prompt)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Plain text table: (header, key, format) per column."""
    head = " | ".join(h for h, _, _ in columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            value = r.get(key)
            cells.append("-" if value is None else format(value, fmt))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def parse_shapes(values: list[str]) -> dict[int, list[int]]:
    """``["16384x4", "8192x4", "8192x8"]`` -> ``{16384: [4], 8192: [4, 8]}``
    (contexts in the order given: the run measures them in that order)."""
    plan: dict[int, list[int]] = {}
    for value in values:
        context, _, batch = value.lower().partition("x")
        plan.setdefault(int(context), []).append(int(batch))
    return {c: sorted(set(b)) for c, b in plan.items()}


def estimate_s(
    plan: dict[int, list[int]], policies: int, args: argparse.Namespace
) -> float:
    """Rough run time on this machine: ~20 s of start per engine, prefill of
    every prompt in each engine alone (about 160 tokens/s at 8K x4, slower
    for longer contexts), and per round a timed and (first time) a warm-up
    decode per policy and vLLM engine, at ~0.1 s per step plus ~3 ms per
    request and 1K tokens of context."""
    engines = len(set(args.baseline_block_sizes)) + 1
    total = 0.0
    for context, batches in plan.items():
        rate = 160 * (8192 / context) ** 0.5
        total += engines * (20 + max(batches) * context / rate)
        for batch in batches:
            step = 0.1 + 0.003 * batch * context / 1024
            runs = (policies + engines - 1) * (args.repeats + 1) + args.repeats
            total += runs * (args.decode_tokens * step + 2)
    return total


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["2048x1", "8192x4", "8192x8"],
        help="context x batch, e.g. 16384x4",
    )
    parser.add_argument(
        "--policies", nargs="+", default=list(SERIES), help="series to measure"
    )
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved timed rounds, median kept"
    )
    parser.add_argument(
        "--pcie-gbps",
        type=float,
        default=25.0,
        help="modelled host-to-device GB/s (1e9 bytes), PCIe 4.0 x16 effective",
    )
    parser.add_argument("--options", default="{}", help="JSON infinigen options")
    parser.add_argument("--dtype", default="float32", help="float32 on AVX2 CPUs")
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="INFINIGEN's KV block size (default: its own choice on this "
        "machine, from timing vLLM's kernel at start-up)",
    )
    parser.add_argument(
        "--baseline-block-sizes",
        type=int,
        nargs="+",
        default=None,
        help="one vLLM engine per block size, the fastest taken as the "
        f"baseline (0: vLLM's default, {VLLM_CPU_BLOCK_SIZE} on CPU; -1: "
        "INFINIGEN's block size; default: 0 -1)",
    )
    parser.add_argument(
        "--kvcache-gib",
        type=int,
        default=2,
        help="VLLM_CPU_KVCACHE_SPACE (GiB) of every engine (16K x4 needs 1.5)",
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="every engine with --enforce-eager (default: vLLM's compilation, "
        "as users get it; INFINIGEN keeps it when reading in place)",
    )
    parser.add_argument("--model", default=None, help="model directory")
    parser.add_argument(
        "--quick", action="store_true", help="2K x1 and x4, 16 tokens, 2 rounds"
    )
    parser.add_argument("--plan", action="store_true", help="print the plan, exit")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--child", choices=(BASELINE, "infinigen"), help=argparse.SUPPRESS
    )
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # SIGTERM ends the run through the engines' ``close`` (``finally``), so
    # that no stopped engine outlives it.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if args.model is None:
        from vllm_infinigen.models import DEFAULT_MODEL, build_model

        args.model = str(build_model(DEFAULT_MODEL))
    if args.child:
        run_child(args)
        return
    if args.baseline_block_sizes is None:
        args.baseline_block_sizes = [0, -1]
    try:
        baseline_sizes(args.baseline_block_sizes, our_block=1)
    except ValueError as error:
        parser.error(str(error))
    if args.quick:
        args.shapes, args.decode_tokens, args.repeats = ["2048x1", "2048x4"], 16, 2
    out = Path(
        args.out or RESULTS / ("speed_quick.json" if args.quick else "speed.json")
    )
    unknown = set(args.policies) - set(SERIES)
    if unknown:
        parser.error(f"unknown series {sorted(unknown)}; known: {list(SERIES)}")
    plan = parse_shapes(args.shapes)
    args.max_batch_of = {c: max(b) for c, b in plan.items()}
    guess = estimate_s(plan, len(args.policies), args)
    print(
        "plan: "
        + ", ".join(f"{c} x{b}" for c, bs in plan.items() for b in bs)
        + f"\npolicies {args.policies} at budget {args.budget}, "
        f"{args.decode_tokens} decode tokens, {args.repeats} rounds; "
        f"estimated {guess / 60:.0f} min",
        flush=True,
    )
    if args.plan:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(args.model) / "config.json").read_text())
    num_layers = int(config["num_hidden_layers"])
    started = time.perf_counter()
    args.commit = commit()
    measured: list[dict[str, Any]] = []
    modelled: list[dict[str, Any]] = []
    ttft: list[dict[str, Any]] = []
    contexts: list[dict[str, Any]] = []
    failures: list[str] = []
    for context, batches in plan.items():
        try:
            result = run_context(args, context, batches, started)
        except RuntimeError as error:  # keep the other contexts' results
            print(error, file=sys.stderr, flush=True)
            failures.append(str(error))
            continue
        pair = result["ttft_pair"]
        base, ours = (result["prefill"][name] for name in pair)
        ttft.append(
            {
                "context": context,
                "baseline": pair[0],
                "baseline_ttft_s": base["ttft_s"],
                "infinigen_ttft_s": ours["ttft_s"],
                "ratio": ours["ttft_s"] / base["ttft_s"],
                "cold": base["cached_tokens"] == 0 and ours["cached_tokens"] == 0,
            }
        )
        for shape in result["shapes"]:
            rows, model_rows = summarise(
                shape, num_layers, args.pcie_gbps, result["infinigen_block_size"]
            )
            measured += rows
            modelled += model_rows
            for run in [*shape["runs"].values(), shape["short"]]:
                run.pop("token_ids", None)
        contexts.append(result)
        report(args, out, started, guess, measured, modelled, ttft, contexts, failures)
    if failures:
        sys.exit(f"{len(failures)} context(s) failed; see 'failures' in {out}")


def report(
    args: argparse.Namespace,
    out: Path,
    started: float,
    guess: float,
    measured: list[dict[str, Any]],
    modelled: list[dict[str, Any]],
    ttft: list[dict[str, Any]],
    contexts: list[dict[str, Any]],
    failures: list[str],
) -> None:
    """Print the tables and write the JSON and plot of what is measured so
    far (called after every context, so a stopped run keeps its results)."""
    seconds = time.perf_counter() - started
    for r in measured:
        r["kv_mb_per_token"] = r["kv_bytes_per_token"] / 1e6
    measured_cols = [
        ("context", "context", "d"),
        ("batch", "batch", "d"),
        ("policy", "policy", "<10"),
        ("tok/s", "decode_tok_s", ".2f"),
        ("vs dense vLLM", "speed_ratio", ".2f"),
        ("ceiling", "ceiling", ".2f"),
        ("KV MB/token", "kv_mb_per_token", ".2f"),
        ("bytes / full", "bytes_ratio", ".3f"),
        ("selection share", "speculation_share", ".3f"),
        ("greedy agree", "greedy_prefix_agreement", ".2f"),
    ]
    model_rows_mb = [{**r, "mb": r["bytes_per_step"] / 1e6} for r in modelled]
    model_cols = [
        ("context", "context", "d"),
        ("batch", "batch", "d"),
        ("fetch", "policy", "<13"),
        ("MB/step", "mb", ".1f"),
        ("ms/step", "transfer_ms_per_step", ".3f"),
        ("full / this", "full_over_policy", ".2f"),
    ]
    ttft_cols = [
        ("context", "context", "d"),
        ("dense vLLM s", "baseline_ttft_s", ".2f"),
        ("INFINIGEN s", "infinigen_ttft_s", ".2f"),
        ("ratio", "ratio", ".3f"),
    ]
    print("\nMeasured decode (CPU, this run):\n" + table(measured, measured_cols))
    print(
        f"\nMODELLED transfer per decode step at {args.pcie_gbps:g} GB/s "
        "(counted bytes / bandwidth):\n" + table(model_rows_mb, model_cols)
    )
    print("\nMeasured time to first token, one cold prompt:\n" + table(ttft, ttft_cols))
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
                "machine": cpu_model(),
                "commit": args.commit,
                "model": args.model,
                "dtype": args.dtype,
                "compiled": not args.eager,
                "seconds": seconds,
                "estimated_seconds": guess,
                "policies": args.policies,
                "budget": args.budget,
                "decode_tokens": args.decode_tokens,
                "repeats": args.repeats,
                "options": json.loads(args.options),
                "kvcache_gib": args.kvcache_gib,
                "measured": measured,
                "ttft": ttft,
                "transfer_model": {
                    "modelled": True,
                    "pcie_gbps": args.pcie_gbps,
                    "note": (
                        "Modelled, not measured: per decode step, counted KV "
                        "bytes / host-to-device bandwidth. 'full-KV fetch' moves "
                        "every layer's whole KV of the batch (offloading without "
                        "selection, as FlexGen); a policy moves its selected "
                        "blocks in sparse layers and the whole KV of dense layers. "
                        "Compute and speculation are not modelled."
                    ),
                    "rows": modelled,
                },
                "contexts": contexts,
                "failures": failures,
            },
            indent=2,
        )
    )
    print(f"\n{seconds / 60:.1f} min (estimated {guess / 60:.0f} min)")
    if measured:
        plot(measured, modelled, ttft, args.pcie_gbps, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    else:
        print(f"wrote {out} (no measurements: no plot)")


if __name__ == "__main__":
    main()
