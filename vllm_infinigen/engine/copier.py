"""Movement: copies selected KV blocks from the host tier into staging.

The copier knows nothing about selection; it moves whole blocks as raw
bytes (the CPU kernels may pre-pack a block's layout per ISA, so blocks are
never parsed). Two staging buffers alternate by layer parity, so the swap-in
for layer ``L`` (started from layer ``L-1``) never overwrites the blocks
layer ``L-1``'s attention is reading.

Modes:

* ``sync``: the copy runs inline when submitted.
* ``thread``: the copy runs on one worker thread (torch releases the GIL in
  ``index_select``) and overlaps the rest of layer ``L-1``; attention waits
  on its future. This is the CPU stand-in for a CUDA side stream.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from vllm_infinigen.config import SWAP_MODES


class StagingArea:
    """Two grow-on-demand staging buffers shaped like a paged KV cache.

    Each buffer is ``[capacity, *block_shape]`` in the cache's dtype, where
    ``block_shape`` is one block of one layer's cache (for vLLM's CPU layout
    ``[num_kv_heads, block_size, 2 * head_size]``).
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = [None, None]
        self.peak_blocks = 0

    def buffer(self, parity: int, like: torch.Tensor, blocks: int) -> torch.Tensor:
        """A buffer for ``parity`` with room for ``blocks`` blocks of ``like``."""
        current = self._buffers[parity]
        needed = max(blocks, 1)
        if (
            current is None
            or current.shape[0] < needed
            or current.shape[1:] != like.shape[1:]
            or current.dtype != like.dtype
        ):
            capacity = max(needed, 0 if current is None else current.shape[0])
            current = torch.empty(
                (capacity, *like.shape[1:]), dtype=like.dtype, device=like.device
            )
            self._buffers[parity] = current
        self.peak_blocks = max(self.peak_blocks, needed)
        return current

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers if b is not None)


class SwapHandle:
    """A submitted swap-in; :meth:`wait` returns the filled staging buffer."""

    def __init__(self, staging: torch.Tensor, future: Future[float] | None) -> None:
        self.staging = staging
        self._future = future
        self.copy_s = 0.0
        self.wait_s = 0.0

    def wait(self) -> torch.Tensor:
        if self._future is not None:
            start = time.perf_counter()
            self.copy_s = self._future.result()
            self.wait_s = time.perf_counter() - start
            self._future = None
        return self.staging


def _copy_blocks(
    host: torch.Tensor, src_block_ids: torch.Tensor, staging: torch.Tensor
) -> float:
    start = time.perf_counter()
    total = src_block_ids.numel()
    # vLLM runs the model under inference mode, and the staging buffers are
    # made there; a worker thread starts outside it, where writing into an
    # inference tensor is refused.
    with torch.inference_mode():
        if total:
            torch.index_select(host, 0, src_block_ids, out=staging[:total])
    return time.perf_counter() - start


class BlockCopier:
    """Submits host -> staging block copies, inline or on a worker thread."""

    MODES = tuple(mode for mode in SWAP_MODES if mode != "in_place")

    def __init__(self, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"copier mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.staging = StagingArea()
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="infinigen-swap")
            if mode == "thread"
            else None
        )

    def submit(
        self,
        layer_index: int,
        host: torch.Tensor,
        src_block_ids: torch.Tensor,
        extra_slots: int = 0,
    ) -> SwapHandle:
        """Copy ``host[src_block_ids]`` into the first slots of a staging buffer.

        Args:
            layer_index: selects the buffer (by parity).
            host: ``[num_blocks, *block_shape]`` the layer's host-tier cache.
            src_block_ids: ``[total]`` int64 block ids, in slot order.
            extra_slots: room to keep after them (filled later by
                :meth:`copy_at`, e.g. a prefill's whole context).
        """
        staging = self.staging.buffer(
            layer_index % 2, host, src_block_ids.numel() + extra_slots
        )
        if self._pool is None:
            handle = SwapHandle(staging, None)
            handle.copy_s = _copy_blocks(host, src_block_ids, staging)
            return handle
        future = self._pool.submit(_copy_blocks, host, src_block_ids, staging)
        return SwapHandle(staging, future)

    @staticmethod
    def copy_at(
        host: torch.Tensor,
        staging: torch.Tensor,
        src_block_ids: torch.Tensor,
        first_slot: int,
    ) -> None:
        """Copy ``host[src_block_ids]`` into consecutive slots from ``first_slot``."""
        total = src_block_ids.numel()
        if total:
            torch.index_select(
                host, 0, src_block_ids, out=staging[first_slot : first_slot + total]
            )

    @staticmethod
    def refresh(
        host: torch.Tensor,
        staging: torch.Tensor,
        src_block_ids: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        """Re-copy blocks written after the swap-in started (the newest ones)."""
        if src_block_ids.numel():
            staging.index_copy_(0, slots, host.index_select(0, src_block_ids))

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
