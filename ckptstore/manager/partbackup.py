"""The backup tier on node-local disks: each disk uploads its own ranks' shards.

With node-local disks (:mod:`ckptstore.engine.nodelocal`) rank 0's root holds only its
node's part of each checkpoint. So on every other disk, its committing rank (the
lowest) runs a :class:`PartUploader`: after each commit it uploads that disk's shard
files into the backup, in the background, newest first. Rank 0's
:class:`~ckptstore.manager.replicate.Replicator` uploads its own part, waits until the
other disks' files are there (checked by size and index checksum), and then commits
the whole checkpoint with one manifest (:func:`ckptstore.transfer_parts.commit_parts_backup`).
No collective: the ranks meet only in the object store. A checkpoint a newer one
superseded before every disk uploaded it is skipped, as on one disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

import torch.distributed as dist

from ckptstore.config import BackupConfig
from ckptstore.engine import groups
from ckptstore.engine.checkpointer import Checkpointer
from ckptstore.errors import CkptStoreError, CorruptCheckpointError, RanksDisagreeError
from ckptstore.layout import MANIFEST_FILE
from ckptstore.manager.replicate import Replicator
from ckptstore.storage import StorageBackend, open_backend
from ckptstore.transfer_parts import refuse_part, upload_part
from ckptstore.units import format_ranks

log = logging.getLogger("ckptstore")


class PartUploader:
    """Uploads this disk's part of each submitted checkpoint to ``remote``; the newest
    submitted wins, a failure is retried with backoff up to ``retry_max_s``."""

    def __init__(
        self,
        local: StorageBackend,
        remote: StorageBackend,
        *,
        threads: int = 4,
        retry_max_s: float = 60.0,
        manifest_key: bytes | None = None,
    ) -> None:
        self.local, self.remote = local, remote
        self._threads, self._retry_max_s, self._key = threads, retry_max_s, manifest_key
        self._cond = threading.Condition()
        self._next: str | None = None  # the newest checkpoint not yet uploaded
        self._busy = False
        self._failures = 0  # failed attempts in a row
        self._last_error = ""
        self._closing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckptstore-backup", daemon=True)
        self._thread.start()

    def submit(self, name: str) -> None:
        with self._cond:
            if name != self._next:  # (a newer checkpoint: its own count of failures)
                self._failures = 0
            self._next = name
            self._cond.notify_all()

    def wait(self, timeout_s: float | None = None, *, give_up_after: int | None = None) -> bool:
        """Block until everything submitted is uploaded (True); False on timeout, or
        once ``give_up_after`` attempts in a row have failed."""

        def done() -> bool:
            failing = give_up_after is not None and self._failures >= give_up_after
            return (self._next is None and not self._busy) or failing

        with self._cond:
            self._cond.wait_for(done, timeout_s)
            return self._next is None and not self._busy

    def close(
        self, *, wait: bool = True, timeout_s: float | None = None, give_up_after: int | None = 5
    ) -> None:
        """Stop; first wait for the upload in hand if ``wait`` (not past ``give_up_after``
        failed attempts in a row, as the manager's backup: it retried forever, and a
        run whose part could never be uploaded never exited)."""
        left = None
        if wait and not self.wait(timeout_s, give_up_after=give_up_after):
            left = self._next
            log.warning(
                "backup: this node's part of %s was not uploaded%s", left,
                f" ({self._failures} failed attempts in a row)" if self._failures else "",
            )  # fmt: skip
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._stop.set()
        self._thread.join()
        if left is not None and self._failures:  # rank 0 would wait for it up to 600 s
            why = f"that node gave up after {self._failures} failed uploads: {self._last_error}"
            with contextlib.suppress(CkptStoreError, OSError):
                refuse_part(self.local, self.remote, left, why, manifest_key=self._key)

    def _run(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._next is not None or self._closing)
                if self._closing:
                    return
                name, self._busy = self._next, True
            assert name is not None
            failed, error = False, ""
            try:
                sent = upload_part(
                    self.local,
                    self.remote,
                    name,
                    threads=self._threads,
                    stop=self._stop,
                    manifest_key=self._key,
                )
                log.info(
                    "backup: this node's part of %s is on %s (%d files)",
                    name,
                    self.remote.url,
                    len(sent),
                )
                delay = 1.0
                self._failures = 0
            except CorruptCheckpointError as exc:  # no retry reads it any better
                if not self.local.exists(f"{name}/{MANIFEST_FILE}"):  # (retention, meanwhile)
                    log.info("backup: %s was deleted here before it was uploaded", name)
                else:
                    log.error(
                        "backup: not uploading this node's part of %s, the local copy is "
                        "damaged (the backup will not hold %s): %s", name, name, exc,
                    )  # fmt: skip
                    why = f"its copy on that node is damaged ({exc})"
                    try:  # rank 0 then stops waiting for it
                        refuse_part(self.local, self.remote, name, why, manifest_key=self._key)
                    except (CkptStoreError, OSError) as why:
                        log.warning("backup: could not tell rank 0 so: %s", why)
            except (CkptStoreError, OSError) as exc:
                failed = self.local.exists(f"{name}/{MANIFEST_FILE}")
                if failed:
                    error = f"{type(exc).__name__}: {exc}"
                    log.warning("backup: uploading this node's part of %s failed: %s", name, exc)
                else:
                    log.info("backup: %s was deleted here before it was uploaded", name)
            if failed:
                with self._cond:  # (close() may give up now: not after the delay)
                    self._failures += 1
                    self._last_error = error
                    self._busy = False
                    self._cond.notify_all()
                if self._stop.wait(delay):
                    return
                delay = min(self._retry_max_s, delay * 2)
                continue
            with self._cond:
                if self._next == name:
                    self._next = None
                self._busy = False
                self._cond.notify_all()


def agree_on_backup(backup: BackupConfig | None, control: dist.ProcessGroup | None) -> None:
    """Refuse, on every rank, ranks given different backups (one node launched without
    ``--backup``, or with another prefix). Collective. Unchecked, the ranks with a backup
    waited in collectives the others never join (a silent hang at start-up), or rank 0
    waited for parts uploaded elsewhere."""
    mine = None
    if backup is not None:
        url = backup.url
        mine = (url.url if isinstance(url, StorageBackend) else str(os.fspath(url))).rstrip("/")
    urls = groups.all_gather(mine, control)
    if len(set(urls)) <= 1:
        return
    by_url: dict[str | None, list[int]] = {}
    for rank, url in enumerate(urls):
        by_url.setdefault(url, []).append(rank)
    said = "; ".join(
        f"rank{'s' if len(ranks) > 1 else ''} {format_ranks(ranks)}: "
        f"{url if url is not None else 'no backup'}"
        for url, ranks in by_url.items()
    )
    raise RanksDisagreeError(
        f"the ranks were given different backups ({said}): give every node's command the "
        "same --backup URL (CheckpointManager(backup=...): the same on every rank)"
    )


def open_tiers(
    ckpt: Checkpointer,
    backup: BackupConfig,
    control: dist.ProcessGroup | None,
    *,
    enabled: bool,
    **replicator_options: Any,
) -> tuple[StorageBackend | None, Replicator | None, PartUploader | None]:
    """The backup tier of a manager: (the remote, rank 0's replicator, this disk's part
    uploader). Collective. Rank 0 opens the remote (a missing bucket or wrong
    credentials fail here, on every rank); with node-local disks every rank does (a
    restore reads from it directly), and each other disk's lowest rank uploads that
    disk's part of each checkpoint."""
    remote: StorageBackend | None = None
    replicator: Replicator | None = None
    uploader: PartUploader | None = None

    def open_remote() -> StorageBackend:
        options = dict(backup.storage_options) if backup.storage_options is not None else None
        return open_backend(
            backup.url, storage_options=options, backend_options=dict(backup.backend_options or {})
        )

    def on_rank_0() -> None:
        nonlocal remote, replicator
        remote = open_remote()
        if enabled:
            replicator = Replicator(ckpt.backend, remote, **replicator_options)
        else:
            remote.check_access()

    groups.decide(on_rank_0, control, what=f"open the backup {backup.url!r}")
    rank, disks = groups.rank(control), ckpt.disks
    if len(set(disks)) > 1:
        failure = None
        if rank != 0:
            try:
                remote = open_remote()
                remote.check_access()
                if enabled and disks[rank] != disks[0] and disks.index(disks[rank]) == rank:
                    uploader = PartUploader(
                        ckpt.backend,
                        remote,
                        retry_max_s=replicator_options.get("retry_max_s", 60.0),
                        manifest_key=replicator_options.get("manifest_key"),
                    )
                    # Catching up, as rank 0's does: this disk's newest part.
                    parts = [i.name for i in ckpt.list() if i.manifest.part is not None]
                    if parts:
                        uploader.submit(parts[-1])
            except CkptStoreError as exc:
                failure = f"{type(exc).__name__}: {exc}"
        failed = [(r, f) for r, f in enumerate(groups.all_gather(failure, control)) if f]
        if failed:
            if uploader is not None:
                uploader.close(wait=False)
            if replicator is not None:
                replicator.close(wait=False)
            r, why = failed[0]
            raise CkptStoreError(f"rank {r} could not open the backup {backup.url!r}: {why}")
    return remote, replicator, uploader
