"""A backend wrapper that injects errors and latency into any backend, for tests.

:class:`FaultyBackend` wraps a real backend (the bytes really go to disk or to the
server); every operation passes through :meth:`FaultyBackend.hit` first, which records
it, sleeps if asked, and raises what the test's ``fault`` function returns. Operations
(the ``op`` a fault function sees) and the name each is given::

    list_names ""         exists, read_bytes, open_reader, delete   the name
    read      the file (RangeReader.read / read_into)
    begin     the checkpoint name       attach   the token
    create_file, write, close   the file name     commit   the pending token
    put_atomic   the name       sweep ""          check_access ""

``abort`` is never faulted: the contract says it never raises.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from ckptstore.errors import storage_error
from ckptstore.storage.base import (
    Capabilities,
    FileSink,
    PendingCheckpoint,
    RangeReader,
    StorageBackend,
)

# fault(op, name) -> the exception to raise, or None to let the call through.
Fault = Callable[[str, str], BaseException | None]

# What delay_s slows by default: the write path, as a slow disk or link would.
WRITE_PATH_OPS = frozenset({"begin", "write", "close", "commit", "put_atomic"})


class FaultyBackend(StorageBackend):
    """``inner`` with ``fault`` consulted before each operation and ``delay_s`` of
    latency added to each of ``delay_ops``.

    ``fault`` and ``delay_s`` may be changed while it is in use. ``calls`` lists every
    ``(op, name)`` seen, in order. Attributes the wrapper does not define (S3's
    ``open_uploads``, ``part_bytes``, ...) are the inner backend's, unfaulted.
    """

    def __init__(
        self,
        inner: StorageBackend,
        fault: Fault | None = None,
        delay_s: float = 0.0,
        *,
        delay_ops: Collection[str] = WRITE_PATH_OPS,
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.fault: Fault = fault or (lambda op, name: None)
        self.delay_s = delay_s
        self.delay_ops = frozenset(delay_ops)
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (during __init__ or unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def hit(self, op: str, name: str) -> None:
        """Record ``op`` on ``name``; sleep if it is slowed; raise if ``fault`` says so."""
        with self._lock:
            self.calls.append((op, name))
        if self.delay_s and op in self.delay_ops:
            time.sleep(self.delay_s)
        exc = self.fault(op, name)
        if exc is not None:
            raise exc

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def list_names(self) -> list[str]:
        self.hit("list_names", "")
        return self.inner.list_names()

    def exists(self, name: str) -> bool:
        self.hit("exists", name)
        return self.inner.exists(name)

    def read_bytes(self, name: str) -> bytes:
        self.hit("read_bytes", name)
        return self.inner.read_bytes(name)

    def open_reader(self, name: str) -> RangeReader:
        self.hit("open_reader", name)
        return _FaultyReader(self, name, self.inner.open_reader(name))

    def begin(self, name: str) -> PendingCheckpoint:
        self.hit("begin", name)
        return _FaultyPending(self, self.inner.begin(name))

    def attach(self, token: str) -> PendingCheckpoint:
        self.hit("attach", token)
        return _FaultyPending(self, self.inner.attach(token))

    def put_atomic(self, name: str, data: bytes) -> None:
        self.hit("put_atomic", name)
        self.inner.put_atomic(name, data)

    def delete(self, name: str) -> None:
        self.hit("delete", name)
        self.inner.delete(name)

    def swap(self, name: str, other: str) -> bool:
        self.hit("swap", name)
        return self.inner.swap(name, other)

    def move_aside(self, name: str, new_name: str) -> None:
        self.hit("move_aside", name)
        self.inner.move_aside(name, new_name)

    def discard_uncommitted(self, name: str, files: list[str]) -> list[str]:
        self.hit("discard_uncommitted", name)
        return self.inner.discard_uncommitted(name, files)

    def foreign_files(self, name: str) -> list[str]:
        self.hit("foreign_files", name)
        return self.inner.foreign_files(name)

    def sweep(self, grace_s: float) -> list[str]:
        self.hit("sweep", "")
        return self.inner.sweep(grace_s)

    def check_access(self) -> None:
        self.hit("check_access", "")
        self.inner.check_access()

    def join(self, *names: str) -> str:
        return self.inner.join(*names)


class _FaultyReader(RangeReader):
    def __init__(self, backend: FaultyBackend, name: str, inner: RangeReader) -> None:
        self.backend = backend
        self.name = name
        self.inner = inner
        self.size = inner.size

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)  # stream(), where the inner reader has it

    def read(self, offset: int, length: int) -> memoryview:
        self.backend.hit("read", self.name)
        return self.inner.read(offset, length)

    def read_into(self, offset: int, out: memoryview) -> None:
        self.backend.hit("read", self.name)
        self.inner.read_into(offset, out)

    def close(self) -> None:
        self.inner.close()


class _FaultyPending(PendingCheckpoint):
    def __init__(self, backend: FaultyBackend, inner: PendingCheckpoint) -> None:
        self.backend = backend
        self.inner = inner
        self.token = inner.token

    def stored_name(self, name: str) -> str:
        return self.inner.stored_name(name)

    def create_file(self, name: str, size_hint: int | None = None) -> FileSink:
        self.backend.hit("create_file", name)
        return _FaultySink(self.backend, name, self.inner.create_file(name, size_hint))

    def commit(self, manifest: bytes) -> None:
        self.backend.hit("commit", self.token)
        self.inner.commit(manifest)

    def abort(self) -> None:
        self.inner.abort()


class _FaultySink(FileSink):
    def __init__(self, backend: FaultyBackend, name: str, inner: FileSink) -> None:
        self.backend = backend
        self.name = name
        self.inner = inner

    @property
    def wants_alignment(self) -> bool:
        return self.inner.wants_alignment

    def write(self, data: Any) -> None:
        self.backend.hit("write", self.name)
        self.inner.write(data)

    def align(self, boundary: int) -> None:
        self.inner.align(boundary)

    def tell(self) -> int:
        return self.inner.tell()

    def close(self) -> int:
        try:
            self.backend.hit("close", self.name)
        except BaseException:
            self.inner.abort()  # a failed close leaves nothing behind, as a real one
            raise
        return self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


def fail_nth(
    op: str,
    exc: BaseException | Callable[[str, str], BaseException],
    *,
    nth: int = 1,
    name_part: str = "",
) -> Fault:
    """Fail the ``nth`` call of ``op`` on a name containing ``name_part``, once.

    ``exc`` is the exception to raise, or a function of ``(op, name)`` that makes it.
    Calls are counted across threads.
    """
    if nth < 1:
        raise ValueError(f"nth counts from 1, got {nth}")
    lock = threading.Lock()
    seen = [0]

    def fault(o: str, name: str) -> BaseException | None:
        if o != op or name_part not in name:
            return None
        with lock:
            seen[0] += 1
            if seen[0] != nth:
                return None
        return exc(o, name) if callable(exc) else exc

    return fault


def fail_once(op: str, code: int = errno.EIO, name_part: str = "") -> Fault:
    """Fail the first ``op`` on a name containing ``name_part`` with the
    :class:`~ckptstore.errors.StorageError` a real backend raises for ``OSError(code)``."""

    def make(o: str, name: str) -> BaseException:
        # What a real backend raises for this OSError, translated at its boundary.
        return storage_error(OSError(code, f"injected {errno.errorcode.get(code, code)}"), o, name)

    return fail_nth(op, make, name_part=name_part)
