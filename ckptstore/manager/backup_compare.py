"""What the backup's remote holds against the local root, for the
:class:`~ckptstore.manager.replicate.Replicator`: which local checkpoints it has (the
*same* checkpoint: :meth:`~ckptstore.format.Manifest.same_checkpoint`), which it lacks,
and how a checkpoint of the same name there differs from the local one."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ckptstore.engine.ops import list_checkpoints, read_manifest
from ckptstore.errors import CkptStoreError
from ckptstore.format.manifest import Manifest
from ckptstore.storage import StorageBackend

log = logging.getLogger("ckptstore")


@dataclass(frozen=True)
class Comparison:
    same: set[str]  # local checkpoints the remote holds
    missing: list[str]  # local checkpoints to upload, oldest first
    local_names: set[str]
    remote_names: set[str]


def compare(
    local: StorageBackend, remote: StorageBackend, manifest_key: bytes | None
) -> Comparison:
    """The local root's committed checkpoints against the remote's. Missing are those
    the remote lacks at or past its newest step of the local runs: another run's
    checkpoints there say nothing about what this one lacks, and at the newest step a
    different checkpoint of that name is in the way. A remote that cannot be listed
    is taken as empty (said in a warning)."""
    mine = list_checkpoints(local, manifest_key=manifest_key)
    try:
        on_remote = list_checkpoints(remote, manifest_key=manifest_key)
    except CkptStoreError as exc:
        log.warning("backup: could not list %s: %s", remote.url, exc)
        on_remote = []
    theirs = {i.name: i.manifest for i in on_remote}
    same = {i.name for i in mine if i.name in theirs and theirs[i.name].same_checkpoint(i.manifest)}
    runs = {i.manifest.run_id for i in mine}
    newest_remote = max(
        (i.manifest.step or 0 for i in on_remote if i.manifest.run_id in runs), default=-1
    )
    missing = [
        i.name for i in mine if i.name not in same and (i.manifest.step or 0) >= newest_remote
    ]
    return Comparison(same, missing, {i.name for i in mine}, set(theirs))


def how_different(
    remote: StorageBackend, name: str, mine: Manifest, manifest_key: bytes | None
) -> str | None:
    """None if the remote's ``name`` is this very checkpoint, else how it differs."""
    try:
        theirs = read_manifest(remote, name, manifest_key=manifest_key)
    except CkptStoreError as exc:
        return f"its manifest cannot be read: {exc}"
    if theirs.same_checkpoint(mine):
        return None
    if theirs.run_id != mine.run_id:
        return (
            f"written by run {theirs.run_id or '(not recorded)'}, "
            f"this is run {mine.run_id or '(not recorded)'}"
        )
    return "same run, other files or checksums: of a branch retired by a restore?"
