"""The CUDA tier's staging planner and block copies (``engine/cuda_copy.py``).

On CPU: the planner and the torch copies against plain-Python reference
twins, and the Triton kernel under Triton's interpreter. With a GPU
(``gpu`` mark): the compiled kernel against torch and the twins, from a UVA
view of the pinned pool and from device memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import REPO_ROOT
from vllm_infinigen.engine import cuda_copy
from vllm_infinigen.engine.cuda_copy import CopyLaunch
from vllm_infinigen.method.selection import PAD

SENTINEL = 0x5A


def random_selection(
    gen: torch.Generator, reqs: int, cols: int, num_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([reqs, cols]`` distinct ascending host ids, PAD past counts;
    ``counts [reqs])`` with every count from 0 to ``cols`` possible."""
    counts = torch.randint(0, cols + 1, (reqs,), generator=gen)
    ids = torch.full((reqs, cols), PAD, dtype=torch.int64)
    for r in range(reqs):
        c = int(counts[r])
        ids[r, :c] = torch.randperm(num_blocks, generator=gen)[:c].sort().values
    return ids, counts


def reference_plan(
    host_ids: torch.Tensor, counts: torch.Tensor, width: int
) -> tuple[list[int], list[list[int]], list[int]]:
    """(src ids per slot, compact table, newest slot) by plain loops."""
    reqs = host_ids.shape[0]
    src = [PAD] * (reqs * width)
    table = [[0] * width for _ in range(reqs)]
    newest = [0] * reqs
    for r in range(reqs):
        for j in range(int(counts[r])):
            src[r * width + j] = int(host_ids[r, j])
            table[r][j] = r * width + j
            newest[r] = r * width + j
    return src, table, newest


def reference_copy(
    src: torch.Tensor, ids: torch.Tensor, dst: torch.Tensor, *, scatter: bool
) -> torch.Tensor:
    """``dst`` after a gather (``dst[i] = src[ids[i]]``) or a scatter
    (``dst[ids[i]] = src[i]``) by a loop, ``-1`` ids skipped."""
    out = dst.clone()
    for i, block in enumerate(ids.tolist()):
        if block >= 0:
            if scatter:
                out[block] = src[i]
            else:
                out[i] = src[block]
    return out


# --------------------------------------------------------------------------
# Planner


@pytest.mark.parametrize(
    ("reqs", "cols", "width"), [(1, 1, 1), (5, 4, 7), (8, 6, 6), (3, 0, 2), (0, 3, 4)]
)
def test_plan_matches_reference(reqs: int, cols: int, width: int) -> None:
    gen = torch.Generator().manual_seed(reqs * 100 + cols * 10 + width)
    host_ids, counts = random_selection(gen, reqs, cols, num_blocks=50)
    plan = cuda_copy.plan_fixed_capacity(host_ids, counts, width)
    src, table, newest = reference_plan(host_ids, counts, width)
    assert plan.src_ids.tolist() == src
    assert plan.compact_block_table.tolist() == table
    assert plan.newest_slot.tolist() == newest
    assert plan.counts.tolist() == counts.tolist()
    assert plan.width == width and plan.num_slots == reqs * width
    assert plan.src_ids.dtype == torch.int64
    assert plan.compact_block_table.dtype == torch.int32


def test_plan_shapes_depend_only_on_requests_and_width() -> None:
    """Empty, partial and full selections of the same batch give the same
    shapes and dtypes (what lets a CUDA graph replay the plan)."""
    reqs, cols, width = 4, 5, 8
    host_ids = torch.arange(reqs * cols).view(reqs, cols)
    plans = [
        cuda_copy.plan_fixed_capacity(host_ids, torch.tensor(c), width)
        for c in ([0, 0, 0, 0], [1, 5, 0, 3], [5, 5, 5, 5])
    ]
    for field in ("src_ids", "compact_block_table", "counts", "newest_slot"):
        shapes = {(getattr(p, field).shape, getattr(p, field).dtype) for p in plans}
        assert len(shapes) == 1, field
    assert (plans[0].src_ids == PAD).all()
    assert (plans[0].compact_block_table == 0).all()
    assert int((plans[2].src_ids >= 0).sum()) == reqs * cols


def test_plan_ignores_entries_past_counts() -> None:
    """Ids left in ``host_ids`` past ``counts`` are padding, whatever they hold."""
    host_ids = torch.tensor([[4, 9, 11], [7, 8, 3]])
    plan = cuda_copy.plan_fixed_capacity(host_ids, torch.tensor([1, 2]), 3)
    assert plan.src_ids.tolist() == [4, PAD, PAD, 7, 8, PAD]
    assert plan.compact_block_table.tolist() == [[0, 0, 0], [3, 4, 0]]


