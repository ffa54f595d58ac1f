"""Backend wrappers that inject real I/O errors and latency into any backend.

They wrap a real backend (the bytes really go to disk); at the chosen operation they
raise the ``OSError`` a failing disk would raise, or sleep.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import Any

from ckptstore.errors import storage_error
from ckptstore.storage import FileSink, PendingCheckpoint, RangeReader, StorageBackend

# fault(op, name) -> an exception to raise, or None. ops: "write", "close", "commit",
# "write_file", "begin".
Fault = Callable[[str, str], BaseException | None]


class FaultyBackend(StorageBackend):
    def __init__(
        self, inner: StorageBackend, fault: Fault | None = None, delay_s: float = 0.0
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.fault = fault or (lambda op, name: None)
        self.delay_s = delay_s
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def hit(self, op: str, name: str) -> None:
        with self._lock:
            self.calls.append((op, name))
        if self.delay_s:
            time.sleep(self.delay_s)
        exc = self.fault(op, name)
        if exc is not None:
            raise exc

    def is_local(self) -> bool:
        return self.inner.is_local()

    def list_names(self) -> list[str]:
        return self.inner.list_names()

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def read_bytes(self, name: str) -> bytes:
        return self.inner.read_bytes(name)

    def open_reader(self, name: str) -> RangeReader:
        return self.inner.open_reader(name)

    def begin(self, name: str) -> PendingCheckpoint:
        self.hit("begin", name)
        return _FaultyPending(self, self.inner.begin(name))

    def attach(self, token: str) -> PendingCheckpoint:
        return _FaultyPending(self, self.inner.attach(token))

    def put_atomic(self, name: str, data: bytes) -> None:
        self.hit("put_atomic", name)
        self.inner.put_atomic(name, data)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def sweep(self, grace_s: float) -> list[str]:
        return self.inner.sweep(grace_s)


class _FaultyPending(PendingCheckpoint):
    def __init__(self, backend: FaultyBackend, inner: PendingCheckpoint) -> None:
        self.backend = backend
        self.inner = inner
        self.token = inner.token

    def stored_name(self, name: str) -> str:
        return self.inner.stored_name(name)

    def create_file(self, name: str) -> FileSink:
        return _FaultySink(self.backend, name, self.inner.create_file(name))

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
            self.inner.abort()
            raise
        return self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


def fail_once(op: str, code: int = errno.EIO, name_part: str = "") -> Fault:
    """Fail the first ``op`` on a file whose name contains ``name_part``, then never again."""
    fired = threading.Event()

    def fault(o: str, name: str) -> BaseException | None:
        if o == op and name_part in name and not fired.is_set():
            fired.set()
            # What a real backend raises for this OSError, translated at its boundary.
            return storage_error(
                OSError(code, f"injected {errno.errorcode.get(code, code)}"), o, name
            )
        return None

    return fault
