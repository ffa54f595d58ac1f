"""Real OS calls of ckptstore's local backend, counted, and failed one at a time.

:class:`OsFaults` stands in for the ``os`` and ``fcntl`` modules and for libc's
``renameat2`` inside ``ckptstore.storage.local`` and the module it writes files with,
``ckptstore.storage._direct_io``, and its reader's, ``ckptstore.storage._local_read``, and
nowhere else (torch, pytest and the test's own
file handling keep the real ones). Every call still goes to the real
OS; it is counted and labelled with the file it touches, and the chosen one fails with
the errno a failing disk gives: before it happens, or after it took effect (a rename
whose reply was lost). ``close`` always really closes before failing, as Linux does.

Labels name files relative to the checkpoint root with the volatile parts replaced
(``write(<tmp>/__0_0.distcp)``, ``fsync(<root>)``), so two saves of the same state
make the same sequence of labels, and call *n* of one save is call *n* of the next.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ckptstore.storage._direct_io as direct_io_mod
import ckptstore.storage._local_read as local_read_mod
import ckptstore.storage.local as local_mod

# Every file-system call the local backend makes through ``os`` (others pass through).
OS_CALLS = frozenset(
    {
        "open",
        "write",
        "pwrite",
        "writev",
        "pwritev",
        "fsync",
        "fdatasync",
        "ftruncate",
        "close",
        "rename",
        "replace",
        "unlink",
        "mkdir",
        "makedirs",
        "rmdir",
    }
)
FCNTL_CALLS = frozenset({"fcntl", "flock"})
# Calls after which the operation has happened whatever they return.
_ALWAYS_EFFECTIVE = frozenset({"close"})


@dataclass(frozen=True)
class Call:
    n: int  # 1-based position among the calls counted since the last reset()
    name: str
    path: str  # the file it touches, as a label (see module docstring)
    thread: str

    @property
    def label(self) -> str:
        return f"{self.name}({self.path})"


class OsFaults:
    """Counts the local backend's OS calls; fails the chosen ones.

    ``fail_at``: fail call number ``n`` (1-based, counted from the last :meth:`reset`).
    ``fail_if``: fail every call the predicate accepts, up to ``times`` of them.
    ``after``: let the failing call take effect, then raise.
    ``short_writes``: every ``write`` writes only part of what it was given.
    ``zero_writes``: every ``write`` returns 0 and writes nothing.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.calls: list[Call] = []
        self.fired: list[Call] = []
        self.short: list[tuple[Call, int, int]] = []  # (call, asked, written)
        self.fail_at: int | None = None
        self.fail_if: Callable[[Call], bool] | None = None
        self.times = 1
        self.code = errno.EIO
        self.after = False
        self.short_writes = False
        self.zero_writes = False
        self._lock = threading.Lock()
        self._undo: list[tuple[Any, str, Any]] = []

    # ---- control --------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the calls counted so far and every armed fault."""
        with self._lock:
            self.calls = []
            self.fired = []
            self.short = []
            self.fail_at = None
            self.fail_if = None
            self.times = 1
            self.code = errno.EIO
            self.after = False
            self.short_writes = False
            self.zero_writes = False

    def labels(self) -> list[str]:
        with self._lock:
            return [c.label for c in self.calls]

    def install(self, *, renameat2: bool = True) -> OsFaults:
        """Replace the modules inside ckptstore.storage.local, ._direct_io and ._local_read;
        :meth:`uninstall` undoes it.

        ``renameat2=False`` makes the backend believe the kernel lacks it, so its
        fallback (``os.rename``) runs.
        """
        libc: Any = False
        if renameat2:
            real = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc = _Libc(real, self)
        os_mod, fcntl_mod = _Module(os, OS_CALLS, self), _Module(fcntl, FCNTL_CALLS, self)
        for mod, attr, new in (
            (local_mod, "os", os_mod),
            (local_mod, "fcntl", fcntl_mod),
            (direct_io_mod, "os", os_mod),
            (direct_io_mod, "fcntl", fcntl_mod),
            (direct_io_mod, "_libc", libc),
            (local_read_mod, "os", os_mod),
        ):
            self._undo.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, new)
        return self

    def uninstall(self) -> None:
        while self._undo:
            mod, attr, old = self._undo.pop()
            setattr(mod, attr, old)

    # ---- called by the stand-ins ----------------------------------------------------
    def label_path(self, target: Any) -> str:
        if isinstance(target, int):
            try:
                path = os.readlink(f"/proc/self/fd/{target}")
            except OSError:
                return f"fd{target}"
            path = path.removesuffix(" (deleted)")
        else:
            path = os.fsdecode(target)
        path = os.path.realpath(path)
        if path == self.root:
            return "<root>"
        if path.startswith(self.root + os.sep):
            path = path[len(self.root) + 1 :]
            path = re.sub(r"^\.tmp-step_\d+-[0-9a-f]+", "<tmp>", path)
            path = re.sub(r"^\.pointer-(.+)-[0-9a-f]+$", r"<pointer-tmp \1>", path)
            return re.sub(r"step_\d+", "<step>", path)
        return path

    def enter(self, name: str, target: Any) -> tuple[Call, bool]:
        """Count one call; return it and whether it must fail."""
        call_path = self.label_path(target)
        with self._lock:
            call = Call(len(self.calls) + 1, name, call_path, threading.current_thread().name)
            self.calls.append(call)
            fail = self.fail_at == call.n or (
                self.fail_if is not None and len(self.fired) < self.times and self.fail_if(call)
            )
            if fail:
                self.fired.append(call)
        return call, fail

    def error(self, call: Call) -> OSError:
        code = self.code
        return OSError(code, f"injected {errno.errorcode.get(code, code)} ({call.label})")


