"""Low-level file I/O for :mod:`ckptstore.storage.local`; private to ``storage/``.

* :class:`DirectFileSink`: a file written front to back with ``O_DIRECT`` where the
  file system supports it (one expected below :data:`BUFFERED_BYTES`, 0 by default:
  through the page cache first): from a page-aligned staging buffer straight to the device,
  without a copy into the page cache. On this kind of machine that wrote 3.3 GB/s from
  one thread, against 1.1 GB/s buffered (``benchmarks/README.md``). Unaligned pieces go
  through a small aligned bounce buffer; the file is truncated to its exact length
  before the fsync. Where the file system refuses direct I/O (at the ``fcntl`` that
  sets it, or with EINVAL or EFAULT at a write) the same bytes are written buffered.
* :func:`renameat2_noreplace`: rename without replacing the target (libc's
  ``renameat2(RENAME_NOREPLACE)``), or False where the kernel lacks it;
  :func:`renameat2_exchange` swaps two entries in one step (``RENAME_EXCHANGE``).
* :func:`fsync_dir`: make a directory's entries durable.

Reading is in :mod:`ckptstore.storage._local_read`. Every OS call goes through this
module's ``os`` and ``fcntl`` globals and libc through ``_libc``: the fault-injection
tests replace exactly those (here, in ``_local_read.py`` and in ``local.py``) to count
and fail each call of a save.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import stat
import threading
from typing import Any

from ckptstore.errors import StorageError, storage_error
from ckptstore.storage.base import FileSink

ALIGN = 4096  # O_DIRECT's address, length and offset multiple (the page size here)
BOUNCE_BYTES = 8 << 20
MAX_WRITE = 64 << 20  # one write() call; Linux caps a write at ~2 GiB anyway
O_DIRECT = getattr(os, "O_DIRECT", 0)
log = logging.getLogger("ckptstore")
_LINK_FAILURES_SAID: set[int] = set()  # errnos link_all has warned of (once each)
# A file expected to be smaller than this is written through the page cache (writeback
# kicked every KICK_BYTES), then with O_DIRECT from the first block boundary past it.
# 0 since 2026-12-06: every file is direct from its first byte. Through the page cache,
# an incremental save's small shard (issue 19) had been faster on the idle 2-core VM
# (2026-12-05: 30.6 against 60.8 ms for 50 MB), but with the bounce buffers kept
# (37b259a) the two tie there (medians of 16 durable saves, separate processes
# alternating: 250 MB state 31.3-37.3 ms direct against 31.9-34.9 buffered, 1 GB
# 76.0-77.4 against 73.5-82.7), with 5-20 ms less system CPU a save; and under a busy
# training loop, beside other saves, buffered saves sometimes took 0.2-0.3 s instead of
# 0.05 s while the loop all but stopped (`ckptstore bench --interference`, incremental
# contenders: the loop lost 0.08-0.11 s a save buffered, 0.003-0.024 s direct, medians
# of 4 rounds). Kept as a knob (and tested) for file systems where buffered wins.
BUFFERED_BYTES = 0
# While a file is written through the page cache, its writeback is started every this
# many bytes, so the device writes while the rest is produced and the fdatasync at close
# waits for the tail only.
KICK_BYTES = 2 << 20

# Errors with which a direct write refuses what a buffered write takes: EINVAL from a
# file system without direct I/O (or an alignment it does not accept), EFAULT from
# memory the kernel cannot pin for DMA (cudaHostAlloc'd pinned memory, per kvikio).
_DIRECT_REFUSED = frozenset({errno.EINVAL, errno.EFAULT})

_libc: Any = None  # loaded on first use; False where renameat2 is missing

# Bounce buffers of files closed cleanly, kept for the next file (at most this many,
# 8 MiB each, held for the life of the process): a new mapping costs a page fault and
# a zeroed page for every 4 KiB that a file's unaligned pieces pass through. On the
# 2-core VM, 2026-12-06, full saves of a 250 MB GPT state took 114.8, 117.2 and 123.9 ms
# with them kept against 128.7, 131.9 and 133.1 ms with a new one per file (three
# rounds, medians of 16 saves; system CPU per save about halved).
SPARE_BOUNCES = 2
_spare: list[mmap.mmap] = []
_spare_lock = threading.Lock()


def _take_bounce() -> mmap.mmap:
    with _spare_lock:
        if _spare:
            return _spare.pop()
    return mmap.mmap(-1, BOUNCE_BYTES)


def _keep_bounce(bounce: mmap.mmap) -> None:
    with _spare_lock:
        if len(_spare) < SPARE_BOUNCES:
            _spare.append(bounce)
            return
    # A view may live on in a traceback (an interrupt during a write): then it is
    # freed with the last reference instead
    with contextlib.suppress(BufferError):
        bounce.close()


def _forget_spares() -> None:  # a forked child starts without them (and the lock)
    global _spare_lock
    _spare.clear()
    _spare_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_spares)


def renameat2_noreplace(src: str, dst: str) -> bool:
    """Rename without replacing; False if the kernel or file system lacks renameat2."""
    return _renameat2(src, dst, 1)


def renameat2_exchange(a: str, b: str) -> bool:
    """Swap two existing entries atomically; False if the kernel or file system cannot."""
    return _renameat2(a, b, 2)


def _renameat2(src: str, dst: str, flags: int) -> bool:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2  # noqa: B018 - probe for the symbol
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        return False
    at_fdcwd = -100
    rc = _libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags)
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(code, os.strerror(code), dst)


def link_all(pairs: list[tuple[str, str]]) -> bool:
    """Hard-link each ``(source, target)``: all of them, or none (False; the links made
    are removed) where one fails: no hard links here, another file system, a source gone
    or not a regular file. (On Linux ``os.link`` links a symbolic link itself, not what
    it names: the new checkpoint would hold a path into another directory.)"""
    made: list[str] = []
    try:
        for source, target in pairs:
            if not stat.S_ISREG(os.lstat(source).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", source)
            os.link(source, target)
            made.append(target)
    except OSError as exc:
        for target in made:
            with contextlib.suppress(OSError):
                os.unlink(target)
        # The save then writes everything: say why, once per kind of failure (a file
        # system without hard links would otherwise say it at every save)
        code = exc.errno or 0
        if code not in _LINK_FAILURES_SAID:
            _LINK_FAILURES_SAID.add(code)
            log.warning(
                "could not hard-link %s (%s): its bytes are written instead of linked (said "
                "once per kind of failure)",
                source, exc.strerror or exc,
            )  # fmt: skip
        return False
    return True


def fsync_dir(path: str) -> None:
    """fsync the directory ``path``: its entries (creations, renames) become durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _address(mv: memoryview) -> int:
    import numpy as np  # already loaded wherever data is written; not to open a root

    return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data)