def test_plan_rejects_bad_shapes() -> None:
    ids, counts = torch.zeros(2, 5, dtype=torch.long), torch.ones(2)
    with pytest.raises(ValueError, match="width=4"):
        cuda_copy.plan_fixed_capacity(ids, counts, 4)
    with pytest.raises(ValueError, match="width must be positive"):
        cuda_copy.plan_fixed_capacity(ids, counts, 0)
    with pytest.raises(ValueError, match="counts must be"):
        cuda_copy.plan_fixed_capacity(ids, torch.ones(3), 5)
    with pytest.raises(ValueError, match=r"\[R, W\]"):
        cuda_copy.plan_fixed_capacity(ids.view(-1), counts, 5)


def test_pad_is_the_selection_padding() -> None:
    assert cuda_copy.PAD == PAD


# --------------------------------------------------------------------------
# Torch copies


def test_as_block_rows_is_a_view_of_each_block_in_memory_order() -> None:
    pool = torch.randn(6, 16, 2, 8, dtype=torch.bfloat16)
    rows = cuda_copy.as_block_rows(pool)
    assert rows.shape == (6, 16 * 2 * 8 * 2) and rows.dtype == torch.uint8
    assert rows.data_ptr() == pool.data_ptr()
    # One layer of a block-major pool: blocks contiguous, rows strided.
    layer = torch.zeros(6, 3, 16, 2, 8)[:, 1]
    assert cuda_copy.as_block_rows(layer).stride(0) == 3 * 16 * 2 * 8 * 4
    # Permuted dimensions of a dense block (vLLM's LBNHC view): memory order.
    permuted = torch.arange(6 * 8 * 4, dtype=torch.int32).view(6, 8, 4).transpose(1, 2)
    words = cuda_copy.as_block_rows(permuted).view(torch.int32)
    assert words.tolist() == torch.arange(6 * 8 * 4).view(6, 32).tolist()
    with pytest.raises(ValueError, match="one contiguous run"):
        cuda_copy.as_block_rows(torch.zeros(6, 8, 4)[:, :, :2])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32])
def test_gather_matches_reference_and_skips_padding(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    pool = torch.randint(0, 100, (40, 16, 2, 6), generator=gen).to(dtype)
    ids = torch.tensor([39, PAD, 0, 7, 7, PAD, 12])
    dst = torch.full((7, 16, 2, 6), SENTINEL, dtype=dtype)
    expected = reference_copy(pool, ids, dst, scatter=False)
    cuda_copy.gather_blocks(pool, ids, dst)
    torch.testing.assert_close(dst, expected, rtol=0, atol=0)
    assert (dst[1] == SENTINEL).all() and (dst[5] == SENTINEL).all()


def test_gather_from_strided_layer_rows() -> None:
    """One layer of a block-major pool (rows not adjacent) gathers like a copy."""
    gen = torch.Generator().manual_seed(2)
    pool = torch.randint(0, 255, (30, 3, 64), generator=gen, dtype=torch.uint8)
    layer = pool[:, 2]
    ids = torch.randperm(30, generator=gen)[:10]
    ids[3] = PAD
    dst = torch.zeros(10, 64, dtype=torch.uint8)
    cuda_copy.gather_blocks(layer, ids, dst)
    expected = reference_copy(layer, ids, torch.zeros_like(dst), scatter=False)
    torch.testing.assert_close(dst, expected)


def test_scatter_matches_reference_and_round_trips() -> None:
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 255, (9, 128), generator=gen, dtype=torch.uint8)
    ids = torch.tensor([4, PAD, 0, 31, 12, PAD, 5, 6, 20])
    pool = torch.full((32, 128), SENTINEL, dtype=torch.uint8)
    expected = reference_copy(rows, ids, pool, scatter=True)
    cuda_copy.scatter_blocks(rows, ids, pool)
    torch.testing.assert_close(pool, expected, rtol=0, atol=0)
    back = torch.zeros_like(rows)
    cuda_copy.gather_blocks(pool, ids, back)
    kept = ids >= 0
    torch.testing.assert_close(back[kept], rows[kept])
    assert (back[~kept] == 0).all()


def test_copies_reject_mismatched_operands() -> None:
    pool = torch.zeros(8, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="3 ids for 2 rows"):
        cuda_copy.gather_blocks(
            pool, torch.tensor([0, 1, 2]), torch.zeros(2, 64, dtype=torch.uint8)
        )
    with pytest.raises(ValueError, match="row sizes differ"):
        cuda_copy.gather_blocks(
            pool, torch.tensor([0]), torch.zeros(1, 32, dtype=torch.uint8)
        )
    with pytest.raises(ValueError, match="int32 or int64"):
        cuda_copy.scatter_blocks(
            torch.zeros(1, 64, dtype=torch.uint8), torch.tensor([0.0]), pool
        )


def test_empty_copies_do_nothing() -> None:
    pool = torch.ones(4, 16, dtype=torch.uint8)
    cuda_copy.gather_blocks(pool, torch.zeros(0, dtype=torch.long), pool[:0])
    cuda_copy.scatter_blocks(pool[:0], torch.zeros(0, dtype=torch.long), pool)
    assert (pool == 1).all()


