"""The writer lease: one run writes a root at a time.

Two training runs started on one checkpoint directory would interleave their saves and
retention, and the second would fail much later with a misleading message. The
:class:`~ckptstore.CheckpointManager` takes the lease on rank 0 at start-up when it may
write (``enabled=True``) and holds it until ``close()`` or the end of the process (the
kernel drops an ``flock`` with its last descriptor, even on SIGKILL), so a second writer
is refused at once, with the holder's host, pid and start time. Readers (``ckptstore
ls``, ``verify``, an evaluation job restoring with ``enabled=False``) never take it.

On local disk the lease is an ``flock`` on ``root/.writer-lease``, whose JSON says who
holds it. The file is never deleted: unlinking a lock file lets two processes lock two
different inodes. A file system without locks (NFS without lockd) gets no lease, with a
warning. On object stores it is a lease object with a heartbeat
(:mod:`ckptstore.manager.remote_lease`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys

import torch.distributed as dist

from ckptstore.engine import groups
from ckptstore.errors import WriterLeaseError, storage_error
from ckptstore.layout import WRITER_LEASE_FILE
from ckptstore.manager import remote_lease
from ckptstore.manager.remote_lease import RemoteLease
from ckptstore.storage import FsspecBackend, StorageBackend

log = logging.getLogger("ckptstore")

# flock errors that mean "this file system has no locks".
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EBADF, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class WriterLease:
    """An ``flock`` on ``path``, held until :meth:`release` (idempotent)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # released: nobody is named as the holder any more
        with contextlib.suppress(OSError):
            os.close(fd)  # drops the flock


Lease = WriterLease | RemoteLease


def take(backend: StorageBackend, group: dist.ProcessGroup | None) -> Lease | None:
    """Rank 0 of ``group`` takes the lease on ``backend``; every rank learns the outcome.

    Called by the manager's constructor on every rank (``group`` is its control group,
    None in a single process). Returns the lease on rank 0, else None.
    Raises :class:`~ckptstore.errors.WriterLeaseError` when another process holds it
    (on the other ranks: a ``CkptStoreError`` quoting rank 0's message).
    """
    held: list[Lease] = []

    def on_rank_0() -> None:  # the lease itself stays here: it must not be broadcast
        lease = acquire(backend)
        if lease is not None:
            held.append(lease)

    groups.decide(on_rank_0, group, what=f"take the writer lease on {backend.url}")
    return held[0] if held else None


def acquire(backend: StorageBackend, *, full_disk_ok: bool = False) -> Lease | None:
    """The lease on ``backend``, or None where there can be none (see above).

    ``full_disk_ok`` (commands that free space): on a full disk the lease file cannot be
    created (then there is no lease, with a warning) or its record written (the lock
    is still held, unnamed).
    """
    if isinstance(backend, FsspecBackend):
        return remote_lease.acquire(backend)
    if not backend.capabilities.local:
        return None
    path = os.path.join(backend.url, WRITER_LEASE_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if full_disk_ok and exc.errno in _FULL:
            log.warning("%s is full: going on without the writer lease", backend.url)
            return None
        raise storage_error(exc, "create", path) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise WriterLeaseError(refusal(backend.url, holder), holder=holder) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_LOCKS:
            log.warning(
                "%s has no file locks: a second run writing to it cannot be refused", backend.url
            )
            return None
        raise storage_error(exc, "lock", path) from exc
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": since}
    record["command"] = " ".join(sys.argv)[:500]
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
    except OSError as exc:
        if not (full_disk_ok and exc.errno in _FULL):
            os.close(fd)
            raise storage_error(exc, "write", path) from exc
    return WriterLease(path, fd)


def describe_holder(holder: dict[str, object] | None) -> str:
    """Who holds a lease, from its record: process, host, since when, and its command."""
    if holder is None:
        return "another process (it has not recorded its host and pid yet)"
    who = (
        f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"since {holder.get('since', '?')}"
    )
    if holder.get("command"):
        who += f" ({holder['command']})"
    return who


def refusal(url: str, holder: dict[str, object] | None) -> str:
    """What a refused writer is told."""
    return (
        f"{url} is being written by {describe_holder(holder)}. Two runs writing one checkpoint directory would "
        "overwrite each other's checkpoints: stop that run first, or write this one to "
        "another directory (reading it, with `ckptstore ls` or `verify`, is fine meanwhile)"
    )


def _read_holder(fd: int) -> dict[str, object] | None:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None
