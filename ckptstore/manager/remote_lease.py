"""The writer lease on an object store: a lease object with the writer's id and a
heartbeat.

Object stores have no locks and no process that could hold one, so the lease is
``root/.writer-lease``, a small JSON object (host, pid, since, command, a random lease
id and ``heartbeat_unix_s``), created with the store's conditional create where it has
one (S3's ``If-None-Match``), and rewritten by a daemon thread every
``HEARTBEAT_S``. A second writer finds it and is refused, naming the holder and when
it was last heard from. A lease not heard from for ``STALE_S`` (its process was
killed, its machine lost), or whose process on this very host is gone (a rerun after a
crash need not wait), is taken over with a warning; after the takeover the new
holder reads it back, so of two processes taking over at once one wins and the other
is refused. Released (deleted) by ``close()``.

What it cannot do: stop a writer whose heartbeats stalled for ``STALE_S`` while it still
runs (a paused VM); clocks are compared across machines (the heartbeat's time is the
writer's), so skew counts against ``STALE_S``. The conditional manifest put still lets
only one of two writers commit any one step.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

from ckptstore.errors import CkptStoreError, ManifestExistsError, WriterLeaseError
from ckptstore.layout import WRITER_LEASE_FILE
from ckptstore.storage import FsspecBackend

log = logging.getLogger("ckptstore")

HEARTBEAT_S = 30.0
STALE_S = 120.0  # four missed heartbeats
_CONFIRM_S = 1.0  # after a takeover, how long to wait before reading the lease back


class RemoteLease:
    """The lease object, kept fresh by a heartbeat thread until :meth:`release`."""

    def __init__(self, backend: FsspecBackend, record: dict[str, object]) -> None:
        self.backend = backend
        self.record = record
        self.lost = False  # another process took it over (we were presumed dead)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name="ckptstore-lease-heartbeat", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                holder = read_holder(self.backend)
                if holder is not None and holder.get("id") != self.record["id"]:
                    self.lost = True
                    log.error(
                        "the writer lease on %s was taken over by process %s on %s: it "
                        "presumed this run dead; stop one of the two runs",
                        self.backend.url,
                        holder.get("pid", "?"),
                        holder.get("host", "?"),
                    )
                    return
                self.record["heartbeat_unix_s"] = time.time()
                self.backend.put_atomic(WRITER_LEASE_FILE, _encode(self.record))
            except CkptStoreError as exc:  # a store that went away: try again next beat
                log.warning("could not renew the writer lease on %s: %s", self.backend.url, exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease object if it is still this one's."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S)
        try:
            holder = read_holder(self.backend)
            if holder is not None and holder.get("id") == self.record["id"]:
                self.backend.fs.rm_file(self.backend.store_path(WRITER_LEASE_FILE))
        except Exception as exc:  # released by going stale instead
            log.warning("could not delete the writer lease on %s: %s", self.backend.url, exc)


def acquire(backend: FsspecBackend) -> RemoteLease:
    """Take the lease on ``backend`` or raise :class:`WriterLeaseError` naming its holder."""
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record: dict[str, object] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": since,
        "command": " ".join(sys.argv)[:500],
        "id": uuid.uuid4().hex,
        "heartbeat_unix_s": time.time(),
    }
    path = backend.store_path(WRITER_LEASE_FILE)
    try:
        backend.create_manifest(path, _encode(record))  # conditional create
        return RemoteLease(backend, record)
    except ManifestExistsError:
        pass
    holder = read_holder(backend)
    age = _age(holder)
    gone = _gone_from_this_host(holder)
    if holder is not None and age is not None and age < STALE_S and not gone:
        raise WriterLeaseError(_refusal(backend.url, holder, age), holder=holder)
    log.warning(
        "taking over the writer lease on %s: its holder (%s) %s",
        backend.url,
        _who(holder),
        "has exited"
        if gone
        else "has not been heard from " + ("ever" if age is None else f"for {age:.0f} s"),
    )
    backend.put_atomic(WRITER_LEASE_FILE, _encode(record))
    time.sleep(_CONFIRM_S)  # another process taking over at once: the last write wins
    now = read_holder(backend)
    if now is None or now.get("id") != record["id"]:
        raise WriterLeaseError(_refusal(backend.url, now, _age(now) or 0.0), holder=now)
    return RemoteLease(backend, record)


def read_holder(backend: FsspecBackend) -> dict[str, object] | None:
    """The lease object's record; None if there is none or it cannot be parsed."""
    try:
        data = backend.read_bytes(WRITER_LEASE_FILE)
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(data)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _gone_from_this_host(holder: dict[str, object] | None) -> bool:
    """Whether the holder ran on this host and its process no longer exists."""
    if holder is None or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, another user's
        return False
    return False


def _age(holder: dict[str, object] | None) -> float | None:
    beat = None if holder is None else holder.get("heartbeat_unix_s")
    if isinstance(beat, bool) or not isinstance(beat, (int, float)):
        return None
    return max(0.0, time.time() - float(beat))


def _who(holder: dict[str, object] | None) -> str:
    if holder is None:
        return "unknown"
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"


def _refusal(url: str, holder: dict[str, object] | None, age: float) -> str:
    since = "" if holder is None else f", since {holder.get('since', '?')}"
    command = "" if holder is None or not holder.get("command") else f" ({holder['command']})"
    return (
        f"{url} is being written by {_who(holder)}{since}{command}; last heard from "
        f"{age:.0f} s ago (a lease not renewed for {STALE_S:.0f} s is taken over). Two runs "
        "writing one checkpoint root would overwrite each other's checkpoints: stop that "
        "run first, or write this one to another root (reading it is fine meanwhile)"
    )


def _encode(record: dict[str, object]) -> bytes:
    return json.dumps(record).encode() + b"\n"
