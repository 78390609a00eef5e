"""The CUDA tier's host memory: an exact-size pinned pool seen from the GPU.

:class:`PinnedHostPool` is an exact-size, page-aligned host buffer
registered with ``cudaHostRegister`` (not ``pin_memory=True``, which rounds
up to a power of two), and a CUDA tensor aliasing it through unified
virtual addressing (UVA), so kernels read and write host memory in place.
:meth:`PinnedHostPool.layer_views` carves per-layer paged views in which
one block of one layer is one contiguous byte run. The design of the tiers:
``docs/cuda.md``, "Tiers"; where each part has run: "What ran where".

It imports no vLLM and nothing else of the package (torch and the CUDA
runtime and driver libraries through ctypes), so that
``benchmarks/gpu_check.py`` runs where only torch and Triton exist.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import mmap
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

# cudaHostRegister flags (cuda_runtime_api.h): portable to every context,
# and mapped into the device address space (what the UVA view reads).
HOST_REGISTER_PORTABLE = 0x01
HOST_REGISTER_MAPPED = 0x02
# cudaDevAttrCanUseHostPointerForRegisteredMem (= the driver's
# CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM).
_ATTR_HOST_POINTER_FOR_REGISTERED_MEM = 91


def _cuda_index(device: torch.device | str) -> int:
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"a pinned host pool maps into a CUDA device, got {dev}")
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{what} needs a CUDA device, and torch sees none "
            f"(torch {torch.__version__}, built with CUDA "
            f"{torch.version.cuda}); use the CPU tier on this machine"
        )


def _error_code(result: Any) -> int:
    """``torch.cuda.cudart()`` returns a pybind enum; ctypes an int."""
    return int(getattr(result, "value", result))


def _cuda_error_text(code: int) -> str:
    with contextlib.suppress(Exception):
        cudart = torch.cuda.cudart()
        return str(cudart.cudaGetErrorString(cudart.cudaError(code)))
    return "unknown error"


def _clear_last_cuda_error() -> None:
    """Read off the CUDA runtime's last error after a failed call, so that
    the next kernel launch check does not report it (best effort: through
    the libcudart torch has loaded, found in ``/proc/self/maps``)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
    except OSError:
        return
    for path in paths:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(path).cudaGetLastError()