class DirectFileSink(FileSink):
    """A new file (``O_EXCL``), written with ``O_DIRECT`` when ``direct`` and possible
    (past its first :data:`BUFFERED_BYTES` where it is ``expect``-ed to be smaller)."""

    def __init__(self, path: str, direct: bool = True, expect: int | None = None) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise storage_error(exc, "create", path) from exc
        self._direct = False
        self._later = False  # O_DIRECT once BUFFERED_BYTES are written (at a block)
        if direct and O_DIRECT:
            # Set O_DIRECT after the open: opening with it creates the file and then
            # fails with EINVAL where the file system has no direct I/O (tmpfs before
            # Linux 6.6), leaving a file behind. fcntl refuses cleanly instead.
            try:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | O_DIRECT)
                self._direct = True
                if expect is not None and expect < BUFFERED_BYTES:  # buffered for now
                    fcntl.fcntl(fd, fcntl.F_SETFL, flags)
                    self._direct, self._later = False, True
            except OSError:
                pass  # buffered writes, same bytes
        self._fd = fd
        self._failed = False
        self._size = 0  # logical bytes accepted
        self._bounce: mmap.mmap | None = None
        if self._direct:
            try:
                self._bounce = _take_bounce()
            except OSError as exc:  # no memory for it: buffered, the same bytes
                try:
                    self._drop_direct()
                except OSError:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    raise storage_error(exc, "create", path) from exc
        self._fill = 0
        self._kicked = 0  # writeback started up to here (expected-small files)
        self._closed = False

    @property
    def wants_alignment(self) -> bool:
        return self._direct or self._later

    def tell(self) -> int:
        return self._size

    def write(self, data: Any) -> None:
        mv = memoryview(data)
        if mv.nbytes == 0:
            return
        if mv.ndim != 1 or mv.itemsize != 1 or not mv.c_contiguous:
            mv = mv.cast("B") if mv.c_contiguous else memoryview(bytes(mv))
        if self._later and self._size + mv.nbytes > BUFFERED_BYTES:
            mv = self._go_direct(mv)  # larger than expected after all
        self._size += mv.nbytes
        # Invariant: the bounce buffer holds the bytes that come next in the file, so
        # it is flushed before anything is written around it.
        try:
            if (
                self._direct
                and self._fill % ALIGN == 0
                and mv.nbytes >= ALIGN
                and _address(mv) % ALIGN == 0
            ):
                # Whole blocks pending (align() leaves it so): write them, then this
                # buffer straight from its own memory, without a copy.
                self._flush_bounce()
                n = mv.nbytes - mv.nbytes % ALIGN
                self._write_all(mv[:n])
                mv = mv[n:]
            if self._direct:
                self._buffer(mv)
            else:
                self._flush_bounce()
                self._write_all(mv)
                if self._later and self._size - self._kicked >= KICK_BYTES:
                    self._kick()
        except OSError as exc:
            self._failed = True
            raise storage_error(exc, "write", self.path) from exc

    def _go_direct(self, mv: memoryview) -> memoryview:
        """Write the head of ``mv`` buffered up to a block boundary, then turn O_DIRECT
        on for the rest; returns what is left of ``mv``."""
        head = min(-self._size % ALIGN, mv.nbytes)
        if head:
            try:
                self._write_all(mv[:head])  # buffered so far: nothing in the bounce buffer
            except OSError as exc:
                self._failed = True
                raise storage_error(exc, "write", self.path) from exc
            self._size += head
        if self._size % ALIGN:
            return mv[head:]  # all of it went: the next write tries again
        self._later = False
        try:
            bounce = _take_bounce()
        except OSError:
            return mv[head:]  # no memory for it: buffered to the end, same bytes
        try:
            fl = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fl | O_DIRECT)
        except OSError:
            _keep_bounce(bounce)
            return mv[head:]  # refused: buffered to the end, same bytes
        self._direct, self._bounce = True, bounce
        # Start writing the buffered bytes back now, while the rest is written (Linux
        # starts writeback of the range's dirty pages; the fdatasync at close waits).
        self._dontneed(0, self._size)
        return mv[head:]

    def _kick(self) -> None:
        """Start writing back what was written since the last kick (Linux starts
        writeback of the range's dirty pages; the fdatasync at close waits for it)."""
        self._dontneed(self._kicked, self._size - self._kicked)
        self._kicked = self._size

    def _drop_cached(self) -> None:
        """Once durable, let go of the file's pages in the page cache (as direct I/O
        never holds them): the next save's file reuses that memory. On this project's
        VM, memory the page cache had not used before cost ~20 ms per 8 MB written
        (~10 us a page: first touches, in a VM whose memory is backed as it is
        touched); a file written into pages freed this way took 1.5-2.5 ms per 8 MB
        (40 MB files, buffered, kept: 107 against 27 ms each, write to fdatasync).
        What reads the file soon after (a backup's upload, the next incremental save's
        look at its index) reads it from the disk, as it would a direct-I/O file."""
        self._dontneed(0, 0)

    def _dontneed(self, offset: int, length: int) -> None:
        """POSIX_FADV_DONTNEED over a range (length 0: to the end): writeback starts on
        its dirty pages, its clean ones are dropped. Only a hint: a refusal changes
        nothing."""
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)

    def align(self, boundary: int) -> None:
        if (self._direct or self._later) and self._size % boundary:
            self.write(bytes(boundary - self._size % boundary))

    def _buffer(self, mv: memoryview) -> None:
        assert self._bounce is not None
        while mv.nbytes:
            n = min(mv.nbytes, BOUNCE_BYTES - self._fill)
            self._bounce[self._fill : self._fill + n] = mv[:n]
            self._fill += n
            mv = mv[n:]
            if self._fill == BOUNCE_BYTES:
                self._flush_bounce()

    def _flush_bounce(self) -> None:
        if self._fill:
            assert self._bounce is not None
            self._write_all(memoryview(self._bounce)[: self._fill])
            self._fill = 0

    def _write_all(self, mv: memoryview) -> None:
        while mv.nbytes:
            piece = mv[:MAX_WRITE]
            try:
                n = os.write(self._fd, piece)
            except OSError as exc:
                if exc.errno in _DIRECT_REFUSED and self._direct:
                    self._drop_direct()  # O_DIRECT refused: the same bytes, buffered
                    continue
                raise
            if n <= 0:
                raise OSError(errno.EIO, "write returned 0 bytes", self.path)
            mv = mv[n:]
            if self._direct and n % ALIGN:
                self._drop_direct()  # a short write broke alignment; finish buffered

    def _drop_direct(self) -> None:
        """Continue without O_DIRECT. Only the flag changes; no bytes move here."""
        fl = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fl & ~O_DIRECT)
        self._direct = False

    def close(self) -> int:
        if self._failed:
            raise StorageError(
                errno.EIO,
                "a write or fsync of this file failed earlier; it is not durable",
                self.path,
            )
        if self._closed:
            return self._size
        try:
            if self._direct and self._fill:
                # O_DIRECT writes whole blocks: pad the tail, then cut the file back.
                assert self._bounce is not None
                padded = -(-self._fill // ALIGN) * ALIGN
                self._bounce[self._fill : padded] = bytes(padded - self._fill)
                self._fill = padded
                self._flush_bounce()
                os.ftruncate(self._fd, self._size)
            else:
                self._flush_bounce()
            os.fdatasync(self._fd)
            if self._kicked:
                self._drop_cached()
        except OSError as exc:
            # Never retried: after a failed fsync the kernel may have dropped the dirty
            # pages, and a second fsync can report success for data that is gone.
            self._failed = True
            self.abort()
            raise storage_error(exc, "write+fsync", self.path) from exc
        self._closed = True
        try:
            os.close(self._fd)
        except OSError as exc:
            # Linux releases the fd even when close() fails, so it is never closed
            # again. The data was synced, but close() is where some file systems (NFS,
            # quotas) report a failed write: fail the save rather than guess.
            self._failed = True
            raise storage_error(exc, "close", self.path) from exc
        finally:
            self._release_bounce()
        return self._size

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._release_bounce()

    def _release_bounce(self) -> None:
        if self._bounce is not None:
            bounce, self._bounce = self._bounce, None
            if not self._failed:
                _keep_bounce(bounce)  # for the next file
                return
            # After a failed write the exception's traceback may still hold a view of
            # the buffer; then it is freed with the last reference instead.
            with contextlib.suppress(BufferError):
                bounce.close()
