"""The backup tier's repairs: this run's checkpoints on the remote in which an upload
found a damaged file (an incremental backup copies a chain's shared file inside the
store from a checkpoint there, after checking it; a damaged one is passed over, the file
sent again, and noted here). After each upload, such a checkpoint whose local copy is
still here is queued to be replaced from it (behind what waits; a newer checkpoint
evicts a queued repair, never the other way round). A repair that fails is tried again
after the next upload, up to :data:`REPAIR_TRIES` times; one that cannot be made (its
local copy gone, or every try failed) is left as it is, said once, and listed in
:attr:`~ckptstore.manager.backup_status.BackupStatus.damaged`. At start-up, a replace
a killed process left half done (only the new copy, beside the name) is finished. Mixed into
:class:`~ckptstore.manager.replicate.Replicator`, on its background thread.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from ckptstore.engine.ops import read_manifest
from ckptstore.errors import CkptStoreError, CopyStoppedError
from ckptstore.format.manifest import Manifest
from ckptstore.layout import MANIFEST_FILE, REPLACING_SUFFIX
from ckptstore.linking import forget_damaged
from ckptstore.storage import StorageBackend

log = logging.getLogger("ckptstore")

REPAIR_TRIES = 3  # failed replaces of one checkpoint before it is left damaged


class RepairMixin:
    """State and steps of the repairs; the replicator's constructor calls
    :meth:`_init_repairs` and sets the attributes below."""

    local: StorageBackend
    remote: StorageBackend
    max_queued: int
    run_id: str | None
    lineage: tuple[str, ...]
    _manifest_key: bytes | None
    _cond: threading.Condition
    _queue: list[str]
    _current: str | None

    if TYPE_CHECKING:  # provided by Replicator

        def _upload(self, name: str, *, replace: bool, part: bool = False) -> None: ...

        def _how_different(self, name: str, mine: Manifest) -> str | None: ...

    def _init_repairs(self) -> None:
        self._damaged: set[str] = set()  # "<checkpoint>/<file>" there uploads found damaged
        self._repairs: set[str] = set()  # checkpoints queued or being replaced for that
        self._repaired: list[str] = []
        self._unrepaired: dict[str, str] = {}  # this run's, left damaged there -> why
        self._not_ours: set[str] = set()  # another run's checkpoints there (not repaired)
        self._repair_tries: dict[str, int] = {}

    def _forget_damage(self, name: str) -> None:
        """``name`` was just uploaded or replaced there: what was noted of it is stale."""
        forget_damaged(self._damaged, name)
        self._not_ours.discard(name)
        self._repair_tries.pop(name, None)
        with self._cond:
            self._unrepaired.pop(name, None)

    def _queue_repairs(self) -> None:
        """(After an upload) queue the checkpoints noted damaged whose local copy is
        here; leave the others."""
        for name in sorted({at.partition("/")[0] for at in frozenset(self._damaged)}):
            with self._cond:
                if name in self._unrepaired or name in self._not_ours:  # (found again)
                    forget_damaged(self._damaged, name)
                    continue
                if name in self._repairs or name == self._current or name in self._queue:
                    continue
            if not self.local.exists(f"{name}/{MANIFEST_FILE}"):
                self._leave_damaged(name, "its local copy is gone")
                continue
            with self._cond:
                if len(self._queue) >= self.max_queued:
                    return
                self._repairs.add(name)
                self._queue.append(name)
                self._cond.notify_all()

    def _repair(self, name: str, mine: Manifest) -> bool:
        """Replace ``name`` there with the local copy (``mine``), if it is this very
        checkpoint there (not pruned by the remote's retention meanwhile, nor another
        checkpoint of that name, nor a node-local part); True when it was replaced."""
        try:
            there = self.remote.exists(f"{name}/{MANIFEST_FILE}")
            if mine.part is not None or not there or self._how_different(name, mine):
                self._forget_damage(name)  # nothing of this run's to repair there
                return False
            log.warning(
                "backup: %s/%s holds a damaged file: replacing it with %s/%s",
                self.remote.url, name, self.local.url, name,
            )  # fmt: skip
            try:
                self._upload(name, replace=True)
            except CopyStoppedError:
                raise
            except Exception as exc:
                tries = self._repair_tries[name] = self._repair_tries.get(name, 0) + 1
                if tries >= REPAIR_TRIES:
                    self._leave_damaged(name, f"{tries} replaces failed, the last: {exc}")
                else:
                    log.warning(
                        "backup: replacing %s/%s failed (%s); tried again after the next "
                        "upload", self.remote.url, name, exc,
                    )  # fmt: skip
                return False
            with self._cond:
                self._repaired.append(name)
            return True
        finally:
            with self._cond:
                self._repairs.discard(name)

    def _leave_damaged(self, name: str, why: str) -> None:
        """Stop trying to repair ``name``; list it as damaged if it is this run's (or its
        lineage's) checkpoint there, and say so once."""
        forget_damaged(self._damaged, name)
        try:
            theirs = read_manifest(self.remote, name, manifest_key=self._manifest_key)
        except CkptStoreError:
            return  # gone (the remote's retention), or not readable: not ours to name
        runs = {r for r in (self.run_id, *self.lineage) if r}
        if runs and theirs.run_id not in runs:
            self._not_ours.add(name)  # another run's checkpoint sharing the prefix
            return
        with self._cond:
            self._unrepaired[name] = why
        log.warning(
            "backup: %s/%s holds a damaged file and stays as it is (%s); `ckptstore sync "
            "<intact source> %s --verify-existing --replace-damaged` repairs it",
            self.remote.url, name, why, self.remote.url,
        )  # fmt: skip

    def _finish_replaces(self, local: set[str], committed: set[str]) -> None:
        """(At start) a replace there that was stopped (a killed process) after the old
        checkpoint was deleted left only the complete new copy beside its name, which
        listings do not show: copy it under its name again from here (the copy then
        deletes the one beside). One whose name is committed there lost only the new
        copy: deleted."""
        for beside in self.remote.list_names():
            name = beside.removesuffix(REPLACING_SUFFIX)
            if name == beside:
                continue
            try:
                if name in committed:
                    self.remote.delete(beside)
                elif name in local:
                    log.warning(
                        "backup: a replace of %s/%s was interrupted: copying it again",
                        self.remote.url, name,
                    )  # fmt: skip
                    self._upload(name, replace=False)
                else:
                    log.warning(
                        "backup: %s/%s is the copy an interrupted replace left, and %s is "
                        "not here to finish it: `ckptstore sync <source> %s --step N` does",
                        self.remote.url, beside, name, self.remote.url,
                    )  # fmt: skip
            except Exception as exc:  # (the rest of the start-up still runs)
                log.warning("backup: could not finish the replace of %s: %s", name, exc)
