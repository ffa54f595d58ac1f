"""The backup tier: :class:`Replicator` copies each committed local checkpoint to a remote
root on a background thread for ``CheckpointManager(backup=...)``.

It never blocks the caller, keeps a bounded backlog (older pending checkpoints are
skipped for newer ones, and said so; the newest is always uploaded), retries with
exponential backoff while the remote is unreachable, warns how far behind the backup
is, applies its own retention to the remote, and moves the remote's ``latest`` pointer.
Each copy is :func:`ckptstore.transfer.copy_checkpoint`.

A checkpoint counts as backed up when the remote holds the *same* checkpoint (its
manifest lists the same files and checksums, of the same run:
:meth:`~ckptstore.format.Manifest.same_checkpoint`), not merely one of the same name:
another run pointed at the same prefix, or a branch retired by
``restore(newer="discard")``, leaves checkpoints of the same steps there. Such a one is
replaced (:func:`ckptstore.transfer.replace_checkpoint`), said in a warning and in
:attr:`BackupStatus.replaced`. With a :attr:`Replicator.run_id`, the remote's retention
and ``latest`` pointer only consider that run's checkpoints, so another run's
newer-looking steps never push this run's out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ckptstore.engine.ops import CheckpointInfo, list_checkpoints, read_manifest
from ckptstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptStoreError,
    CopyStoppedError,
    CorruptCheckpointError,
    InvalidArgumentError,
    PartRefusedError,
    PartsMissingError,
)
from ckptstore.format.manifest import Manifest
from ckptstore.layout import FINALS_FILE, MANIFEST_FILE
from ckptstore.manager import backup_compare, pointer
from ckptstore.manager.backup_repair import RepairMixin
from ckptstore.manager.backup_status import BackupStatus
from ckptstore.manager.policies import RetentionPolicy
from ckptstore.manager.probe import probe_remote
from ckptstore.manager.retention import of_lineage, prune
from ckptstore.progress import Progress
from ckptstore.storage import StorageBackend
from ckptstore.transfer import copy_checkpoint, moved, replace_checkpoint
from ckptstore.transfer_parts import commit_parts_backup
from ckptstore.units import format_bytes

log = logging.getLogger("ckptstore")


class Replicator(RepairMixin):
    """Copies each committed local checkpoint to ``remote`` on a background thread.

    ``submit(name)`` after a local commit; never blocks. ``max_queued`` checkpoints wait
    at most (beyond the one uploading): when a newer one arrives, the oldest waiting is
    skipped. A failed upload is retried with exponential backoff (``retry_initial_s`` up
    to ``retry_max_s``) until it succeeds or a newer checkpoint supersedes it.

    ``run_id`` (settable: the manager sets it once a restore has decided which run this
    is) and ``lineage`` (the runs it branched from): the remote's retention and
    ``latest`` only consider checkpoints of those runs. None: all of them.
    """

    def __init__(
        self,
        local: StorageBackend,
        remote: StorageBackend,
        *,
        keep: RetentionPolicy | None = None,
        max_queued: int = 1,
        threads: int = 4,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        probe_timeout_s: float = 20.0,
        catch_up: bool = True,
        on_backed_up: Callable[[str], None] | None = None,
        on_speed: Callable[[float], None] | None = None,
        manifest_key: bytes | None = None,
        run_id: str | None = None,
    ) -> None:
        if max_queued < 1:
            raise InvalidArgumentError(f"max_queued must be at least 1, got {max_queued}")
        self.local = local
        self.remote = remote
        self.keep = keep
        self.max_queued = max_queued
        self.threads = threads
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._on_backed_up = on_backed_up
        self._on_speed = on_speed
        self._manifest_key = manifest_key
        self.run_id = run_id
        self.lineage: tuple[str, ...] = ()
        self._cond = threading.Condition()
        self._queue: list[str] = []
        self._queued_at: dict[str, float] = {}
        self._current: str | None = None
        self._current_sent = False  # its upload is done: only housekeeping is left
        self._skipped: list[str] = []
        self._replaced: list[str] = []
        self._init_repairs()
        self._failures = 0
        self._last_error: str | None = None
        # Node-local disks: how long a commit waits for the other nodes' files; and
        # whether the run is closing (then that wait is not retried: see _attempt)
        self.parts_wait_s = 600.0
        self._closing_since: float | None = None
        self._given_up: list[str] = []  # so, at close
        self._newest: str | None = None
        self._closing = False
        self._leave = False
        self._catching_up = catch_up  # wait() waits for the start-up comparison too
        self._wake = threading.Event()
        self._stop = threading.Event()  # abandon the upload in progress
        self.progress: Progress | None = None
        probe_remote(remote, probe_timeout_s)
        self._thread = threading.Thread(
            target=self._run, args=(catch_up,), name="ckptstore-backup", daemon=True
        )
        self._thread.start()

    # ---- the caller's side ----------------------------------------------------------
    def submit(self, name: str) -> None:
        with self._cond:
            if self._closing or name == self._current or name in self._queue:
                return
            self._queue.append(name)
            self._queued_at.setdefault(name, time.time())
            while len(self._queue) > self.max_queued:
                dropped = self._queue.pop(0)
                if dropped in self._repairs:  # queued again after the next upload
                    self._repairs.discard(dropped)
                    continue
                self._skipped.append(dropped)
                log.warning(
                    "backup is behind: skipping %s (newer %s is waiting); %s stays local only",
                    dropped,
                    name,
                    dropped,
                )
            self._cond.notify_all()
        self._wake.set()

    def note_on_remote(self, name: str) -> None:
        """``name`` is on the remote already (a restore read it from there)."""
        with self._cond:
            if self._newest is None or self._newest < name:
                self._newest = name

    def busy(self) -> set[str]:
        """Checkpoints waiting or uploading: local retention must not delete them."""
        with self._cond:
            return set(self._queue) | ({self._current} if self._current else set())

    def status(self) -> BackupStatus:
        with self._cond:
            waiting = self._waiting()
            oldest = min((self._queued_at.get(n, time.time()) for n in waiting), default=None)
            current = self._current if self._current not in self._repairs else None
            return BackupStatus(
                remote=self.remote.url,
                newest_backed_up=self._newest,
                in_progress=current,
                queued=tuple(n for n in self._queue if n not in self._repairs),
                skipped=tuple(self._skipped),
                failures=self._failures,
                last_error=self._last_error,
                behind_s=0.0 if oldest is None else max(0.0, time.time() - oldest),
                replaced=tuple(self._replaced),
                repaired=tuple(self._repaired),
                damaged=tuple(sorted(self._unrepaired)),
                repairing=tuple(sorted(self._repairs)),
                given_up=tuple(self._given_up),
            )

    def _waiting(self) -> list[str]:
        """(Under ``_cond``) the checkpoints not backed up yet: uploading, then queued;
        not the repairs of ones that are."""
        names = [*([self._current] if self._current else []), *self._queue]
        return [n for n in names if n not in self._repairs]

    def wait(
        self,
        timeout_s: float | None = None,
        *,
        give_up_after: int | None = None,
        closing: bool = False,
    ) -> list[str]:
        """Wait until nothing is waiting or uploading; return what still is (on timeout,
        or once ``give_up_after`` attempts in a row have failed). ``closing``: the run
        ends, and the other nodes' uploaders stop as theirs do (after five failed
        attempts at most): a checkpoint whose other nodes' files did not arrive in one
        whole ``parts_wait_s`` from then is given up, not waited for again at each
        attempt (five: 50 minutes). An attempt begun before that waits its end and is
        tried once more."""
        if closing and self._closing_since is None:
            self._closing_since = time.monotonic()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        shown = 0.0
        with self._cond:
            while self._queue or self._current or self._catching_up:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if give_up_after is not None and self._failures >= give_up_after:
                    log.warning(
                        "giving up on the backup to %s after %d failed attempts in a row: %s",
                        self.remote.url,
                        self._failures,
                        self._last_error,
                    )
                    break
                now = time.monotonic()
                if now - shown >= 5.0:
                    shown = now
                    self._say_waiting()
                if self.progress is not None:
                    self.progress.show()
                self._cond.wait(0.5 if deadline is None else min(0.5, deadline - now))
            return self._waiting()

    def _say_waiting(self) -> None:
        sending = self._current if self._current and not self._current_sent else None
        names = [
            n for n in [*([sending] if sending else []), *self._queue] if n not in self._repairs
        ]
        if not names:  # (the housekeeping after the last upload, or repairs)
            return
        extra = f"; last error: {self._last_error}" if self._failures else ""
        log.warning(
            "waiting for the backup to %s: %s not uploaded yet%s",
            self.remote.url,
            ", ".join(names),
            extra,
        )

    def close(
        self, wait: bool = True, timeout_s: float | None = None, give_up_after: int | None = 5
    ) -> list[str]:
        """Stop; first wait for pending uploads if ``wait`` (while they make progress: not
        past ``give_up_after`` failed attempts in a row). Returns what is not backed up
        (named in a warning too)."""
        left: list[str] = []
        try:
            if wait:
                left = self.wait(timeout_s, give_up_after=give_up_after, closing=True)
        finally:
            with self._cond:
                self._closing = True
                self._leave = True
                left = [*self._given_up, *self._waiting()]
                unrepaired = sorted(self._repairs)
                self._cond.notify_all()
            self._stop.set()
            self._wake.set()
            self._thread.join()
        if left:
            log.warning(
                "not backed up to %s: %s (they are only on %s)",
                self.remote.url,
                ", ".join(left),
                self.local.url,
            )
        if unrepaired:
            log.warning(
                "not repaired on %s: %s (each holds a damaged file there; `ckptstore sync "
                "%s %s --verify-existing --replace-damaged` repairs them)",
                self.remote.url, ", ".join(unrepaired), self.local.url, self.remote.url,
            )  # fmt: skip
        return left

    # ---- the background thread ------------------------------------------------------
    def _run(self, catch_up: bool) -> None:
        if catch_up:
            try:
                self._catch_up()
            except Exception as exc:
                log.warning(
                    "backup: could not compare %s with %s: %s", self.local.url, self.remote.url, exc
                )
            finally:
                with self._cond:
                    self._catching_up = False
                    self._cond.notify_all()
        while True:
            with self._cond:
                while not self._queue and not self._leave:
                    self._cond.wait()
                if self._leave:
                    return
                name = self._queue.pop(0)
                self._current, self._current_sent = name, False
            ok = False
            try:
                ok = self._attempt(name)
            finally:
                with self._cond:
                    self._current = None
                    if ok or name in self._skipped:
                        self._queued_at.pop(name, None)
                    elif not self._leave:
                        # Back to the front, unless newer checkpoints fill the backlog.
                        self._queue.insert(0, name)
                        while len(self._queue) > self.max_queued:
                            dropped = self._queue.pop(0)
                            if dropped in self._repairs:  # queued again after an upload
                                self._repairs.discard(dropped)
                                continue
                            self._skipped.append(dropped)
                            self._queued_at.pop(dropped, None)
                            log.warning(
                                "backup: giving up on %s, a newer one supersedes it", dropped
                            )
                    self._cond.notify_all()
            if not ok and not self._leave:
                self._backoff()

    def _catch_up(self) -> None:
        """At start: queue the newest local checkpoints the remote does not have."""
        found = backup_compare.compare(self.local, self.remote, self._manifest_key)
        if found.same:
            with self._cond:
                self._newest = max(found.same)
        self._finish_replaces(found.local_names, found.remote_names)
        for name in found.missing[-(self.max_queued) :]:
            self.submit(name)

    def _backoff(self) -> None:
        delay = min(self.retry_max_s, self.retry_initial_s * 2 ** max(0, self._failures - 1))
        self._wake.clear()
        self._wake.wait(delay)

    def _attempt(self, name: str) -> bool:
        began = time.monotonic()
        try:
            mine = read_manifest(self.local, name, manifest_key=self._manifest_key)
            if name in self._repairs:
                if not self._repair(name, mine):
                    return True  # (not an upload: what it did is noted)
            elif mine.part is not None:  # node-local disks: the other disks upload theirs
                if not self.remote.exists(f"{name}/{MANIFEST_FILE}"):
                    self._upload(name, replace=False, part=True)
            elif not self.remote.exists(f"{name}/{MANIFEST_FILE}"):
                self._upload(name, replace=False)
            elif (different := self._how_different(name, mine)) is None:
                log.info("backup: %s is already on %s", name, self.remote.url)
            else:
                log.warning(
                    "backup: %s/%s is not this checkpoint (%s): replacing it with %s/%s",
                    self.remote.url,
                    name,
                    different,
                    self.local.url,
                    name,
                )
                self._upload(name, replace=True)
                with self._cond:
                    self._replaced.append(name)
                log.warning("backup: replaced %s/%s with this run's", self.remote.url, name)
        except CheckpointNotFoundError:
            log.info("backup: %s was deleted locally before it could be uploaded", name)
            with self._cond:
                self._repairs.discard(name)
            return True
        except FileNotFoundError:
            log.info("backup: %s was deleted locally before it could be uploaded", name)
            return True
        except PartRefusedError as exc:
            log.error("backup: not uploading %s: %s", name, exc)
            return True
        except PartsMissingError as exc:
            closing = self._closing_since
            if closing is None or began < closing:  # (a whole wait since the run ended)
                return self._failed(name, exc)
            log.error("backup: giving up on %s as the run ends: %s", name, exc)
            with self._cond:
                self._given_up.append(name)
                self._last_error = f"{type(exc).__name__}: {exc}"  # (for the run's summary)
            return True
        except CorruptCheckpointError as exc:
            log.error("backup: not uploading %s, the local copy is damaged: %s", name, exc)
            return True
        except CheckpointExistsError:
            pass  # someone else backed it up meanwhile
        except CopyStoppedError:
            return False
        except Exception as exc:
            return self._failed(name, exc)
        finally:
            self.progress = None
        self._after_upload(name)
        return True

    def _failed(self, name: str, exc: BaseException) -> bool:
        """A failed attempt: counted, said, retried (False)."""
        with self._cond:
            self._failures += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            failures = self._failures
        status = self.status()
        log.warning(
            "backup of %s to %s failed (attempt %d): %s; the backup is %.0f s behind "
            "(newest backed up: %s); retrying",
            name,
            self.remote.url,
            failures,
            self._last_error,
            status.behind_s,
            status.newest_backed_up or "none",
        )
        return False

    def _how_different(self, name: str, mine: Manifest) -> str | None:
        return backup_compare.how_different(self.remote, name, mine, self._manifest_key)

    def _upload(self, name: str, *, replace: bool, part: bool = False) -> None:
        if not replace and not part and name in self.remote.list_names():
            # Files without a manifest: an upload by a process that died. This
            # replicator is the backup root's only writer: clear them, or the
            # new upload would refuse to write over them.
            log.info("backup: removing an unfinished upload of %s first", name)
            self.remote.delete(name)
        progress = self.progress = Progress(f"backing up {name} to {self.remote.url}", 0)
        start = time.monotonic()
        copy: Callable[..., Manifest] = replace_checkpoint if replace else copy_checkpoint
        extra: dict[str, Any] = {}
        if part:  # the other nodes' files arrive from them; give up for a newer one
            extra = {"given_up": lambda: bool(self._queue), "wait_s": self.parts_wait_s}
            copy = commit_parts_backup
        else:  # (copies inside the store: a damaged file there is not used, but noted)
            extra = {"damaged": self._damaged}
        manifest = copy(
            self.local,
            self.remote,
            name,
            threads=self.threads,
            progress=progress,
            stop=self._stop,
            manifest_key=self._manifest_key,
            **extra,
        )
        elapsed = time.monotonic() - start
        sent = progress.payload  # (incremental: what the remote held was linked)
        if self._on_speed is not None and sent >= (16 << 20):
            moving_s = elapsed if progress.moving_s is None else progress.moving_s
            self._on_speed(sent / max(moving_s, 1e-6))
        what = f"{format_bytes(sent)} from this node" if part else moved(manifest, progress)
        log.info("backup: %s is on %s (%s, in %.1f s)", name, self.remote.url, what, elapsed)
        self._forget_damage(name)

    def _after_upload(self, name: str) -> None:
        self._current_sent = True
        abort_orphans = getattr(self.remote, "abort_orphans", None)
        if abort_orphans is not None:
            abort_orphans()  # uploads a failed attempt could not abort while unreachable
        with self._cond:
            if self._failures:
                log.warning("backup to %s works again", self.remote.url)
            self._failures = 0
            self._last_error = None
        try:
            try:
                pointer.put(self.remote, FINALS_FILE, self.local.read_bytes(FINALS_FILE))
            except FileNotFoundError:
                pass
            except CkptStoreError as exc:  # (retention and latest go on without it)
                log.warning(
                    "backup: could not copy %s to %s: %s", FINALS_FILE, self.remote.url, exc
                )
            ours = self._this_runs()
            # The newest of this run's: another run's higher steps do not count.
            newer = not ours or ours[-1].name <= name
            if newer:
                with self._cond:
                    self._newest = name
                pointer.write_latest(self.remote, name)
            prune(
                self.remote,
                self.keep,
                spare=self.busy(),
                manifest_key=self._manifest_key,
                verified=(name,),  # read back and checked by the copy that just ended
                infos=ours,  # another run's checkpoints are not this retention's business
            )
        except CkptStoreError as exc:
            log.warning("backup: housekeeping on %s failed: %s", self.remote.url, exc)
        self._queue_repairs()
        if self._on_backed_up is not None:
            self._on_backed_up(name)

    def _this_runs(self) -> list[CheckpointInfo]:
        """The remote's committed checkpoints of this run and its lineage (all of them
        without a run id)."""
        infos = list_checkpoints(self.remote, manifest_key=self._manifest_key)
        if self.run_id is None:
            return infos
        return of_lineage(infos, (self.run_id, *self.lineage), unrecorded=False)
