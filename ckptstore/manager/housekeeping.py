"""The manager's housekeeping: after each commit of this run, on rank 0 and off the
writer thread, the ``latest`` pointer moves, the backup tier is handed the checkpoint,
a checkpoint that links files of earlier ones (incremental saves) is read through, and
retention prunes (:mod:`ckptstore.manager.retention`).

See :class:`~ckptstore.CheckpointManager` for the rules; this is the half of it that
runs behind the saves.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ckptstore.engine.checkpointer import Checkpointer
from ckptstore.engine.listing import read_manifest
from ckptstore.engine.ops import CheckpointInfo
from ckptstore.errors import CkptStoreError
from ckptstore.layout import FINALS_FILE, LATEST_FILE, checkpoint_name, step_of
from ckptstore.manager import partbackup, pointer, retention
from ckptstore.manager.policies import CheckpointRecord, RetentionPolicy
from ckptstore.manager.replicate import Replicator

log = logging.getLogger("ckptstore")


class HousekeepingMixin:
    """Pointer, backup hand-off and retention after each commit; mixed into the
    manager, whose constructor sets these attributes."""

    keep_policy: RetentionPolicy | None
    enabled: bool
    _ckpt: Checkpointer | None
    _housekeeping: ThreadPoolExecutor | None
    _backup: Replicator | None
    _part_backup: partbackup.PartUploader | None
    _committed: set[str]  # saved by this manager: verified when written
    _last_commit: str | None  # the name this manager committed last (writer thread)
    _links_read: tuple[str, bool] | None  # the last one _read_links_through read: intact?
    _manifest_key: bytes | None
    _run_id: str
    _lineage: tuple[str, ...]
    _agreement: Any  # StepAgreement with several ranks, else None
    _full_next: bool  # the next save writes everything
    _heal: bool  # rank 0: ask every rank for that at the next step
    _heal_pending: bool  # rank 0: asked for, not yet started
    _healed_from: int  # rank 0: the step of the last full save asked for (0: none)

    def _after_commit(self, fut: Future[Any]) -> None:
        """Once a save is durable (on the writer thread): hand the rest to housekeeping."""
        if fut.exception() is None and self._housekeeping is not None:
            self._last_commit = fut.result().name  # (saves commit in the order made)
            with contextlib.suppress(RuntimeError):  # shut down: nothing more to do
                self._housekeeping.submit(self._point_and_prune, fut.result().name)

    def _upload_part(self, fut: Future[Any]) -> None:
        if fut.exception() is None and self._part_backup is not None:
            self._part_backup.submit(fut.result().name)

    def _point_and_prune(self, name: str) -> None:
        assert self._ckpt is not None
        try:
            # The newest commit, not this turn's: with saves committing faster than the
            # turns run, each turn's name may be pruned already (an earlier turn saw
            # newer ones), and ``latest`` would stay behind for as long as that lasts
            latest = self._last_commit or name
            if not pointer.move_latest(self._ckpt.backend, latest) and latest != name:
                pointer.move_latest(self._ckpt.backend, name)
        except CkptStoreError as exc:
            log.warning("could not update %s/%s: %s", self._ckpt.url, LATEST_FILE, exc)
        try:
            # A checkpoint that once ended a run under this name was deleted (by hand, or
            # by retention): this one did not end a run, unless _record_final, queued
            # after this turn, says so
            pointer.forget_finals(self._ckpt.backend, {name})
        except CkptStoreError as exc:
            log.warning("could not update %s/%s: %s", self._ckpt.url, FINALS_FILE, exc)
        self._committed.add(name)
        if self._backup is not None:
            self._backup.submit(name)
        self._prune()

    def _on_backed_up(self, name: str) -> None:
        """(backup thread) A checkpoint local retention had to spare may go now."""
        if self._housekeeping is not None:
            with contextlib.suppress(RuntimeError):  # shut down: nothing more to do
                self._housekeeping.submit(self._prune)

    # ---- retention ------------------------------------------------------------------
    def _records(self, infos: builtins.list[CheckpointInfo]) -> builtins.list[CheckpointRecord]:
        assert self._ckpt is not None
        return retention.records(self._ckpt.backend, infos)

    def retention_preview(self) -> builtins.list[str]:
        """The committed checkpoints of this run's lineage that the ``keep=`` policy
        would delete at the next save, oldest first (none without a policy): those an
        earlier run kept under a looser one, say. Reads manifests, no data."""
        if self._ckpt is None or not self.enabled:
            return []
        return retention.doomed(
            self._ckpt.backend,
            self.keep_policy,
            manifest_key=self._manifest_key,
            lineage=(self._run_id, *self._lineage),
        )

    def _prune(self) -> None:
        if self._ckpt is None or not self._committed:
            return
        damaged: set[str] = set()
        verified = self._read_links_through(damaged)
        try:
            spare = self._backup.busy() if self._backup is not None else set()
            retention.prune(  # (no policy: deletes nothing, reads nothing)
                self._ckpt.backend,
                self.keep_policy,
                spare=spare,
                manifest_key=self._manifest_key,
                trusted=self._committed,
                lineage=(self._run_id, *self._lineage),
                verified=verified,
                damaged=damaged,
            )
        except CkptStoreError as exc:  # storage trouble must not fail the save it follows
            log.warning("retention under %s failed: %s", self._ckpt.url, exc)
        except Exception:  # (on an executor: it would vanish, and retention with it)
            log.exception("retention under %s failed", self._ckpt.url)
        self._heal_after(damaged)

    def _read_links_through(self, damaged: set[str]) -> set[str]:
        """Read this run's newest checkpoint through (every byte, its linked files too)
        when it links files of earlier ones on a local disk, once per checkpoint; returns
        its name if intact (retention need not read it again), else adds it to
        ``damaged``. Retention reads it before deleting anything, but a run that keeps
        every checkpoint (or whose policy deletes nothing yet) would otherwise never read
        them again, and a file rotten on disk would be linked into every later save."""
        ckpt, name = self._ckpt, self._last_commit
        # (a save committed since this turn began: its own turn reads it)
        if ckpt is None or name is None or name not in self._committed:
            return set()
        if self._links_read is not None and self._links_read[0] == name:  # (a backup's turn)
            return {name} if self._links_read[1] else set()
        config = ckpt.config
        if not (config.incremental and config.full_every != 1 and ckpt.backend.capabilities.local):
            return set()
        from ckptstore.engine.ops import verify  # torch: imported here, as retention does

        self._links_read = (name, False)
        try:
            if not read_manifest(ckpt.backend, name, manifest_key=self._manifest_key).linked:
                return set()  # (retention reads it if it must: as before)
            problems = verify(ckpt.backend, name, None, manifest_key=self._manifest_key)
        except Exception as exc:  # unreadable (EIO, a damaged manifest): as damaged
            problems = [f"could not read it through: {exc!r}"]
        if not problems:
            self._links_read = (name, True)
            return {name}
        log.warning("%s/%s is damaged: %s", ckpt.url, name, problems[0])
        damaged.add(name)
        return set()

    def _heal_after(self, damaged: set[str]) -> None:
        assert self._ckpt is not None
        ours = [s for n in damaged & self._committed if (s := step_of(n)) is not None]
        if ours and self._ckpt.config.incremental and self._ckpt.config.full_every != 1:
            self._ask_for_full_save(max(ours))

    def _ask_for_full_save(self, step: int) -> None:
        """Checkpoint ``step``, saved by this run, is damaged: its files (bit rot, or a
        file an incremental save linked from an earlier one) must not be linked into the
        next checkpoints, so the next save writes everything; with several ranks, every
        rank at the same step (asked for at the next step's agreement). Once: the saves
        started before that one link the same files, and are found damaged too."""
        assert self._ckpt is not None
        if self._heal_pending or step < self._healed_from:
            return
        self._heal_pending = True
        which = (
            "the next save"
            if self._agreement is None
            else "the ranks' save after they agree on it at a step (maybe_save)"
        )
        log.warning(
            "%s/%s, saved by this run, is damaged: %s writes every tensor again instead of "
            "linking its files (incremental)",
            self._ckpt.url,
            checkpoint_name(step),
            which,
        )
        if self._agreement is None:
            self._full_next = True
        else:
            self._heal = True

    def _read_latest(self) -> str | None:
        return None if self._ckpt is None else pointer.read_latest(self._ckpt.backend)

    def _record_final(self, name: str) -> None:
        assert self._ckpt is not None
        pointer.record_final(self._ckpt.backend, name)
