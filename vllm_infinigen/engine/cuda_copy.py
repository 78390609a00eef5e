"""The CUDA tier's block copies and their staging layout (torch and Triton).

* :func:`plan_fixed_capacity`: the staging layout of one layer's selection
  with shapes that depend only on the number of requests and the width
  (slot of request ``r``, entry ``j`` is ``r * width + j``), so a CUDA
  graph can replay it.
* :func:`gather_blocks` / :func:`scatter_blocks`: whole-block copies by
  index, skipping ``-1``; on CUDA a Triton kernel with a bounded grid
  (:class:`CopyLaunch`), written for 16-byte vector accesses (alignment
  hints), elsewhere plain torch.
* :func:`as_block_rows`: a paged cache seen as one byte row per block.

It imports no vLLM and nothing else of the package (torch only; Triton is
imported lazily, the first time a CUDA copy runs), so that
``benchmarks/gpu_check.py`` runs where only torch and Triton exist. Nothing
here synchronises with the host on CUDA: :func:`plan_fixed_capacity` and
the Triton paths of both copies. Where each part has run: ``docs/cuda.md``,
"What ran where".
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import triton.language as tl
else:
    tl = None  # bound by _triton_kernel() on the first CUDA copy

PAD = -1
"""Padding id: the value of ``vllm_infinigen.method.selection.PAD`` (a test
checks they agree). Not imported from there: this module needs torch alone,
so that it runs where only torch and Triton are installed (the GPU check)."""


@dataclass(frozen=True)
class CopyLaunch:
    """Launch shape of one Triton gather or scatter.

    Untuned guesses until ``benchmarks/gpu_check.py`` has run on a GPU (it
    sweeps programs and words per step and reports the best); vLLM's swap
    kernel found 12 SMs enough on H100 PCIe Gen5 for 8-32 KiB DMA-style
    copies, but a UVA gather needs more loads in flight.
    """

    num_programs: int = 64
    """Programs (CTAs) of one launch: bounds the SMs the copy takes."""
    block_words: int = 2048
    """32-bit words each program moves per step (8 KiB; a power of two)."""
    num_warps: int = 4
    """Warps per program."""

    def __post_init__(self) -> None:
        if min(self.num_programs, self.block_words, self.num_warps) <= 0:
            raise ValueError(
                "num_programs, block_words and num_warps must be positive, got "
                f"{self.num_programs}, {self.block_words}, {self.num_warps}"
            )
        if self.block_words & (self.block_words - 1):
            raise ValueError(
                f"block_words must be a power of two, got {self.block_words}"
            )


# --------------------------------------------------------------------------
# Plan


@dataclass(frozen=True, eq=False)
class FixedPlan:
    """One layer's staging layout for ``R`` decode requests at a fixed width.

    Every shape depends on ``R`` and ``width`` only, never on the data.

    Attributes:
        src_ids: ``[R * width]`` int64 host block id to copy into each
            staging slot, ``-1`` where the slot is padding (the copy skips
            it and leaves the slot as it was).
        compact_block_table: ``[R, width]`` int32 staging slot of each
            selected block (``r * width + j``), 0 past ``counts``.
        counts: ``[R]`` int64 selected blocks per request.
        newest_slot: ``[R]`` int64 staging slot of each request's last
            selected block (its newest one; 0 where ``counts`` is 0).
        width: staging slots per request.
    """

    src_ids: torch.Tensor
    compact_block_table: torch.Tensor
    counts: torch.Tensor
    newest_slot: torch.Tensor
    width: int

    @property
    def num_slots(self) -> int:
        """``R * width``: the staging capacity this plan needs."""
        return int(self.src_ids.shape[0])


def plan_fixed_capacity(
    host_ids: torch.Tensor, counts: torch.Tensor, width: int
) -> FixedPlan:
    """Lay out one layer's selected blocks in fixed-capacity staging.

    Request ``r``'s ``j``-th selected block goes to slot ``r * width + j``.
    No host synchronisation, and the output shapes depend only on
    ``R`` and ``width`` (CUDA-graph safe).

    Args:
        host_ids: ``[R, W]`` int host block ids per request, ascending with
            the newest last, :data:`PAD` past ``counts``; ``W <= width``.
        counts: ``[R]`` int selected blocks per request (``<= W``).
        width: staging slots per request (the policy's widest selection).

    Raises:
        ValueError: ``host_ids`` is not 2-D, is wider than ``width``, or
            ``counts`` does not match its rows.
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if host_ids.dim() != 2:
        raise ValueError(f"host_ids must be [R, W], got shape {tuple(host_ids.shape)}")
    num_reqs, cols = host_ids.shape
    if cols > width:
        raise ValueError(f"host_ids has {cols} columns, more than width={width}")
    if counts.shape != (num_reqs,):
        raise ValueError(
            f"counts must be [{num_reqs}], got shape {tuple(counts.shape)}"
        )
    device = host_ids.device
    counts = counts.to(device=device, dtype=torch.int64)
    ids = host_ids.to(torch.int64)
    if cols < width:
        ids = torch.nn.functional.pad(ids, (0, width - cols), value=PAD)
    column = torch.arange(width, device=device, dtype=torch.int64)
    valid = column[None, :] < counts[:, None]
    slots = torch.arange(num_reqs * width, device=device, dtype=torch.int64).view(
        num_reqs, width
    )
    newest = slots[:, 0] + (counts - 1).clamp(min=0, max=width - 1)
    return FixedPlan(
        src_ids=ids.masked_fill(~valid, PAD).reshape(num_reqs * width),
        compact_block_table=slots.masked_fill(~valid, 0).to(torch.int32),
        counts=counts,
        newest_slot=torch.where(counts > 0, newest, torch.zeros_like(newest)),
        width=width,
    )


# --------------------------------------------------------------------------
# Block copies


def as_block_rows(blocks: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, ...]`` -> ``[num_blocks, block_bytes]`` uint8, a view.

    Each block's elements (all dimensions but the first) must be one dense
    run in memory, in any dimension order (e.g. vLLM's ``LBNHC`` paged
    cache: ``[B, H, N, 2D]`` with the strides of ``[B, N, H, 2D]``); a row
    holds a block's bytes in memory order. The stride between blocks may be
    anything (e.g. one layer of a block-major pool).

    Raises:
        ValueError: no block dimension, or a block that is not one dense run.
    """
    if blocks.dim() == 0:
        raise ValueError("blocks must have a leading block dimension")
    per_block = math.prod(blocks.shape[1:])
    inner = sorted(zip(blocks.stride()[1:], blocks.shape[1:], strict=True))
    expected = 1
    for stride, size in inner:
        if size > 1 and stride != expected:
            raise ValueError(
                "each block must be one contiguous run (for a KV cache: layout "
                f"LBNHC); got shape {tuple(blocks.shape)} strides {blocks.stride()}"
            )
        expected *= size
    rows = torch.as_strided(blocks, (blocks.shape[0], per_block), (blocks.stride(0), 1))
    return rows if rows.dtype == torch.uint8 else rows.view(torch.uint8)


def gather_blocks(
    src: torch.Tensor,
    ids: torch.Tensor,
    dst: torch.Tensor,
    *,
    launch: CopyLaunch | None = None,
    use_triton: bool | None = None,
) -> None:
    """``dst[i] = src[ids[i]]`` for every ``ids[i] >= 0``; other rows untouched.

    Args:
        src: ``[num_blocks, ...]`` the pool (a UVA view of host memory, or
            any tensor); each block one run (:func:`as_block_rows`).
        ids: ``[n]`` int32/int64 block ids, ``-1`` to skip.
        dst: ``[n, ...]`` same bytes per block as ``src``.
        launch: the Triton launch shape (default :class:`CopyLaunch`).
        use_triton: ``None``: Triton on CUDA, torch elsewhere. ``True`` on
            CPU needs ``TRITON_INTERPRET=1`` (tests only).

    On CUDA it launches one kernel and never syncs with the host (the ids
    may still be in flight). The torch path on CUDA is sync-free too but
    reads block 0 for every skipped row; on CPU it syncs (``nonzero``).
    """
    _copy(dst, ids, src, scatter=False, launch=launch, use_triton=use_triton)


def scatter_blocks(
    src: torch.Tensor,
    ids: torch.Tensor,
    dst: torch.Tensor,
    *,
    launch: CopyLaunch | None = None,
    use_triton: bool | None = None,
) -> None:
    """``dst[ids[i]] = src[i]`` for every ``ids[i] >= 0`` (inverse of
    :func:`gather_blocks`; arguments as there, ``dst`` being the pool).

    Repeated ids leave one of their rows, unspecified which. The CUDA
    Triton path never syncs; the torch paths do (``nonzero``).
    """
    _copy(src, ids, dst, scatter=True, launch=launch, use_triton=use_triton)


def _copy(
    rows: torch.Tensor,
    ids: torch.Tensor,
    pool: torch.Tensor,
    *,
    scatter: bool,
    launch: CopyLaunch | None,
    use_triton: bool | None,
) -> None:
    """Gather ``pool[ids]`` into ``rows``, or scatter ``rows`` to ``pool[ids]``
    (``rows``: the compact side, one row per id; ``pool``: the indexed one)."""
    rows, ids, pool = _check_copy(rows, ids, pool)
    if ids.shape[0] == 0:
        return
    if (rows.device.type == "cuda") if use_triton is None else use_triton:
        src, dst = (rows, pool) if scatter else (pool, rows)
        _launch_copy(src, dst, ids, launch or CopyLaunch(), scatter=scatter)
    elif scatter or rows.device.type == "cpu":
        taken = torch.nonzero(ids >= 0).squeeze(1)
        if scatter:
            pool.index_copy_(0, ids[taken].long(), rows.index_select(0, taken))
        else:
            rows.index_copy_(0, taken, pool.index_select(0, ids[taken]))
    else:  # gather on CUDA without a host sync: skipped rows keep their bytes
        valid = (ids >= 0)[:, None]
        fetched = pool.index_select(0, ids.clamp(min=0))
        rows.copy_(torch.where(valid, fetched, rows))


def _check_copy(
    rows: torch.Tensor, ids: torch.Tensor, pool: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate (shapes only, no sync) and flatten a copy's operands."""
    rows, pool = as_block_rows(rows), as_block_rows(pool)
    ids = ids.reshape(-1)
    if rows.shape[0] != ids.shape[0]:
        raise ValueError(f"{ids.shape[0]} ids for {rows.shape[0]} rows")
    if rows.shape[1] != pool.shape[1]:
        raise ValueError(f"row sizes differ: {rows.shape[1]} and {pool.shape[1]} bytes")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be int32 or int64, got {ids.dtype}")
    if not (rows.device == pool.device == ids.device):
        raise ValueError(
            "rows, ids and pool must share a device (a UVA view of host "
            f"memory is a CUDA tensor); got {rows.device}, {ids.device}, "
            f"{pool.device}"
        )
    return rows, ids, pool


def _as_words(rows: torch.Tensor) -> torch.Tensor:
    """uint8 rows as int32 words when sizes, strides and offset allow it."""
    if rows.shape[1] % 4 == 0:
        with contextlib.suppress(RuntimeError):
            return rows.view(torch.int32)
    return rows


def _launch_copy(
    src: torch.Tensor,
    dst: torch.Tensor,
    ids: torch.Tensor,
    launch: CopyLaunch,
    *,
    scatter: bool,
) -> None:
    """One Triton launch copying ``n = len(ids)`` rows (shapes only read)."""
    kernel = _triton_kernel()
    src_w, dst_w = _as_words(src), _as_words(dst)
    if src_w.dtype != dst_w.dtype:  # one side could not be viewed as words
        src_w, dst_w = src, dst
    if src_w.stride(1) != 1 or dst_w.stride(1) != 1:
        raise ValueError("each block's bytes must be contiguous")
    row_words = src_w.shape[1]
    words = launch.block_words * (4 if src_w.dtype == torch.uint8 else 1)
    step = min(words, _next_power_of_2(row_words))
    n = ids.shape[0]
    grid = (max(1, min(n, launch.num_programs)),)
    kernel[grid](
        src_w,
        dst_w,
        ids if ids.is_contiguous() else ids.contiguous(),
        n,
        row_words,
        src_w.stride(0),
        dst_w.stride(0),
        SCATTER=scatter,
        STEP=step,
        EVEN=row_words % step == 0,
        num_warps=launch.num_warps,
    )


def _next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (``>= 1``)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _copy_rows_kernel(
    src_ptr,
    dst_ptr,
    ids_ptr,
    n_rows,
    row_words,
    src_stride,
    dst_stride,
    SCATTER: tl.constexpr,
    STEP: tl.constexpr,
    EVEN: tl.constexpr,
):
    # Copies whole rows by index; program p takes rows p, p + P, p + 2P, ...
    # Gather: dst[i] = src[ids[i]]; scatter: dst[ids[i]] = src[i]; rows whose
    # id is negative are skipped. Sizes and strides are in words (int32, or
    # bytes when a row is no multiple of 4). STEP words move per step; the
    # hints let Triton issue 16-byte vector loads when the row starts allow.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    lanes = tl.arange(0, STEP)
    for row in range(pid, n_rows, num_programs):
        block = tl.load(ids_ptr + row).to(tl.int64)
        if block >= 0:
            row64 = tl.cast(row, tl.int64)
            if SCATTER:
                src_row = src_ptr + row64 * src_stride
                dst_row = dst_ptr + block * dst_stride
            else:
                src_row = src_ptr + block * src_stride
                dst_row = dst_ptr + row64 * dst_stride
            for start in range(0, row_words, STEP):
                offs = tl.max_contiguous(tl.multiple_of(start + lanes, STEP), STEP)
                if EVEN:
                    tl.store(dst_row + offs, tl.load(src_row + offs))
                else:
                    inside = offs < row_words
                    values = tl.load(src_row + offs, mask=inside)
                    tl.store(dst_row + offs, values, mask=inside)


@functools.cache
def _triton_kernel() -> Any:
    """Import Triton (first CUDA copy only) and JIT the copy kernel."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_copy_rows_kernel)


__all__ = [
    "PAD",
    "CopyLaunch",
    "FixedPlan",
    "as_block_rows",
    "gather_blocks",
    "plan_fixed_capacity",
    "scatter_blocks",
]