class _Module:
    """A module whose listed functions are counted and can fail; the rest pass through."""

    def __init__(self, real: Any, names: frozenset[str], faults: OsFaults) -> None:
        self._real = real
        self._names = names
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name not in self._names:
            return attr
        faults = self._faults

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            target = args[0] if args else kwargs.get("path", kwargs.get("fd"))
            call, fail = faults.enter(name, target)
            if fail:
                if faults.after or name in _ALWAYS_EFFECTIVE:
                    attr(*args, **kwargs)
                raise faults.error(call)
            if name == "write" and faults.zero_writes:
                return 0
            if name == "write" and faults.short_writes:
                return _short_write(faults, call, *args)
            return attr(*args, **kwargs)

        return wrapped


def _short_write(faults: OsFaults, call: Call, fd: int, data: Any) -> int:
    """Write part of ``data``, as a write interrupted by a signal or a full pipe does.

    With O_DIRECT a write must stay a whole number of blocks, so it is cut at one.
    """
    mv = memoryview(data).cast("B")
    direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
    if direct:
        keep = (mv.nbytes // 2) // 4096 * 4096
        if keep == 0:
            keep = mv.nbytes  # one block: cannot be cut
    else:
        keep = max(1, mv.nbytes // 2) if mv.nbytes > 1 else mv.nbytes
    written = os.write(fd, mv[:keep])
    with faults._lock:
        faults.short.append((call, mv.nbytes, written))
    return written


class _Libc:
    """libc with ``renameat2`` counted and failable (errno set as the real call sets it)."""

    def __init__(self, real: Any, faults: OsFaults) -> None:
        self._real = real
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def renameat2(self, olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> int:
        _, fail = self._faults.enter("renameat2", old)
        if fail:
            if self._faults.after:
                rc = self._real.renameat2(olddirfd, old, newdirfd, new, flags)
                assert rc == 0, f"the real renameat2 failed: errno {ctypes.get_errno()}"
            ctypes.set_errno(self._faults.code)
            return -1
        return int(self._real.renameat2(olddirfd, old, newdirfd, new, flags))
