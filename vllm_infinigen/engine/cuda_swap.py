"""The CUDA tier's swap-in: parity staging buffers, a side stream, counters.

* :class:`SwapEngine`: two parity staging buffers of fixed capacity, a side
  stream and one event per layer (fork on ``ready``, join in
  :meth:`SwapEngine.wait`); the copy is :func:`~.cuda_copy.gather_blocks`.
* :class:`DeviceCounters`: blocks and bytes read, accumulated on the device.

Like ``cuda_copy``, it imports no vLLM and nothing of the package beyond
``cuda_copy`` (torch only). Nothing on the decode path synchronises with the
host: :meth:`SwapEngine.start`, :meth:`SwapEngine.wait` and
:meth:`DeviceCounters.add`. Where each part has run: ``docs/cuda.md``,
"What ran where".
"""

from __future__ import annotations

import torch

from vllm_infinigen.engine.cuda_copy import (
    CopyLaunch,
    FixedPlan,
    as_block_rows,
    gather_blocks,
)


class SwapEngine:
    """Swap-in of selected blocks into two parity staging buffers.

    Layer ``L``'s blocks go to buffer ``L % 2``, so the swap-in for ``L``
    (started while layer ``L - 1`` runs) never overwrites what ``L - 1``'s
    attention reads. On CUDA the copy runs on a side stream: :meth:`start`
    forks it after ``ready`` (or after all work queued so far on the
    current stream) and records the layer's event; :meth:`wait` joins it.
    Neither waits for the device. The buffers are allocated once, at
    construction (CUDA-graph safe); ``ready`` must lie after the last read
    of the buffer being overwritten (layer ``L - 2``'s attention).

    On CPU (and with ``side_stream=False``) :meth:`start` copies inline on
    the current stream and :meth:`wait` does nothing.
    """

    def __init__(
        self,
        capacity: int,
        block_bytes: int,
        num_layers: int,
        device: torch.device | str = "cuda",
        *,
        side_stream: bool = True,
        launch: CopyLaunch | None = None,
    ) -> None:
        """
        Args:
            capacity: staging slots per buffer (``R_max * width``).
            block_bytes: bytes of one block of one layer.
            num_layers: layers that swap (one event each).
            device: where the staging buffers live.
            side_stream: copy on a side stream (CUDA only).
            launch: Triton launch shape of each copy (default
                :class:`~.cuda_copy.CopyLaunch`).
        """
        if capacity <= 0 or block_bytes <= 0 or num_layers <= 0:
            raise ValueError(
                "capacity, block_bytes and num_layers must be positive, got "
                f"{capacity}, {block_bytes}, {num_layers}"
            )
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.capacity = capacity
        self.block_bytes = block_bytes
        self.num_layers = num_layers
        self.launch = launch
        self.buffers = tuple(
            torch.empty(capacity, block_bytes, dtype=torch.uint8, device=self.device)
            for _ in range(2)
        )
        self.stream: torch.cuda.Stream | None = None
        self._done: list[torch.cuda.Event] = []
        if self.device.type == "cuda" and side_stream:
            self.stream = torch.cuda.Stream(device=self.device)
            self._done = [torch.cuda.Event() for _ in range(num_layers)]
            for buffer in self.buffers:
                # Freed only with the engine: then after the side stream's
                # last copy into it, not just the current stream's work.
                buffer.record_stream(self.stream)

    def buffer(self, layer: int) -> torch.Tensor:
        """``[capacity, block_bytes]`` uint8 staging buffer of ``layer``."""
        return self.buffers[layer % 2]

    @property
    def nbytes(self) -> int:
        return 2 * self.capacity * self.block_bytes

    def start(
        self,
        layer: int,
        src: torch.Tensor,
        plan: FixedPlan,
        ready: torch.cuda.Event | None = None,
    ) -> torch.Tensor:
        """Start copying ``src[plan.src_ids]`` into slots ``0..R*width`` of
        ``buffer(layer)`` and return that buffer (filled once
        :meth:`wait` has been called on the consuming stream).

        Args:
            layer: selects the buffer (parity) and the event.
            src: ``[num_blocks, ...]`` the layer's pool (UVA view), blocks
                of ``block_bytes`` bytes.
            plan: from :func:`~.cuda_copy.plan_fixed_capacity`.
            ready: event after which the side stream may read
                ``plan.src_ids`` and overwrite the buffer; None: all work
                queued on the current stream so far.
        """
        n = plan.src_ids.shape[0]
        if n > self.capacity:
            raise ValueError(
                f"plan needs {n} staging slots, the engine holds {self.capacity}"
            )
        rows = as_block_rows(src)
        if rows.shape[1] != self.block_bytes:
            raise ValueError(
                f"pool blocks are {rows.shape[1]} bytes, staging expects "
                f"{self.block_bytes}"
            )
        buffer = self.buffer(layer)
        if self.stream is None:
            gather_blocks(rows, plan.src_ids, buffer[:n], launch=self.launch)
            return buffer
        current = torch.cuda.current_stream(self.device)
        if ready is None:
            self.stream.wait_stream(current)
        else:
            self.stream.wait_event(ready)
        with torch.cuda.stream(self.stream):
            gather_blocks(rows, plan.src_ids, buffer[:n], launch=self.launch)
            self._done[layer].record(self.stream)
        if not torch.cuda.is_current_stream_capturing():
            # The plan may be freed on the current stream before the copy
            # has read it; under capture the caller's buffers are static.
            plan.src_ids.record_stream(self.stream)
        return buffer

    def wait(self, layer: int) -> None:
        """Make the current stream wait for ``layer``'s copy (no host sync)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self._done[layer])


class DeviceCounters:
    """Blocks and bytes swapped in, and steps, accumulated on the device.

    :meth:`add` never syncs; :meth:`snapshot` copies the counters into a
    pinned host tensor and waits for that copy (and the work queued before
    it on the current stream): call it only when the numbers are asked for.
    """

    FIELDS = ("blocks_read", "bytes_read", "steps")

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        self._values = torch.zeros(
            len(self.FIELDS), dtype=torch.int64, device=self.device
        )
        self._host = torch.zeros(
            len(self.FIELDS),
            dtype=torch.int64,
            pin_memory=self.device.type == "cuda",
        )

    def add(self, plan_counts: torch.Tensor, block_bytes: int) -> None:
        """Count one layer-step that read ``plan_counts.sum()`` blocks of
        ``block_bytes`` bytes each."""
        total = plan_counts.sum().to(torch.int64)
        self._values[0].add_(total)
        self._values[1].add_(total * block_bytes)
        self._values[2].add_(1)

    def snapshot(self) -> dict[str, int]:
        """The counters now (syncs with the device; see the class doc)."""
        if self.device.type == "cuda":
            self._host.copy_(self._values, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            event.synchronize()
        else:
            self._host.copy_(self._values)
        return dict(zip(self.FIELDS, self._host.tolist(), strict=True))

    def reset(self) -> None:
        self._values.zero_()


__all__ = ["DeviceCounters", "SwapEngine"]