@functools.cache
def _driver() -> ctypes.CDLL | None:
    """The CUDA driver library, or None where it cannot be loaded."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuInit(0)
    except (OSError, AttributeError):
        return None
    return lib


def can_use_host_pointer_for_registered_mem(index: int) -> int | None:
    """The device attribute ``CanUseHostPointerForRegisteredMem`` (0 or 1):
    whether kernels reach registered host memory at its host address.
    None when the driver library cannot be queried."""
    lib = _driver()
    if lib is None:
        return None
    dev, value = ctypes.c_int(), ctypes.c_int()
    if lib.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(index)) != 0:
        return None
    status = lib.cuDeviceGetAttribute(
        ctypes.byref(value), ctypes.c_int(_ATTR_HOST_POINTER_FOR_REGISTERED_MEM), dev
    )
    return int(value.value) if status == 0 else None


def mapped_device_pointer(host_ptr: int) -> int | None:
    """The driver's device address of registered host memory
    (``cuMemHostGetDevicePointer``), or None when it cannot say."""
    lib = _driver()
    if lib is None:
        return None
    out = ctypes.c_uint64()
    try:
        fn = lib.cuMemHostGetDevicePointer_v2
    except AttributeError:
        return None
    status = fn(ctypes.byref(out), ctypes.c_void_p(host_ptr), ctypes.c_uint(0))
    return int(out.value) if status == 0 else None


class _HostArray:
    """``__cuda_array_interface__`` of registered host memory: lets
    ``torch.as_tensor`` wrap it as a CUDA tensor without a copy. Holds the
    host tensor so the memory outlives every view made from it."""

    def __init__(self, host: torch.Tensor) -> None:
        self._host = host
        self.__cuda_array_interface__ = {
            "shape": (host.numel(),),
            "typestr": "|u1",
            "data": (host.data_ptr(), False),
            "strides": None,
            "version": 3,
        }


def _unregister(ptr: int, index: int, backing: torch.Tensor) -> None:
    """Finalizer of a pool: wait for the device's work (kernels may still
    read the views), unregister, then let ``backing`` go with the finalizer.
    Quiet at interpreter exit, where the CUDA runtime may be gone already."""
    try:
        torch.cuda.synchronize(index)
        code = _error_code(torch.cuda.cudart().cudaHostUnregister(ptr))
    except Exception:  # interpreter shutdown: nothing left to release
        return
    if code != 0:
        _clear_last_cuda_error()
        logger.warning(
            "cudaHostUnregister(0x%x, %d bytes) failed: %s (%d)",
            ptr,
            backing.numel(),
            _cuda_error_text(code),
            code,
        )


class PinnedHostPool:
    """Exact-size pinned host memory with a CUDA view aliasing it (UVA).

    The host buffer is page-aligned and registered with
    ``cudaHostRegister`` (portable, mapped) over its size rounded up to a
    page, so a 100 GB pool pins 100 GB. The device view is built by
    ``view_fn`` (e.g. vLLM's ``get_accelerator_view_from_cpu_tensor``) or,
    without one, from ``__cuda_array_interface__`` at the host address,
    which is valid when the device's ``CanUseHostPointerForRegisteredMem``
    is 1 (checked). Either way the view must alias the host buffer: some
    vLLM versions silently copy unpinned input, so the pointers are
    compared.

    Attributes:
        host: ``[nbytes]`` uint8 CPU tensor (pinned).
        device_view: ``[nbytes]`` uint8 CUDA tensor at the same memory.
        nbytes: usable bytes.
        device: the CUDA device the view belongs to.
        register_s: seconds ``cudaHostRegister`` took.
        host_pointer_ok: the device attribute (None if not queried).

    Views stay valid until :meth:`release`; kernels reading them after it
    fault.
    """

    def __init__(
        self,
        nbytes: int,
        device: torch.device | str = "cuda",
        *,
        view_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        flags: int = HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED,
    ) -> None:
        _require_cuda("PinnedHostPool")
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        index = _cuda_index(device)
        self.device = torch.device("cuda", index)
        self.nbytes = int(nbytes)
        page = mmap.PAGESIZE
        registered = -(-self.nbytes // page) * page
        backing = torch.empty(registered + page, dtype=torch.uint8)
        offset = (-backing.data_ptr()) % page
        region = backing[offset : offset + registered]
        self.host = region[: self.nbytes]
        ptr = region.data_ptr()
        cudart = torch.cuda.cudart()
        start = time.perf_counter()
        with torch.cuda.device(index):
            code = _error_code(cudart.cudaHostRegister(ptr, registered, flags))
        self.register_s = time.perf_counter() - start
        if code != 0:
            _clear_last_cuda_error()
            raise RuntimeError(
                f"cudaHostRegister of {registered} bytes failed: "
                f"{_cuda_error_text(code)} ({code}); check host memory and "
                "RLIMIT_MEMLOCK"
            )
        self._finalizer = weakref.finalize(self, _unregister, ptr, index, backing)
        self.host_pointer_ok = can_use_host_pointer_for_registered_mem(index)
        try:
            self.device_view = self._make_view(view_fn)
        except BaseException:
            self.release()
            raise

    def _make_view(
        self, view_fn: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> torch.Tensor:
        if view_fn is not None:
            view = view_fn(self.host)
        else:
            if self.host_pointer_ok != 1:
                raise RuntimeError(
                    f"{self.device} cannot use host pointers for registered "
                    f"memory (CanUseHostPointerForRegisteredMem="
                    f"{self.host_pointer_ok}); pass view_fn (vLLM's "
                    "get_accelerator_view_from_cpu_tensor)"
                )
            view = torch.as_tensor(_HostArray(self.host), device=self.device)
        if view.device.type != "cuda" or view.data_ptr() != self.host.data_ptr():
            raise RuntimeError(
                "the device view does not alias the pinned host buffer "
                f"(view at 0x{view.data_ptr():x} on {view.device}, host at "
                f"0x{self.host.data_ptr():x}): the view function copied it"
            )
        return view.view(torch.uint8).reshape(self.nbytes)

    @property
    def is_pinned(self) -> bool:
        """What torch says of the host buffer (``cudaPointerGetAttributes``)."""
        return bool(self.host.is_pinned())

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    def layer_views(
        self,
        num_layers: int,
        num_blocks: int,
        block_shape: Sequence[int],
        dtype: torch.dtype = torch.uint8,
        *,
        offset: int = 0,
        on_device: bool = True,
    ) -> list[torch.Tensor]:
        """Per-layer paged views, layer-major then block-major.

        Layer ``l`` is ``[num_blocks, *block_shape]`` of ``dtype``
        (e.g. ``[num_blocks, block_size, num_kv_heads, 2 * head_size]``),
        and one block of one layer is one contiguous byte run.

        Args:
            offset: byte offset of layer 0's block 0 in the pool.
            on_device: views of :attr:`device_view` (else of :attr:`host`).

        Raises:
            ValueError: the layers do not fit, or ``offset`` is not a
                multiple of the element size.
        """
        itemsize = torch.empty((), dtype=dtype).element_size()
        block_bytes = math.prod(block_shape) * itemsize
        total = num_layers * num_blocks * block_bytes
        if offset % itemsize or offset < 0:
            raise ValueError(f"offset {offset} is not a multiple of {itemsize}")
        if offset + total > self.nbytes:
            raise ValueError(
                f"{num_layers} layers x {num_blocks} blocks x {block_bytes} "
                f"bytes from offset {offset} exceed the pool's {self.nbytes}"
            )
        base = self.device_view if on_device else self.host
        typed = base[offset : offset + total].view(dtype)
        return list(typed.view(num_layers, num_blocks, *block_shape).unbind(0))

    def release(self) -> None:
        """Wait for the device, then unregister the host memory (idempotent;
        also run when the pool is collected and at interpreter exit)."""
        self._finalizer()

    def __repr__(self) -> str:
        state = "released" if self.released else "registered"
        return f"PinnedHostPool({self.nbytes} bytes, {self.device}, {state})"


__all__ = [
    "PinnedHostPool",
    "can_use_host_pointer_for_registered_mem",
    "mapped_device_pointer",
]
