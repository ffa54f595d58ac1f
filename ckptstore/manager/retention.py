"""Retention on a storage root: what each checkpoint looks like to a policy, and pruning.

Shared by the local tier (:class:`~ckptstore.CheckpointManager`) and the backup tier
(:class:`~ckptstore.transfer.Replicator`): both decide from the manifests under the root,
so decisions survive restarts, and both spare the newest checkpoint and the one the
``latest`` pointer names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ckptstore.crashpoints import crash_point
from ckptstore.engine.ops import list_checkpoints
from ckptstore.layout import FINALS_FILE, LATEST_FILE
from ckptstore.manager.pointer import read_lines
from ckptstore.manager.policies import FINAL, CheckpointRecord, RetentionPolicy
from ckptstore.storage import StorageBackend

log = logging.getLogger("ckptstore")


def records(backend: StorageBackend, infos: Iterable[Any]) -> list[CheckpointRecord]:
    """What retention sees of each checkpoint; a step named in ``finals`` counts as final."""
    finals = set(read_lines(backend, FINALS_FILE))
    out = []
    for info in infos:
        m = info.manifest
        reason = FINAL if info.name in finals else m.reason
        out.append(
            CheckpointRecord(
                step=m.step or 0,
                epoch=m.epoch,
                reason=reason,
                metrics=dict(m.metrics),
                created_unix_s=m.created_unix_s,
            )
        )
    return out


def prune(
    backend: StorageBackend,
    policy: RetentionPolicy | None,
    *,
    spare: Iterable[str] = (),
    manifest_key: bytes | None = None,
) -> list[str]:
    """Apply ``policy`` to the committed checkpoints under ``backend``; return what was
    deleted. Never deletes the newest, the one ``latest`` names, or any in ``spare``.

    With a ``manifest_key`` only validly signed checkpoints count (and are deleted): a
    forged "newer" checkpoint must not push real ones out.
    """
    if policy is None:
        return []
    infos = list_checkpoints(backend, manifest_key=manifest_key)
    if not infos:
        return []
    keep = set(policy.keep(records(backend, infos)))
    keep.add(max(info.manifest.step or 0 for info in infos))
    spared = set(spare) | set(read_lines(backend, LATEST_FILE)[:1])
    deleted = []
    for info in infos:
        if (info.manifest.step or 0) not in keep and info.name not in spared:
            backend.delete(info.name)
            crash_point("retention.after_delete")
            deleted.append(info.name)
            log.info("retention: deleted %s/%s", backend.url, info.name)
    return deleted
