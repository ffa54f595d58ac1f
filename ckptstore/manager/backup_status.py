"""What :meth:`ckptstore.CheckpointManager.backup_status` returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackupStatus:
    """Where the backup stands."""

    remote: str
    newest_backed_up: str | None  # by this replicator, or found the same on the remote at start
    in_progress: str | None
    queued: tuple[str, ...]
    skipped: tuple[str, ...]  # superseded by newer checkpoints before they were uploaded
    failures: int  # consecutive failed attempts (0: healthy)
    last_error: str | None
    behind_s: float  # since the oldest committed checkpoint not yet backed up (0: none)
    # The remote held a different checkpoint of that name (another run's, a retired
    # branch's, or one it could not read): replaced with the local one.
    replaced: tuple[str, ...] = ()
    # This run's checkpoints there in which an upload found a damaged file (incremental
    # saves: a file it would have copied inside the store; manager/backup_repair.py):
    # replaced with the local copy (repaired), queued or being replaced for that
    # (repairing; not in queued or in_progress), or left as they are (damaged: the local
    # copy is gone, or every replace failed)
    repaired: tuple[str, ...] = ()
    damaged: tuple[str, ...] = ()
    repairing: tuple[str, ...] = ()
    # Node-local disks: given up as the run closed, the other nodes' files never came
    # (PartsMissingError, in last_error)
    given_up: tuple[str, ...] = ()
