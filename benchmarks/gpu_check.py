"""One-shot GPU check of the CUDA tier's torch-only modules.

The modules are ``vllm_infinigen/engine/cuda_pool.py`` (pinned host pool),
``cuda_copy.py`` (planner, Triton gather and scatter) and ``cuda_swap.py``
(swap engine, counters); what the checks found belongs in ``docs/cuda.md``,
"GPU check". Torch and Triton only (no vLLM, no FlashAttention package, no
network). Each
check writes its own section of the JSON (``ok``: true, false, or null when
skipped with a ``skipped`` reason; ``error``: the traceback when it raised),
and the run goes on when one fails. The file is rewritten after every check,
so a run cut short still leaves what it measured.

Checks:

1. ``pool``: ``cudaHostRegister`` of an exact-size buffer, ``is_pinned``,
   the device view aliasing the host memory (pointers, writes both ways),
   a copying view function refused, release idempotent.
2. ``scatter``: rows written into the pool by index (``-1`` skipped), read
   back on the host.
3. ``gather``: correctness and GB/s at 64 KiB (16 tokens x 8 KV heads x 128
   x K,V x bf16) and 8 KiB blocks: the Triton gather over a sweep of grid
   sizes and step sizes, a full fetch (contiguous pinned ``copy_`` of the
   same bytes), ``index_select`` on the UVA view (uint8 and int64), and the
   Triton gather from device memory.
4. ``overlap``: the gather on the side stream next to a bf16 matmul loop.
5. ``graph``: plan + fork/join gather captured in a CUDA graph, replayed
   with new ids written into the persistent input buffers.
6. ``attention``: attention over the staging buffer through the compact
   table and sparse lengths equals attention over the blocks read straight
   from the pool.
7. ``no_host_sync``: plan, gather, scatter, swap start/wait and counters
   under ``torch.cuda.set_sync_debug_mode("error")``.
8. ``decode_model``: a decode step at Llama-3-8B shapes (32 layers, 32 query
   and 8 KV heads, head dim 128, bf16, block 16) for 32K x 8 and 128K x 1:
   all KV on the GPU, full fetch from host per layer (serial, and one layer
   ahead on the side stream), and 20% of the blocks gathered one layer
   ahead; ms per step and ratios.

Also ``env`` (device, versions) and ``pcie`` (pinned copy bandwidth)::

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --small --out /tmp/check.json

``--small`` runs every check at tiny shapes; ``--device cpu`` runs the torch
paths and skips what needs CUDA, with the reason recorded. The run keeps to
``--budget-s`` (default 420 s): checks left when it is spent are skipped.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vllm_infinigen.engine import cuda_copy, cuda_pool, cuda_swap  # noqa: E402
from vllm_infinigen.engine.cuda_copy import PAD, CopyLaunch  # noqa: E402

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
CHECKS = (
    "env",
    "pcie",
    "pool",
    "scatter",
    "gather",
    "overlap",
    "graph",
    "attention",
    "no_host_sync",
    "decode_model",
)


class Skipped(Exception):
    """A check that cannot run here (the message says why)."""


class Ctx:
    """What every check gets: the device, the size mode and the clock."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        self.small = args.small
        self.out = Path(args.out)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.results: dict[str, Any] = {"checks": {}}
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def need_cuda(self, what: str) -> None:
        if not self.cuda:
            raise Skipped(f"{what} needs CUDA (this run: --device {self.device})")

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.start
        print(f"[gpu_check {elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        tmp.replace(self.out)


def wall(ctx: Ctx, fn: Callable[[], object], iters: int, warmup: int = 1) -> float:
    """Seconds per call of ``fn`` (device work included), wall clock."""
    for _ in range(warmup):
        fn()
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    ctx.sync()
    return (time.perf_counter() - t0) / iters


def gbps(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else float("nan")


class CpuPool:
    """``--device cpu`` stand-in for :class:`cuda_pool.PinnedHostPool`: the host
    buffer and the "device view" are one CPU tensor."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.host = torch.zeros(nbytes, dtype=torch.uint8)
        self.device_view = self.host
        self.register_s = 0.0

    layer_views = cuda_pool.PinnedHostPool.layer_views

    def release(self) -> None:
        pass


def make_pool(ctx: Ctx, nbytes: int) -> Any:
    if ctx.cuda:
        return cuda_pool.PinnedHostPool(nbytes, ctx.device)
    return CpuPool(nbytes)


def block_rows(pool: Any, num_blocks: int, block_bytes: int) -> torch.Tensor:
    """``[num_blocks, block_bytes]`` uint8 rows of the pool's device view."""
    return pool.layer_views(1, num_blocks, (block_bytes,))[0]


def random_ids(ctx: Ctx, n: int, num_blocks: int, skip_every: int) -> torch.Tensor:
    """``n`` distinct block ids in random order, every ``skip_every``-th -1."""
    ids = torch.randperm(num_blocks, generator=ctx.gen)[:n].clone()
    if skip_every:
        ids[::skip_every] = PAD
    return ids


# --------------------------------------------------------------------------
# Checks


def check_env(ctx: Ctx) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(ctx.device),
        "small": ctx.small,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "mem_available_gib": round(mem_available() / GIB, 1),
        "copy_launch_defaults": dataclasses.asdict(CopyLaunch()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not importable: {exc}"
    if ctx.cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        props = torch.cuda.get_device_properties(ctx.device)
        index = ctx.device.index or 0
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            total_memory_gib=round(props.total_memory / GIB, 1),
            driver_version=driver_version(),
            can_use_host_pointer_for_registered_mem=(
                cuda_pool.can_use_host_pointer_for_registered_mem(index)
            ),
        )
    return info


def mem_available() -> int:
    """Host bytes available: MemAvailable, capped by a cgroup v2 limit."""
    available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * KIB
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def driver_version() -> int | None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        value = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(value)) == 0:
            return int(value.value)
    except OSError:
        pass
    return None


def check_pcie(ctx: Ctx) -> dict[str, Any]:
    ctx.need_cuda("a pinned copy")
    nbytes = 4 * MIB if ctx.small else 256 * MIB
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    iters = 3 if ctx.small else 10
    h2d = wall(ctx, lambda: dev.copy_(host, non_blocking=True), iters)
    d2h = wall(ctx, lambda: host.copy_(dev, non_blocking=True), iters)
    h2d_pageable = wall(ctx, lambda: dev.copy_(pageable), max(1, iters // 3))
    return {
        "bytes": nbytes,
        "h2d_pinned_gbps": gbps(nbytes, h2d),
        "d2h_pinned_gbps": gbps(nbytes, d2h),
        "h2d_pageable_gbps": gbps(nbytes, h2d_pageable),
    }


def check_pool(ctx: Ctx) -> dict[str, Any]:
    if not ctx.cuda:
        try:
            cuda_pool.PinnedHostPool(4096, "cuda")
        except RuntimeError as exc:
            raise Skipped(f"needs CUDA; without it the pool says: {exc}") from exc
        raise RuntimeError("PinnedHostPool constructed without CUDA")
    # Not a page multiple: the pool must still cover its last byte exactly.
    nbytes = (1 * MIB if ctx.small else 64 * MIB) + 123
    pool = cuda_pool.PinnedHostPool(nbytes, ctx.device)
    out: dict[str, Any] = {
        "nbytes": nbytes,
        "register_s": round(pool.register_s, 4),
        "is_pinned": pool.is_pinned,
        "host_pointer_ok": pool.host_pointer_ok,
        "host_ptr": hex(pool.host.data_ptr()),
        "view_ptr": hex(pool.device_view.data_ptr()),
        "mapped_device_ptr": _hex(
            cuda_pool.mapped_device_pointer(pool.host.data_ptr())
        ),
        "view_device": str(pool.device_view.device),
        "host_page_aligned": pool.host.data_ptr() % os.sysconf("SC_PAGE_SIZE") == 0,
    }
    out["aliased"] = pool.device_view.data_ptr() == pool.host.data_ptr()
    # Kernels (elementwise casts) read and write through the view; that is
    # what the gather and the attention kernels do.
    half = nbytes // 2
    pattern = torch.randint(0, 256, (half,), dtype=torch.uint8, generator=ctx.gen)
    pool.host[:half].copy_(pattern)
    seen_on_device = pool.device_view[:half].to(torch.int16)
    ctx.sync()
    out["host_write_seen_on_device"] = torch.equal(
        seen_on_device.cpu(), pattern.to(torch.int16)
    )
    rest = nbytes - half
    on_device = torch.randint(0, 256, (rest,), dtype=torch.int16, device=ctx.device)
    pool.device_view[half:].copy_(on_device)  # int16 -> uint8: a kernel
    ctx.sync()
    out["device_write_seen_on_host"] = torch.equal(
        pool.host[half:], on_device.cpu().to(torch.uint8)
    )
    out["last_byte_ok"] = int(pool.host[-1]) == int(on_device[-1])
    # cudaMemcpy (copy_ between same-dtype CUDA tensors) through the view:
    # informational, the tier does not depend on it.
    try:
        copied = pool.device_view[:half].clone()
        ctx.sync()
        out["memcpy_from_view_ok"] = torch.equal(copied.cpu(), pattern)
    except RuntimeError as exc:
        out["memcpy_from_view_ok"] = f"error: {exc}"
    views = pool.layer_views(2, 4, (16, 2, 8), torch.bfloat16)
    out["layer_views_ok"] = (
        views[1].shape == (4, 16, 2, 8)
        and views[1].device.type == "cuda"
        and views[1].data_ptr() - views[0].data_ptr() == 4 * 16 * 2 * 8 * 2
        and views[0][1].is_contiguous()
    )
    try:
        cuda_pool.PinnedHostPool(4096, ctx.device, view_fn=lambda h: h.to(ctx.device))
        out["copying_view_refused"] = False
    except RuntimeError:
        out["copying_view_refused"] = True
    pool.release()
    pool.release()
    out["released"] = pool.released
    out["is_pinned_after_release"] = bool(pool.host.is_pinned())
    out["ok"] = all(
        out[key]
        for key in (
            "is_pinned",
            "aliased",
            "host_write_seen_on_device",
            "device_write_seen_on_host",
            "last_byte_ok",
            "layer_views_ok",
            "copying_view_refused",
            "released",
        )
    )
    return out


def _hex(value: int | None) -> str | None:
    return None if value is None else hex(value)


def check_scatter(ctx: Ctx) -> dict[str, Any]:
    block_bytes = 1 * KIB if ctx.small else 64 * KIB
    num_blocks, n = (32, 12) if ctx.small else (512, 200)
    pool = make_pool(ctx, num_blocks * block_bytes)
    out: dict[str, Any] = {"block_bytes": block_bytes, "rows": n}
    try:
        rows = block_rows(pool, num_blocks, block_bytes)
        host_rows = pool.host.view(num_blocks, block_bytes)
        results = {}
        for name, use_triton in _paths(ctx):
            pool.host.fill_(0xEE)
            ids = random_ids(ctx, n, num_blocks, skip_every=5)
            src = torch.randint(0, 256, (n, block_bytes), dtype=torch.uint8)
            cuda_copy.scatter_blocks(
                src.to(ctx.device), ids.to(ctx.device), rows, use_triton=use_triton
            )
            ctx.sync()
            kept = ids >= 0
            written = torch.equal(host_rows[ids[kept]], src[kept])
            untouched = torch.ones(num_blocks, dtype=torch.bool)
            untouched[ids[kept]] = False
            clean = bool((host_rows[untouched] == 0xEE).all())
            results[name] = {"written": written, "others_untouched": clean}
        # Typed paged views (bf16 tokens) go through as_block_rows.
        per_token = block_bytes // (16 * 2 * _itemsize(_dtype(ctx)))
        typed = pool.layer_views(1, num_blocks, (16, 2, per_token), _dtype(ctx))[0]
        tokens = torch.randn(3, *typed.shape[1:], dtype=_dtype(ctx), generator=ctx.gen)
        cuda_copy.scatter_blocks(
            tokens.to(ctx.device), torch.tensor([7, -1, 2], device=ctx.device), typed
        )
        ctx.sync()
        typed_host = pool.host.view(_dtype(ctx)).view(num_blocks, *typed.shape[1:])
        results["typed"] = {
            "written": torch.equal(typed_host[7], tokens[0])
            and torch.equal(typed_host[2], tokens[2])
        }
        out["paths"] = results
        out["ok"] = all(all(v.values()) for v in results.values())
    finally:
        pool.release()
    return out


def _paths(ctx: Ctx) -> list[tuple[str, bool | None]]:
    """Copy paths to run: Triton and torch on CUDA, torch on CPU."""
    return [("triton", True), ("torch", False)] if ctx.cuda else [("torch", False)]


def _dtype(ctx: Ctx) -> torch.dtype:
    return torch.bfloat16 if ctx.cuda else torch.float32


def check_gather(ctx: Ctx) -> dict[str, Any]:
    pool_bytes = 2 * MIB if ctx.small else 1 * GIB
    pool = make_pool(ctx, pool_bytes)
    out: dict[str, Any] = {"pool_bytes": pool_bytes, "register_s": pool.register_s}
    try:
        reference = torch.randint(
            0, 256, (pool_bytes,), dtype=torch.uint8, device=ctx.device
        )
        pool.host.copy_(reference)  # device -> pinned host, a plain DMA
        sizes = {"64KiB": 64 * KIB, "8KiB": 8 * KIB}
        ok = True
        for name, block_bytes in sizes.items():
            section = _gather_case(ctx, pool, reference, block_bytes)
            ok = ok and section.pop("ok")
            out[name] = section
        out["ok"] = ok
    finally:
        pool.release()
    return out


def _gather_case(
    ctx: Ctx, pool: Any, reference: torch.Tensor, block_bytes: int
) -> dict[str, Any]:
    num_blocks = pool.nbytes // block_bytes
    n = max(4, num_blocks // 4)  # a quarter of the pool, random order
    ids_cpu = random_ids(ctx, n, num_blocks, skip_every=50)
    ids = ids_cpu.to(ctx.device)
    kept = ids >= 0
    moved = int(kept.sum()) * block_bytes
    rows = block_rows(pool, num_blocks, block_bytes)
    ref_rows = reference[: num_blocks * block_bytes].view(num_blocks, block_bytes)
    expected = ref_rows[ids[kept]]
    dst = torch.empty(n, block_bytes, dtype=torch.uint8, device=ctx.device)
    iters = 2 if ctx.small else 5
    out: dict[str, Any] = {"rows": n, "bytes_moved": moved, "timings_gbps": {}}
    correct: dict[str, bool] = {}

    def run_and_check(label: str, fn: Callable[[], object], nbytes: int) -> None:
        dst.fill_(0x5A)
        fn()
        ctx.sync()
        same = torch.equal(dst[kept], expected)
        untouched = bool((dst[~kept] == 0x5A).all())
        # index_select reads block 0 for the -1 rows (clamped ids).
        correct[label] = same and (untouched or label.startswith("index_select"))
        out["timings_gbps"][label] = gbps(nbytes, wall(ctx, fn, iters))

    for path, use_triton in _paths(ctx):
        run_and_check(
            path,
            lambda u=use_triton: cuda_copy.gather_blocks(rows, ids, dst, use_triton=u),
            moved,
        )
    if ctx.cuda:
        sms = torch.cuda.get_device_properties(ctx.device).multi_processor_count
        programs = [8, 16] if ctx.small else [16, 32, 64, sms, 2 * sms, 4 * sms]
        steps = [512, 2048] if ctx.small else [1024, 2048, 4096]
        sweep = {}
        for p in programs:
            for w in steps:
                if ctx.left_s() < 120:
                    out["sweep_cut_short"] = "time budget"
                    break
                label = f"triton_p{p}_w{w}"
                run_and_check(
                    label,
                    lambda p=p, w=w: cuda_copy.gather_blocks(
                        rows, ids, dst, launch=CopyLaunch(p, w)
                    ),
                    moved,
                )
                sweep[label] = out["timings_gbps"].pop(label)
        out["triton_sweep_gbps"] = sweep
        if sweep:
            best = max(sweep, key=lambda k: sweep[k])
            out["triton_best"] = {"config": best, "gbps": sweep[best]}
        clamped = ids.clamp(min=0)
        run_and_check(
            "index_select_uint8",
            lambda: torch.index_select(rows, 0, clamped, out=dst),
            moved,
        )
        if block_bytes % 8 == 0:
            rows64, dst64 = rows.view(torch.int64), dst.view(torch.int64)
            run_and_check(
                "index_select_int64",
                lambda: torch.index_select(rows64, 0, clamped, out=dst64),
                moved,
            )
        # The same bytes as one contiguous DMA from pinned memory.
        flat = torch.empty(moved, dtype=torch.uint8, device=ctx.device)
        host = pool.host[:moved]
        out["timings_gbps"]["full_fetch_copy"] = gbps(
            moved, wall(ctx, lambda: flat.copy_(host, non_blocking=True), iters)
        )
        # The Triton gather from device memory (HBM reference).
        out["timings_gbps"]["triton_from_device_memory"] = gbps(
            moved, wall(ctx, lambda: cuda_copy.gather_blocks(ref_rows, ids, dst), iters)
        )
    out["correct"] = correct
    out["ok"] = all(correct.values())
    return out


def check_overlap(ctx: Ctx) -> dict[str, Any]:
    ctx.need_cuda("stream overlap")
    block_bytes = 64 * KIB
    n = 16 if ctx.small else 4096  # 256 MiB per gather
    num_blocks = 2 * n
    pool = cuda_pool.PinnedHostPool(num_blocks * block_bytes, ctx.device)
    try:
        rows = block_rows(pool, num_blocks, block_bytes)
        reqs = 8 if n % 8 == 0 else 1
        host_ids = (
            random_ids(ctx, n, num_blocks, 0).view(reqs, n // reqs).to(ctx.device)
        )
        counts = torch.full((reqs,), n // reqs, device=ctx.device)
        plan = cuda_copy.plan_fixed_capacity(host_ids, counts, n // reqs)
        size = 256 if ctx.small else 8192
        a = torch.randn(size, size, dtype=torch.bfloat16, device=ctx.device)
        b = torch.randn(size, size, dtype=torch.bfloat16, device=ctx.device)
        c = torch.empty_like(a)
        one_mm = wall(ctx, lambda: torch.matmul(a, b, out=c), 5)
        sms = torch.cuda.get_device_properties(ctx.device).multi_processor_count
        out: dict[str, Any] = {"gather_bytes": n * block_bytes, "matmul_size": size}
        variants: dict[str, Any] = {}
        for programs in sorted({16, CopyLaunch().num_programs, sms}):
            launch = CopyLaunch(programs)
            engine = cuda_swap.SwapEngine(n, block_bytes, 1, ctx.device, launch=launch)

            def gather(engine: cuda_swap.SwapEngine = engine) -> None:
                engine.start(0, rows, plan)
                engine.wait(0)

            t_gather = wall(ctx, gather, 3)
            reps = max(1, round(t_gather / max(one_mm, 1e-6)))

            def matmuls(reps: int = reps) -> None:
                for _ in range(reps):
                    torch.matmul(a, b, out=c)

            def both(engine: cuda_swap.SwapEngine = engine, reps: int = reps) -> None:
                engine.start(0, rows, plan)
                for _ in range(reps):
                    torch.matmul(a, b, out=c)
                engine.wait(0)

            t_mm = wall(ctx, matmuls, 3)
            t_both = wall(ctx, both, 3)
            hidden = (t_gather + t_mm - t_both) / min(t_gather, t_mm)
            variants[f"programs_{programs}"] = {
                "gather_ms": round(t_gather * 1e3, 3),
                "gather_gbps": gbps(n * block_bytes, t_gather),
                "matmuls": reps,
                "matmul_ms": round(t_mm * 1e3, 3),
                "together_ms": round(t_both * 1e3, 3),
                "hidden_fraction": round(hidden, 3),
            }
        out["variants"] = variants
        out["note"] = (
            "hidden_fraction 1: the shorter of gather and matmul loop is fully "
            "hidden; 0: they serialise"
        )
    finally:
        pool.release()
    return out


def check_graph(ctx: Ctx) -> dict[str, Any]:
    ctx.need_cuda("CUDA graphs")
    block_bytes = 8 * KIB
    num_blocks, reqs, cols, width = (64, 3, 5, 6) if ctx.small else (4096, 8, 48, 64)
    pool = cuda_pool.PinnedHostPool(num_blocks * block_bytes, ctx.device)
    try:
        reference = torch.randint(
            0, 256, (num_blocks * block_bytes,), dtype=torch.uint8, device=ctx.device
        )
        pool.host.copy_(reference)
        rows = block_rows(pool, num_blocks, block_bytes)
        ref_rows = reference.view(num_blocks, block_bytes)
        engine = cuda_swap.SwapEngine(reqs * width, block_bytes, 2, ctx.device)
        host_ids = torch.full((reqs, cols), PAD, dtype=torch.int64, device=ctx.device)
        counts = torch.zeros(reqs, dtype=torch.int64, device=ctx.device)
        result = torch.empty(
            reqs * width, block_bytes, dtype=torch.uint8, device=ctx.device
        )
        table = torch.empty(reqs, width, dtype=torch.int32, device=ctx.device)

        def fill(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
            gen = torch.Generator().manual_seed(seed)
            c = torch.randint(0, cols + 1, (reqs,), generator=gen)
            ids = torch.full((reqs, cols), PAD, dtype=torch.int64)
            for r in range(reqs):
                chosen = torch.randperm(num_blocks, generator=gen)[: int(c[r])]
                ids[r, : int(c[r])] = chosen.sort().values
            host_ids.copy_(ids)
            counts.copy_(c)
            return ids, c

        def step() -> None:
            plan = cuda_copy.plan_fixed_capacity(host_ids, counts, width)
            staged = engine.start(1, rows, plan)
            engine.wait(1)
            result.copy_(staged)
            table.copy_(plan.compact_block_table)

        fill(0)
        side = torch.cuda.Stream(ctx.device)
        side.wait_stream(torch.cuda.current_stream(ctx.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream(ctx.device).wait_stream(side)
        ctx.sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        ctx.sync()
        trials = []
        for seed in (1, 2, 3):
            ids, c = fill(seed)
            result.fill_(0)
            graph.replay()
            ctx.sync()
            slots, src = [], []
            expect_table = torch.zeros(reqs, width, dtype=torch.int32)
            for r in range(reqs):
                for j in range(int(c[r])):
                    slots.append(r * width + j)
                    src.append(int(ids[r, j]))
                    expect_table[r, j] = r * width + j
            rows_ok = torch.equal(
                result[torch.tensor(slots, dtype=torch.long, device=ctx.device)],
                ref_rows[torch.tensor(src, dtype=torch.long, device=ctx.device)],
            )
            trials.append(
                {
                    "blocks": len(slots),
                    "rows_ok": rows_ok,
                    "table_ok": torch.equal(table.cpu(), expect_table),
                }
            )
        replay_s = wall(ctx, graph.replay, 10)
        eager_s = wall(ctx, step, 10)
        return {
            "trials": trials,
            "replay_ms": round(replay_s * 1e3, 4),
            "eager_ms": round(eager_s * 1e3, 4),
            "ok": all(t["rows_ok"] and t["table_ok"] for t in trials),
        }
    finally:
        pool.release()


def paged_attention_ref(
    q: torch.Tensor,
    cache: torch.Tensor,
    table: torch.Tensor,
    counts: torch.Tensor,
    lens: torch.Tensor,
) -> torch.Tensor:
    """Reference paged decode attention (float32, one request at a time).

    ``q [R, Hq, D]``; ``cache [slots, block_size, H, 2D]`` (K then V);
    ``table [R, W]`` with ``counts[r]`` valid entries; ``lens [R]`` tokens.
    """
    num_reqs, q_heads, dim = q.shape
    heads = cache.shape[2]
    out = torch.empty(num_reqs, q_heads, dim, dtype=torch.float32, device=q.device)
    for r in range(num_reqs):
        c, n = int(counts[r]), int(lens[r])
        tokens = cache[table[r, :c].long()].reshape(-1, heads, 2 * dim)[:n].float()
        k, v = tokens[..., :dim], tokens[..., dim:]
        qr = q[r].float().view(heads, q_heads // heads, dim)
        scores = torch.einsum("hgd,thd->hgt", qr, k) * dim**-0.5
        out[r] = torch.einsum("hgt,thd->hgd", scores.softmax(-1), v).reshape(
            q_heads, dim
        )
    return out


def check_attention(ctx: Ctx) -> dict[str, Any]:
    dtype = _dtype(ctx)
    block_size = 16
    heads, q_heads, dim = (2, 4, 32) if ctx.small else (8, 32, 128)
    seq_lens = [1, 17, 40, 70] if ctx.small else [1, 17, 300, 1000, 2049]
    reqs = len(seq_lens)
    per_req = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(per_req) + 8
    block_shape = (block_size, heads, 2 * dim)
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_bytes = math.prod(block_shape) * itemsize
    pool = make_pool(ctx, num_blocks * block_bytes)
    try:
        view = pool.layer_views(1, num_blocks, block_shape, dtype)[0]
        host_view = pool.layer_views(1, num_blocks, block_shape, dtype, on_device=False)
        host_view[0].copy_(torch.randn(view.shape, dtype=dtype, generator=ctx.gen))
        perm = torch.randperm(num_blocks, generator=ctx.gen)
        tables, at = [], 0
        for n in per_req:
            tables.append(perm[at : at + n])
            at += n
        # Selection: a random subset of each request's blocks, newest last.
        width = max(per_req) + 2
        selected = []
        for n in per_req:
            keep = torch.rand(n, generator=ctx.gen) < 0.4
            keep[-1] = True
            selected.append(torch.nonzero(keep).squeeze(1))
        cols = max(len(s) for s in selected)
        host_ids = torch.full((reqs, cols), PAD, dtype=torch.int64)
        for r, s in enumerate(selected):
            host_ids[r, : len(s)] = tables[r][s]
        counts = torch.tensor([len(s) for s in selected])
        last_fill = torch.tensor(
            [s - (n - 1) * block_size for s, n in zip(seq_lens, per_req, strict=True)]
        )
        sparse_lens = (counts - 1) * block_size + last_fill
        plan = cuda_copy.plan_fixed_capacity(
            host_ids.to(ctx.device), counts.to(ctx.device), width
        )
        engine = cuda_swap.SwapEngine(reqs * width, block_bytes, 1, ctx.device)
        staged = engine.start(0, view, plan)
        engine.wait(0)
        staging = staged.view(dtype).view(reqs * width, *block_shape)
        q = torch.randn(reqs, q_heads, dim, dtype=dtype, generator=ctx.gen).to(
            ctx.device
        )
        via_staging = paged_attention_ref(
            q, staging, plan.compact_block_table, counts, sparse_lens
        )
        # Straight from the pool: the selected host blocks, no staging.
        direct_table = host_ids.clamp(min=0).to(ctx.device)
        direct = paged_attention_ref(q, view, direct_table, counts, sparse_lens)
        max_diff = float((via_staging - direct).abs().max())
        # SDPA over the gathered tokens (what a fused kernel would compute).
        sdpa = torch.empty_like(via_staging)
        for r in range(reqs):
            c, n = int(counts[r]), int(sparse_lens[r])
            tokens = staging[plan.compact_block_table[r, :c].long()]
            tokens = tokens.reshape(-1, heads, 2 * dim)[:n]
            k = tokens[..., :dim].transpose(0, 1)[None]
            v = tokens[..., dim:].transpose(0, 1)[None]
            qg = q[r].view(1, heads, q_heads // heads, dim)
            sdpa[r] = F.scaled_dot_product_attention(qg, k, v).reshape(q_heads, dim)
        sdpa_diff = float((sdpa - direct).abs().max())
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        return {
            "seq_lens": seq_lens,
            "selected_blocks": counts.tolist(),
            "sparse_lens": sparse_lens.tolist(),
            "staging_vs_direct_max_abs": max_diff,
            "sdpa_vs_direct_max_abs": sdpa_diff,
            "ok": max_diff <= 1e-5 and sdpa_diff < tol,
        }
    finally:
        pool.release()


def check_no_host_sync(ctx: Ctx) -> dict[str, Any]:
    ctx.need_cuda("torch.cuda.set_sync_debug_mode")
    block_bytes, num_blocks, reqs, width = 8 * KIB, 256, 4, 16
    pool = cuda_pool.PinnedHostPool(num_blocks * block_bytes, ctx.device)
    try:
        rows = block_rows(pool, num_blocks, block_bytes)
        host_ids = torch.randperm(num_blocks, device=ctx.device)[: reqs * width]
        host_ids = host_ids.view(reqs, width).sort(dim=1).values
        counts = torch.tensor([0, 3, width, 7], device=ctx.device)
        engine = cuda_swap.SwapEngine(reqs * width, block_bytes, 2, ctx.device)
        counters = cuda_swap.DeviceCounters(ctx.device)
        dst = torch.empty(
            reqs * width, block_bytes, dtype=torch.uint8, device=ctx.device
        )
        back = torch.empty(
            num_blocks, block_bytes, dtype=torch.uint8, device=ctx.device
        )
        ready = torch.cuda.Event()

        def hot_path() -> None:
            plan = cuda_copy.plan_fixed_capacity(host_ids, counts, width)
            ready.record()
            engine.start(0, rows, plan, ready)
            engine.start(1, rows, plan)
            engine.wait(0)
            engine.wait(1)
            cuda_copy.gather_blocks(rows, plan.src_ids, dst)
            cuda_copy.scatter_blocks(dst, plan.src_ids, back)
            counters.add(plan.counts, block_bytes)

        hot_path()  # compiles the kernels
        ctx.sync()
        torch.cuda.set_sync_debug_mode("error")
        try:
            hot_path()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch.ones(1, device=ctx.device).sum().item()
            detects = False
        except RuntimeError:
            detects = True
        finally:
            torch.cuda.set_sync_debug_mode("default")
        snap = counters.snapshot()
        expected_blocks = 2 * int(counts.sum())
        return {
            "counters": snap,
            "mode_catches_item": detects,
            "ok": detects and snap["blocks_read"] == expected_blocks,
        }
    finally:
        pool.release()


# --------------------------------------------------------------------------
# Decode-step model


class DecodeShapes:
    """Llama-3-8B decode shapes (tiny ones with ``small``)."""

    def __init__(self, small: bool, itemsize: int) -> None:
        self.itemsize = itemsize
        self.layers = 2 if small else 32
        self.kv_heads, self.q_heads, self.head_dim = (
            (2, 4, 32) if small else (8, 32, 128)
        )
        self.hidden = 128 if small else 4096
        # Stand-in for one layer's projections and MLP (Llama-3-8B: q,k,v,o
        # 4096x6144 + 4096x4096, gate/up 4096x28672, down 14336x4096: about
        # 218M weights) as one [hidden, 53248] matmul of the same size.
        self.mlp_out = 256 if small else 53248
        self.block_size = 16
        self.budget = 0.2
        self.cases = [(256, 2), (512, 1)] if small else [(32768, 8), (131072, 1)]

    @property
    def token_bytes(self) -> int:
        return self.kv_heads * 2 * self.head_dim * self.itemsize  # K and V

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.token_bytes

    @property
    def layer_bytes(self) -> int:
        """One layer's KV for the largest case."""
        return max(c * r for c, r in self.cases) * self.token_bytes


def decode_attention(q: torch.Tensor, kv: torch.Tensor, dim: int) -> torch.Tensor:
    """Decode attention by SDPA. ``q [R, Hq, D]``, ``kv [R, T, H, 2D]``.

    GQA folded into the query length (one decode position, no mask), so any
    SDPA backend takes it.
    """
    reqs, q_heads, _ = q.shape
    heads = kv.shape[2]
    k = kv[..., :dim].transpose(1, 2)
    v = kv[..., dim:].transpose(1, 2)
    qg = q.view(reqs, heads, q_heads // heads, dim)
    return F.scaled_dot_product_attention(qg, k, v)


def _sdpa_backend(ctx: Ctx, q: torch.Tensor, kv: torch.Tensor, dim: int) -> Any:
    """The first SDPA backend that takes the decode shapes, as a context
    manager factory (None: let torch choose)."""
    if not ctx.cuda:
        return None, "default"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                decode_attention(q, kv, dim)
            ctx.sync()
            return backend, backend.name
        except RuntimeError:
            continue
    return None, "default"


def check_decode_model(ctx: Ctx) -> dict[str, Any]:
    dtype = _dtype(ctx)
    shapes = DecodeShapes(ctx.small, _itemsize(dtype))
    block_bytes, layer_bytes = shapes.block_bytes, shapes.layer_bytes
    out: dict[str, Any] = {
        "layers": shapes.layers,
        "kv_heads": shapes.kv_heads,
        "q_heads": shapes.q_heads,
        "head_dim": shapes.head_dim,
        "block_size": shapes.block_size,
        "block_bytes": block_bytes,
        "budget": shapes.budget,
        "dtype": str(dtype),
        "notes": [
            f"the MLP stand-in is one [hidden, {shapes.mlp_out}] matmul per "
            "layer, two weight matrices alternating by layer parity (each far "
            "larger than L2 at full size)",
            "attention: torch SDPA over contiguous per-request tokens, GQA "
            "folded into the query length (not a split-KV paged kernel, so "
            "all_on_gpu may be slower than vLLM's FlashAttention)",
        ],
    }
    pools, shared = _decode_pools(ctx, shapes.layers, layer_bytes, out)
    try:
        buffers = DecodeBuffers(
            pools=pools,
            # All-on-GPU KV, one buffer per layer (device memory).
            device_kv=[
                torch.empty(layer_bytes, dtype=torch.uint8, device=ctx.device)
                for _ in range(shapes.layers)
            ],
            weights=[
                torch.randn(
                    shapes.hidden, shapes.mlp_out, dtype=dtype, device=ctx.device
                )
                for _ in range(2)
            ],
        )
        cases: dict[str, Any] = {}
        for ctx_tokens, reqs in shapes.cases:
            label = (
                f"{ctx_tokens // 1024}K x {reqs}"
                if ctx_tokens >= 1024
                else (f"{ctx_tokens} x {reqs}")
            )
            if ctx.left_s() < 30:
                cases[label] = {"skipped": f"time budget: {ctx.left_s():.0f} s left"}
                continue
            ctx.log(f"decode_model {label}")
            cases[label] = _decode_case(ctx, shapes, buffers, ctx_tokens, reqs)
        out["cases"] = cases
        out["host_pools"] = "one shared by all layers" if shared else "one per layer"
    finally:
        for pool in {id(p): p for p in pools}.values():
            pool.release()
    return out


@dataclass(frozen=True)
class DecodeBuffers:
    """What every case of the decode model shares."""

    pools: list[Any]
    """The host pool of each layer (possibly one, reused by every layer)."""
    device_kv: list[torch.Tensor]
    """Each layer's KV in device memory (uint8, the largest case's bytes)."""
    weights: list[torch.Tensor]
    """The two MLP stand-in matrices, alternating by layer parity."""


def _decode_pools(
    ctx: Ctx, layers: int, layer_bytes: int, out: dict[str, Any]
) -> tuple[list[Any], bool]:
    """One host pool per layer when memory and registration time allow,
    else one pool reused by every layer (recorded in ``out["notes"]``)."""
    first = make_pool(ctx, layer_bytes)
    pools = [first]
    projected = first.register_s * layers
    out["register_s_first_pool"] = round(first.register_s, 3)
    room = mem_available() > (layers + 8) * layer_bytes
    if ctx.cuda and (projected > 90 or not room):
        out["notes"].append(
            f"one {layer_bytes / GIB:.2f} GiB host pool reused by all layers "
            f"(per-layer pools: projected registration {projected:.0f} s, "
            f"enough host memory: {room}); timing is bandwidth-bound and the "
            "pool far exceeds L2"
        )
        return [first] * layers, True
    t0 = time.perf_counter()
    for _ in range(layers - 1):
        pools.append(make_pool(ctx, layer_bytes))
    out["register_s_all_pools"] = round(time.perf_counter() - t0 + first.register_s, 3)
    return pools, False


def _decode_case(
    ctx: Ctx, shapes: DecodeShapes, buffers: DecodeBuffers, ctx_tokens: int, reqs: int
) -> dict[str, Any]:
    """One decode step of ``reqs`` requests of ``ctx_tokens`` tokens each,
    timed four ways (module docstring, check 8)."""
    dim, heads, bs = shapes.head_dim, shapes.kv_heads, shapes.block_size
    layers, block_bytes = shapes.layers, shapes.block_bytes
    pools, weights = buffers.pools, buffers.weights
    dtype = weights[0].dtype
    blocks_per_req = ctx_tokens // bs
    total_blocks = reqs * blocks_per_req
    nbytes = total_blocks * block_bytes
    width = math.ceil(shapes.budget * blocks_per_req)
    device = ctx.device
    q = torch.randn(reqs, shapes.q_heads, dim, dtype=dtype, device=device)
    x = torch.randn(reqs, shapes.hidden, dtype=dtype, device=device)

    def typed(flat: torch.Tensor, tokens: int) -> torch.Tensor:
        """uint8 bytes -> ``[R, tokens, H, 2D]`` in the model's dtype."""
        return (
            flat[: reqs * tokens * heads * 2 * dim * _itemsize(dtype)]
            .view(dtype)
            .view(reqs, tokens, heads, 2 * dim)
        )

    def mlp(layer: int) -> None:
        torch.matmul(x, weights[layer % 2])

    pool_rows = [
        block_rows(pool, total_blocks, block_bytes) for pool in pools
    ]  # [total_blocks, block_bytes]; request r owns blocks r*bpr .. (r+1)*bpr-1
    gpu_kv = [typed(buf, ctx_tokens) for buf in buffers.device_kv]
    backend, backend_name = _sdpa_backend(ctx, q, gpu_kv[0], dim)
    if backend is not None:
        from torch.nn.attention import sdpa_kernel

    def attend(kv: torch.Tensor) -> None:
        if backend is None:
            decode_attention(q, kv, dim)
        else:
            with sdpa_kernel(backend):
                decode_attention(q, kv, dim)

    def all_on_gpu() -> None:
        for layer in range(layers):
            attend(gpu_kv[layer])
            mlp(layer)

    fetch_buf = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def full_fetch_serial() -> None:
        for layer in range(layers):
            fetch_buf.copy_(pools[layer].host[:nbytes], non_blocking=ctx.cuda)
            attend(typed(fetch_buf, ctx_tokens))
            mlp(layer)

    def swap_step(
        engine: cuda_swap.SwapEngine, plan: cuda_copy.FixedPlan, tokens: int
    ) -> None:
        engine.start(0, pool_rows[0], plan)
        for layer in range(layers):
            if layer + 1 < layers:
                # The side stream waits for everything queued so far, which
                # includes layer - 1's attention over the buffer it reuses.
                engine.start(layer + 1, pool_rows[layer + 1], plan)
            engine.wait(layer)
            attend(typed(engine.buffer(layer).view(-1), tokens))
            mlp(layer)

    dense_plan, sel_plan = _decode_plans(ctx, reqs, blocks_per_req, width)
    iters = 1 if ctx.small else 3
    result: dict[str, Any] = {
        "blocks_per_request": blocks_per_req,
        "selected_per_request": width,
        "kv_bytes_per_layer": nbytes,
        "sdpa_backend": backend_name,
    }
    times: dict[str, float] = {}
    times["all_on_gpu"] = wall(ctx, all_on_gpu, iters)
    times["full_fetch_serial"] = wall(ctx, full_fetch_serial, iters)
    if ctx.left_s() > 20:
        dense = cuda_swap.SwapEngine(total_blocks, block_bytes, layers, device)
        times["full_fetch_overlapped"] = wall(
            ctx, lambda: swap_step(dense, dense_plan, ctx_tokens), iters
        )
        del dense
    else:
        result["full_fetch_overlapped"] = "skipped: time budget"
    selected = cuda_swap.SwapEngine(reqs * width, block_bytes, layers, device)
    times["selected_overlapped"] = wall(
        ctx, lambda: swap_step(selected, sel_plan, width * bs), iters
    )
    best = _best_gather_config(ctx)
    if best is not None:
        programs, words = best
        launch = CopyLaunch(programs, words)
        tuned = cuda_swap.SwapEngine(
            reqs * width, block_bytes, layers, device, launch=launch
        )
        times["selected_overlapped_tuned"] = wall(
            ctx, lambda: swap_step(tuned, sel_plan, width * bs), iters
        )
        result["tuned_config"] = {"num_programs": programs, "block_words": words}
    result["ms_per_step"] = {k: round(v * 1e3, 3) for k, v in times.items()}
    result["ratios"] = _decode_ratios(times)
    sel = times["selected_overlapped"]
    result["selected_gbps"] = gbps(layers * reqs * width * block_bytes, sel)
    result["full_serial_gbps"] = gbps(layers * nbytes, times["full_fetch_serial"])
    return result


def _decode_plans(
    ctx: Ctx, reqs: int, blocks_per_req: int, width: int
) -> tuple[cuda_copy.FixedPlan, cuda_copy.FixedPlan]:
    """The dense plan (every block; request ``r`` owns blocks ``r * bpr``
    onwards) and the selected one (``width`` blocks per request, the newest
    always in, ascending): both read one layer ahead on the same path."""
    device = ctx.device
    all_ids = torch.arange(reqs * blocks_per_req, device=device)
    dense = cuda_copy.plan_fixed_capacity(
        all_ids.view(reqs, blocks_per_req),
        torch.full((reqs,), blocks_per_req, device=device),
        blocks_per_req,
    )
    newest = torch.tensor([blocks_per_req - 1])
    chosen = [
        torch.randperm(blocks_per_req - 1, generator=ctx.gen)[: width - 1].sort().values
        for _ in range(reqs)
    ]
    ids = torch.stack(
        [torch.cat([c, newest]) + r * blocks_per_req for r, c in enumerate(chosen)]
    )
    selected = cuda_copy.plan_fixed_capacity(
        ids.to(device), torch.full((reqs,), width, device=device), width
    )
    return dense, selected


def _decode_ratios(times: dict[str, float]) -> dict[str, float]:
    """Step times relative to the selected, overlapped swap-in."""
    sel = times["selected_overlapped"]
    ratios = {
        "full_serial_over_selected": round(times["full_fetch_serial"] / sel, 3),
        "selected_over_all_on_gpu": round(sel / times["all_on_gpu"], 3),
    }
    if "full_fetch_overlapped" in times:
        ratios["full_overlapped_over_selected"] = round(
            times["full_fetch_overlapped"] / sel, 3
        )
    return ratios


def _best_gather_config(ctx: Ctx) -> tuple[int, int] | None:
    """(programs, words) of the fastest 64 KiB gather of the sweep, if any."""
    try:
        config = ctx.results["checks"]["gather"]["64KiB"]["triton_best"]["config"]
        _, programs, words = config.split("_")  # triton_p{P}_w{W}
        return int(programs[1:]), int(words[1:])
    except (KeyError, TypeError, ValueError):
        return None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------


RUNNERS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "env": check_env,
    "pcie": check_pcie,
    "pool": check_pool,
    "scatter": check_scatter,
    "gather": check_gather,
    "overlap": check_overlap,
    "graph": check_graph,
    "attention": check_attention,
    "no_host_sync": check_no_host_sync,
    "decode_model": check_decode_model,
}


def run_check(ctx: Ctx, name: str) -> None:
    checks = ctx.results["checks"]
    if ctx.left_s() <= 0:
        checks[name] = {"ok": None, "skipped": "time budget spent"}
        ctx.log(f"{name}: skipped (time budget spent)")
        ctx.write()
        return
    ctx.log(f"{name}: start")
    t0 = time.perf_counter()
    try:
        data = RUNNERS[name](ctx)
        ok = data.pop("ok", True)
        checks[name] = {"ok": bool(ok), **data}
    except Skipped as exc:
        checks[name] = {"ok": None, "skipped": str(exc)}
    except Exception as exc:
        checks[name] = {"ok": False, "error": "".join(traceback.format_exception(exc))}
    try:
        ctx.sync()
    except Exception as exc:  # a fault poisons the context; say so
        checks[name]["sync_error_after"] = repr(exc)
    if ctx.cuda:
        torch.cuda.empty_cache()
    checks[name]["seconds"] = round(time.perf_counter() - t0, 3)
    state = {True: "ok", False: "FAILED", None: "skipped"}[checks[name]["ok"]]
    ctx.log(f"{name}: {state} in {checks[name]['seconds']} s")
    ctx.write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="skip checks after this"
    )
    parser.add_argument(
        "--only", nargs="*", choices=CHECKS, help="run these checks only"
    )
    args = parser.parse_args(argv)
    ctx = Ctx(args)
    ctx.results["argv"] = sys.argv[1:] if argv is None else argv
    for name in args.only or CHECKS:
        run_check(ctx, name)
    ctx.results["total_s"] = round(time.monotonic() - ctx.start, 1)
    ctx.write()
    failed = [n for n, c in ctx.results["checks"].items() if c["ok"] is False]
    ctx.log(f"done in {ctx.results['total_s']} s; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