def test_copy_launch_refuses_shapes_triton_cannot_run() -> None:
    with pytest.raises(ValueError, match="power of two, got 48"):
        CopyLaunch(block_words=48)
    with pytest.raises(ValueError, match="must be positive"):
        CopyLaunch(num_programs=0)


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    from vllm_infinigen.engine import cuda_copy
    from vllm_infinigen.engine.cuda_copy import CopyLaunch

    gen = torch.Generator().manual_seed(0)
    results = {}
    # (pool rows, row bytes, block_words): even steps, a ragged last step,
    # and a row size that is no multiple of 4 (byte words).
    for name, blocks, row, words in [
        ("even", 12, 256, 16), ("ragged", 12, 200, 16), ("bytes", 9, 13, 4),
        ("wide", 8, 4096, 2048),
    ]:
        pool = torch.randint(0, 255, (blocks, row), generator=gen, dtype=torch.uint8)
        ids = torch.randperm(blocks, generator=gen)[:7]
        ids[2] = -1
        got = torch.full((7, row), 0x5A, dtype=torch.uint8)
        want = got.clone()
        cuda_copy.gather_blocks(pool, ids, got, use_triton=True,
                                launch=CopyLaunch(3, words))
        cuda_copy.gather_blocks(pool, ids, want, use_triton=False)
        back = torch.zeros_like(pool)
        back_want = back.clone()
        cuda_copy.scatter_blocks(got, ids, back, use_triton=True,
                                 launch=CopyLaunch(2, words))
        cuda_copy.scatter_blocks(want, ids, back_want, use_triton=False)
        results[name] = [torch.equal(got, want), torch.equal(back, back_want)]
    # Strided rows (one layer of a block-major pool) and int32 ids.
    pool = torch.randint(0, 255, (10, 3, 64), generator=gen, dtype=torch.uint8)
    ids = torch.tensor([9, -1, 0, 4], dtype=torch.int32)
    got = torch.zeros(4, 64, dtype=torch.uint8)
    want = got.clone()
    cuda_copy.gather_blocks(pool[:, 1], ids, got, use_triton=True)
    cuda_copy.gather_blocks(pool[:, 1], ids, want, use_triton=False)
    results["strided"] = [torch.equal(got, want)]
    print(json.dumps(results))
    """
)


def test_triton_kernel_matches_torch_under_interpreter() -> None:
    """The Triton kernel's indexing, masks and skipping, run by Triton's CPU
    interpreter (the compiled kernel is checked by the ``gpu`` tests)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == {
        "even": [True, True],
        "ragged": [True, True],
        "bytes": [True, True],
        "wide": [True, True],
        "strided": [True],
    }


# --------------------------------------------------------------------------
# On a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["uva", "device"])
@pytest.mark.parametrize("row_bytes", [64 * 1024, 8 * 1024, 200, 13])
@pytest.mark.parametrize("num_programs", [1, 7, None])
def test_triton_copies_match_torch(
    where: str, row_bytes: int, num_programs: int | None
) -> None:
    from vllm_infinigen.engine.cuda_pool import PinnedHostPool

    cuda = torch.device("cuda", torch.cuda.current_device())
    launch = None if num_programs is None else CopyLaunch(num_programs)
    num_blocks, n = 48, 20
    gen = torch.Generator().manual_seed(row_bytes)
    data = torch.randint(
        0, 255, (num_blocks, row_bytes), generator=gen, dtype=torch.uint8
    )
    pool = PinnedHostPool(num_blocks * row_bytes, cuda) if where == "uva" else None
    try:
        if pool is not None:
            pool.host.copy_(data.view(-1))
            src = pool.device_view.view(num_blocks, row_bytes)
        else:
            src = data.to(cuda)
        ids = torch.randperm(num_blocks, generator=gen)[:n]
        ids[::4] = PAD
        ids = ids.to(cuda)
        got = torch.full((n, row_bytes), SENTINEL, dtype=torch.uint8, device=cuda)
        want = got.clone()
        cuda_copy.gather_blocks(src, ids, got, launch=launch)
        cuda_copy.gather_blocks(src, ids, want, use_triton=False)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        before = torch.full_like(data[:n], SENTINEL)
        expected = reference_copy(data, ids.cpu(), before, scatter=False)
        torch.testing.assert_close(got.cpu(), expected)
        back = torch.zeros(num_blocks, row_bytes, dtype=torch.uint8, device=cuda)
        cuda_copy.scatter_blocks(got, ids, back, launch=launch)
        expected = reference_copy(
            got.cpu(), ids.cpu(), torch.zeros_like(data), scatter=True
        )
        torch.testing.assert_close(back.cpu(), expected)
    finally:
        if pool is not None:
            pool.release()
