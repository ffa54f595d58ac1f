"""Reading a checkpoint's local files, for :mod:`ckptstore.storage.local`; private to
``storage/``.

* :class:`LocalReader`: a checkpoint's file read at offsets, opened by
  :func:`open_regular` (which refuses anything but a regular file).
* :func:`read_small`: a small file read whole (manifests, ``.metadata``, pointers), with
  a cap on its size.

Every OS call goes through this module's ``os`` global: the fault-injection tests
replace it (as in ``_direct_io.py`` and ``local.py``) to count and fail each call.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from ckptstore.errors import CorruptCheckpointError, StorageError, storage_error
from ckptstore.storage.base import RangeReader


def open_regular(path: str, root: str | None = None) -> tuple[int, int]:
    """``(fd, size)`` of the regular file ``path``, opened for reading.

    Anything else under a checkpoint's names is refused as corrupt (and, under ``root``,
    a file where a directory of it should be, ENOTDIR): a FIFO would block
    ``open()`` forever (hence O_NONBLOCK, which regular files ignore); a directory, a
    device or a socket is not something ckptstore wrote there either. (A directory was
    a :class:`StorageError`, EISDIR, until 2026-12-07: then a directory in a shard's
    place stopped a resume instead of making that one checkpoint damaged.)
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise  # "absent" is an answer, not an I/O failure
    except NotADirectoryError as exc:
        above = os.path.abspath(_file_above(path))
        if root is None or os.path.dirname(above) == above or not _under(above, root):
            raise storage_error(exc, "open", path) from exc  # the root is not a directory
        raise CorruptCheckpointError(
            f"{above}: a file where ckptstore makes a directory, so "
            f"{os.path.basename(path)} cannot be read under it. Remove it (a damaged "
            "checkpoint: restore an earlier one)"
        ) from exc
    except OSError as exc:
        raise storage_error(exc, "open", path) from exc
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise storage_error(exc, "stat", path) from exc
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = (
            "directory"
            if stat.S_ISDIR(st.st_mode)
            else "FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "socket or device"
        )
        raise CorruptCheckpointError(
            f"{path}: a {kind}, not a regular file; ckptstore writes only regular files there, "
            "so refusing to read it. Remove it (a damaged checkpoint: restore an earlier one)"
        )
    return fd, st.st_size


def read_small(path: str, root: str | None, limit: int) -> bytes:
    """The whole of the regular file ``path`` (a manifest, ``.metadata``, a pointer),
    refused as corrupt past ``limit`` bytes, even if it grows while read."""
    fd, size = open_regular(path, root)
    try:
        if size > limit:
            raise CorruptCheckpointError(
                f"{path}: {size} B, more than the {limit} B such a file may hold; refusing "
                "to read it (a damaged or planted file: remove it, or restore an earlier "
                "checkpoint)"
            )
        chunks = []
        total = 0
        while True:  # to the end, which may have moved since fstat; never past limit
            # What fstat said is left, plus a page to see the end (or growth):
            # never a buffer much larger than the file.
            chunk = os.read(fd, min(limit + 1 - total, max(size - total, 0) + 4096))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise CorruptCheckpointError(
                    f"{path}: grew past the {limit} B such a file may hold while being "
                    "read; refusing it"
                )
        return b"".join(chunks)
    except CorruptCheckpointError:
        raise
    except OSError as exc:
        raise storage_error(exc, "read", path) from exc
    finally:
        os.close(fd)


def _file_above(path: str) -> str:
    """The nearest of ``path``'s parents that is not a directory (ENOTDIR's cause)."""
    parent = os.path.dirname(path)
    while parent and parent != os.path.dirname(parent):
        with contextlib.suppress(OSError):
            if not stat.S_ISDIR(os.stat(parent).st_mode):
                return parent
        parent = os.path.dirname(parent)
    return os.path.dirname(path)


def _under(path: str, root: str) -> bool:
    root = os.path.abspath(root)
    return path != root and os.path.commonpath([path, root]) == root


class LocalReader(RangeReader):
    """A local file read at offsets (``pread``), refused unless regular (:func:`open_regular`)."""

    def __init__(self, path: str, root: str | None = None) -> None:
        self.path = path
        self._fd, self.size = open_regular(path, root)

    def read(self, offset: int, length: int) -> memoryview:
        out = bytearray(length)
        self.read_into(offset, memoryview(out))
        return memoryview(out)

    def read_into(self, offset: int, out: memoryview) -> None:
        if offset < 0 or offset + out.nbytes > self.size:
            raise StorageError(
                errno.EIO,
                f"read of {out.nbytes} B at offset {offset} runs past the end ({self.size} B)",
                self.path,
            )
        mv = out.cast("B") if out.format != "B" else out
        done = 0
        try:
            while done < mv.nbytes:
                n = os.preadv(self._fd, [mv[done:]], offset + done)
                if n == 0:
                    raise OSError(errno.EIO, "file shrank while reading", self.path)
                done += n
        except OSError as exc:
            raise storage_error(exc, "read", self.path) from exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
