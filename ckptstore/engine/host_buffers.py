"""Host memory for staging: exactly the size asked for, pinned where CUDA is used.

A :class:`HostBuffer` is a private anonymous ``mmap`` (page-aligned, so O_DIRECT writes
go straight from it) with ``MADV_HUGEPAGE`` where the kernel has it (a shared mapping
would ignore it) and ``MADV_DONTFORK`` (a forked DataLoader worker neither inherits the
pinned pages nor makes them copy-on-write). With ``pin=True`` and
CUDA available it is registered with ``cudaHostRegister`` (as DCP's own stager does)
rather than taken from torch's pinned allocator, which rounds every request up to the
next power of two and keeps freed blocks for the life of the process: here 2.05 GiB
of state pins 2.05 GiB, and :meth:`HostBuffer.close` gives it back. Registered
``malloc``/``mmap`` memory also works with O_DIRECT, where ``cudaHostAlloc`` memory may
fail with EFAULT.

Registration is undone before the mapping can go away: the buffer holds the mapping,
and torch views of it keep the mapping (not the registration) alive after ``close``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import weakref
from typing import Any

import torch

from ckptstore.units import format_bytes

__all__ = ["HostBuffer"]

log = logging.getLogger(__name__)

# cudaHostRegisterPortable: pinned for every CUDA context, so one buffer serves copies
# from any device of the process (torch.cuda._pin_memory_utils passes the same flag).
_REGISTER_PORTABLE = 1


class HostBuffer:
    """``nbytes`` of page-aligned host memory as a uint8 tensor, pinned if asked and possible.

    ``device``: the GPU whose context registers (and later unregisters) the memory; the
    registration is portable, so copies from any device of the process use it pinned.
    """

    def __init__(self, nbytes: int, *, pin: bool = False, device: int | None = None) -> None:
        self.nbytes = nbytes
        self.pinned = False
        self._mmap: mmap.mmap | None = None
        if nbytes == 0:
            self.tensor = torch.empty(0, dtype=torch.uint8)
            self._finalizer = None
            return
        self._mmap = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for advice in ("MADV_HUGEPAGE", "MADV_DONTFORK"):
            # Without THP MADV_HUGEPAGE fails: 4 KiB pages, a slower first save only.
            if hasattr(mmap, advice):
                with contextlib.suppress(OSError):
                    self._mmap.madvise(getattr(mmap, advice))
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        ptr = self.tensor.data_ptr()
        if pin and torch.cuda.is_available():
            self.pinned = _register(ptr, nbytes, device)
        self._finalizer = weakref.finalize(self, _release, ptr if self.pinned else None, device)
        # Never at interpreter exit: the CUDA context may already be gone by then.
        self._finalizer.atexit = False

    def close(self) -> None:
        """Unpin and drop this buffer's mapping (views still held keep it, unpinned)."""
        if self._finalizer is not None:
            self._finalizer()
        self.pinned = False
        self._mmap = None
        self.tensor = torch.empty(0, dtype=torch.uint8)


def _on(device: int | None) -> Any:
    """The CUDA runtime calls run with ``device`` current: a thread that never chose one
    would otherwise create a context on cuda:0 (hundreds of MB there, on every rank)."""
    return contextlib.nullcontext() if device is None else torch.cuda.device(device)


def _register(ptr: int, nbytes: int, device: int | None) -> bool:
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    with _on(device):
        code = int(cudart.cudaHostRegister(ptr, nbytes, _REGISTER_PORTABLE))
    if code != 0:
        # Pinning is a matter of speed (and of limits such as RLIMIT_MEMLOCK): copy
        # through pageable memory rather than fail the save. The failed call left its
        # error as the thread's last CUDA error, which torch would otherwise report as
        # the failure of the next kernel launched on this thread.
        _clear_last_cuda_error()
        log.warning(
            "could not pin %s of staging memory (cudaHostRegister error %d); device-to-host "
            "copies into it will be slower",
            format_bytes(nbytes),
            code,
        )
        return False
    return True


def _clear_last_cuda_error() -> bool:
    """``cudaGetLastError()`` (which resets it) of the CUDA runtime this process already
    loaded (torch binds no such call); never another copy, which would start a runtime
    of its own. False where none is loaded."""
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libcudart.so" in line}
        for path in sorted(paths):
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(path).cudaGetLastError()
                return True
    return False


def _release(ptr: int | None, device: int | None) -> None:
    if ptr is not None:
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        with _on(device):
            code = int(cudart.cudaHostUnregister(ptr))
        if code != 0:
            log.warning("cudaHostUnregister of a staging buffer failed with error %d", code)
