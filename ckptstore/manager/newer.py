"""What a restore does with the checkpoints past the one it restored: newer ones found
damaged or not checkpoints are moved aside; good newer ones, in either tier, are kept,
refused, or retired as a branch, and the run goes on as a new branch then.

Mixed into :class:`~ckptstore.CheckpointManager` through
:class:`~ckptstore.manager.restore.RestoreMixin`; decided on rank 0, told to every rank.
"""

from __future__ import annotations

import builtins
import logging
import time
from typing import Any

from ckptstore.engine import groups
from ckptstore.engine.checkpointer import Checkpointer
from ckptstore.engine.ops import CheckpointInfo
from ckptstore.errors import CkptStoreError
from ckptstore.format.manifest import new_run_id
from ckptstore.layout import MANIFEST_FILE, STEP_NAME
from ckptstore.manager import branch, pointer
from ckptstore.manager.branch import newer_in, refuse, retire_newer, summary
from ckptstore.manager.replicate import Replicator
from ckptstore.storage import StorageBackend

log = logging.getLogger("ckptstore")


class NewerMixin:
    """The checkpoints newer than the one restored; the manager's constructor sets these
    attributes."""

    enabled: bool
    _ckpt: Checkpointer | None
    _remote: StorageBackend | None
    _control: Any
    _rank: int
    _manifest_key: bytes | None
    _run_id: str
    _lineage: tuple[str, ...]
    _backup: Replicator | None
    _newer_kept: frozenset[int]
    # Rank 0: the backup's checkpoints this manager found damaged downloading them.
    _damaged_on_backup: frozenset[str] = frozenset()

    def _set_aside_newer(self, info: CheckpointInfo, damaged: set[int]) -> None:
        """Move aside what would block this run's next saves: newer checkpoints found
        damaged while restoring, and entries at a newer checkpoint's name that are not
        checkpoints (no or unreadable manifest; on object stores only an unreadable one,
        since a prefix without a manifest may be a save in progress). Kept for
        inspection as ``step_N.damaged-<UTC>``, never deleted; by each disk's first rank
        (node-local disks: a part left on one would fail that node's next save)."""
        if not self.enabled or self._ckpt is None or not self._ckpt.first_on_disk:
            return
        backend = self._ckpt.backend
        restored = info.step or 0
        try:
            names = backend.list_names()
            listed = {i.name for i in self._ckpt.list()}
        except CkptStoreError as exc:
            log.warning("could not look for damaged checkpoints under %s: %s", backend.url, exc)
            return
        for name in names:
            match = STEP_NAME.match(name)
            if match is None or int(match.group(1)) <= restored:
                continue
            step = int(match.group(1))
            if step in damaged:
                # (node-local disks: the part found damaged may be on another node's)
                why = "is damaged" if not self._ckpt.node_local else "is damaged on some node"
            elif name in listed:
                continue  # a good newer checkpoint: _handle_newer's business
            elif backend.capabilities.local or backend.exists(f"{name}/{MANIFEST_FILE}"):
                why = "is not a loadable checkpoint"
            else:
                continue
            try:
                aside = pointer.set_aside(backend, name, time.time())
            except CkptStoreError as exc:
                log.warning(
                    "%s/%s %s and could not be moved aside: %s", backend.url, name, why, exc
                )
                continue
            log.warning(
                "%s/%s %s: moved aside to %s (kept for inspection, never loaded or deleted "
                "by ckptstore; `ckptstore verify` says what is wrong with it), so that this "
                "run can save that step again",
                backend.url,
                name,
                why,
                aside,
            )

    def _handle_newer(self, info: CheckpointInfo | None, newer: str) -> None:
        """Checkpoints past the one restored (``info``; None: restoring nothing), in
        either tier: kept with a warning, refused, or moved aside as a retired branch.
        Decided on rank 0; a refusal is raised on every rank."""
        if not self.enabled or self._ckpt is None:
            return
        restored = None if info is None else info.name
        moved, kept = groups.decide(
            lambda: self._newer_on_rank0(info, newer),
            self._control,
            what="look for checkpoints newer than the one restored",
        )
        self._newer_kept = frozenset(kept)  # every rank refuses to save those steps
        if moved and self._ckpt.node_local and self._ckpt.first_on_disk and self._rank != 0:
            self._retire_part(info)  # node-local disks: their parts too (restore then waits)
        if moved and info is not None:
            # A new branch: its own run id, with the run it left as its lineage, so
            # that retention and the backup never take the retired branch for its own.
            run = info.manifest.run_id
            branch = str(groups.broadcast(new_run_id(), self._control))  # rank 0's
            self._set_run(branch, (run, *info.manifest.lineage) if run else ())
            log.warning("this run goes on from %s as a new branch (run %s)", restored, self._run_id)

    def _retire_part(self, info: CheckpointInfo | None) -> None:
        """On a node-local disk other than rank 0's: retire this disk's parts of the
        checkpoints rank 0 retired (newer than ``info``), as rank 0 did its own. (No
        ``latest`` pointer here: only rank 0's disk keeps one up to date.)"""
        assert self._ckpt is not None
        backend, than = self._ckpt.backend, None if info is None else info.step or 0
        try:
            branch.retire(backend, newer_in(backend, than, manifest_key=self._manifest_key))
        except Exception as exc:  # its next save of such a step fails, naming it
            log.warning("could not move the newer parts under %s aside: %s", backend.url, exc)

    def _newer_on_rank0(
        self, info: CheckpointInfo | None, newer: str
    ) -> tuple[bool, builtins.list[int]]:
        """Whether newer checkpoints were retired, and the steps of those kept here."""
        assert self._ckpt is not None
        than = None if info is None else info.step or 0
        key = self._manifest_key
        found = [(self._ckpt.backend, newer_in(self._ckpt.backend, than, manifest_key=key))]
        if self._remote is not None:
            try:
                found.append((self._remote, newer_in(self._remote, than, manifest_key=key)))
            except CkptStoreError as exc:
                if newer != "keep":
                    raise
                log.warning("could not list the backup %s: %s", self._remote.url, exc)
        if not any(infos for _, infos in found):
            return False, []
        if newer == "refuse":
            damaged = (
                {(self._remote.url, n) for n in self._damaged_on_backup} if self._remote else set()
            )
            raise refuse(found, None if info is None else info.name, damaged)
        if newer == "keep":
            if info is not None:
                log.warning(
                    "checkpoints newer than %s exist (%s); training on will fail to save "
                    "where they are: restore with newer='discard' to move them aside",
                    info.name,
                    "; ".join(f"{b.url}: {summary(i)}" for b, i in found if i),
                )
            return False, [i.step or 0 for i in found[0][1]]
        for backend, infos in found:
            retire_newer(backend, infos, info)
        return True, []

    def _set_run(self, run_id: str, lineage: tuple[str, ...]) -> None:
        """This run's id and lineage, in its next manifests and the backup's retention."""
        self._run_id, self._lineage = run_id, lineage
        if self._backup is not None:
            self._backup.run_id, self._backup.lineage = run_id, lineage
