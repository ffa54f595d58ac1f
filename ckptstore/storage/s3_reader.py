"""Reading S3 objects: a window cache for ranged reads, and whole-object streams."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from ckptstore.errors import StorageError
from ckptstore.storage.objectstore import ObjectStoreReader, translate_error
from ckptstore.storage.s3_options import MIB


class S3Reader(ObjectStoreReader):
    """Ranged reads through a small window cache, plus :meth:`stream` (one GET).

    A load reads a shard chunk by chunk (4 MiB each, ``threads`` at a time, front to
    back). One ranged GET per chunk is a request per 4 MiB, and some servers re-read
    the whole object for each; instead a small read fetches the aligned 16 MiB window
    around it, and the next chunks come from that window. Readers of one window wait
    for a single fetch. At most ``WINDOWS`` windows are kept per open file.
    """

    WINDOW = 16 * MIB
    WINDOWS = 4

    def __init__(self, fs: Any, path: str, run: Callable[[Any], Any]) -> None:
        """``run(coroutine)``: its result, run on s3fs's event loop (with a timeout)."""
        super().__init__(fs, path)
        self._run = run
        self._lock = threading.Lock()
        self._windows: OrderedDict[int, Future[bytes]] = OrderedDict()

    def read(self, offset: int, length: int) -> memoryview:
        first, last = offset // self.WINDOW, (offset + length - 1) // self.WINDOW
        if length == 0 or length >= self.WINDOW or last - first > 1 or offset < 0:
            return super().read(offset, length)
        if offset + length > self.size:
            return super().read(offset, length)  # raises: past the end
        parts = [self._window(i) for i in range(first, last + 1)]
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        start = offset - first * self.WINDOW
        return memoryview(data)[start : start + length]

    def _window(self, index: int) -> bytes:
        with self._lock:
            fut = self._windows.get(index)
            mine = fut is None
            if fut is None:
                fut = self._windows[index] = Future()
                while len(self._windows) > self.WINDOWS:
                    self._windows.popitem(last=False)
            else:
                self._windows.move_to_end(index)
        if mine:
            start = index * self.WINDOW
            try:
                fut.set_result(bytes(super().read(start, min(self.WINDOW, self.size - start))))
            except BaseException as exc:
                with self._lock:  # a failed fetch is not cached: the next read retries
                    if self._windows.get(index) is fut:
                        del self._windows[index]
                fut.set_exception(exc)
                raise
        return fut.result()

    def close(self) -> None:
        with self._lock:
            self._windows.clear()

    def stream(self, piece_bytes: int) -> Iterator[bytes]:
        """The object front to back in pieces of ``piece_bytes`` (the last may be
        shorter), from one GET: copying a whole file this way avoids a request per
        piece, and servers that re-read the object for every ranged GET."""
        bucket, key, _ = self.fs.split_path(self.path)
        run = self._run
        try:
            body = run(self.fs._call_s3("get_object", Bucket=bucket, Key=key))["Body"]
        except Exception as exc:
            raise translate_error(exc, "read", self.path) from exc
        try:
            buf = bytearray()
            got = 0
            while True:
                try:
                    data = run(body.read(piece_bytes - len(buf)))
                except Exception as exc:
                    raise translate_error(exc, "read", self.path) from exc
                if not data:
                    break
                buf += data
                got += len(data)
                if len(buf) >= piece_bytes:
                    yield bytes(buf)
                    buf = bytearray()
            if buf:
                yield bytes(buf)
            if got != self.size:
                raise StorageError(f"short read from {self.path}: {got} of {self.size} B")
        finally:
            with contextlib.suppress(Exception):
                body.close()
