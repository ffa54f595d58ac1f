"""Retention on a storage root: what each checkpoint looks like to a policy, and pruning.

Shared by the local tier (:class:`~ckptstore.CheckpointManager`) and the backup tier
(:class:`~ckptstore.transfer.Replicator`): both decide from the manifests under the root,
so decisions survive restarts, and both spare the newest checkpoint and the one the
``latest`` pointer names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from ckptstore.crashpoints import crash_point
from ckptstore.engine.listing import CheckpointInfo, list_checkpoints
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


def doomed(
    backend: StorageBackend,
    policy: RetentionPolicy | None,
    *,
    manifest_key: bytes | None = None,
    lineage: Sequence[str] | None = None,
) -> list[str]:
    """The committed checkpoints :func:`prune` would let go of now, oldest first: its
    choice without reading a byte (it also spares the ``latest`` one and the newest
    that verifies, and may keep more)."""
    infos = _let_go(backend, policy, None, lineage, manifest_key)[1]
    spared = set(read_lines(backend, LATEST_FILE)[:1])
    return [i.name for i in infos if i.name not in spared]


def _let_go(
    backend: StorageBackend,
    policy: RetentionPolicy | None,
    infos: Sequence[CheckpointInfo] | None,
    lineage: Sequence[str] | None,
    manifest_key: bytes | None,
) -> tuple[Sequence[CheckpointInfo], list[CheckpointInfo]]:
    """(the checkpoints retention considers, those ``policy`` does not keep): the
    newest is always kept."""
    if policy is None:
        return [], []
    if infos is None:
        infos = list_checkpoints(backend, manifest_key=manifest_key)
    if lineage is not None:
        infos = of_lineage(infos, lineage, unrecorded=True)
    if not infos:
        return [], []
    keep = set(policy.keep(records(backend, infos)))
    keep.add(max(info.manifest.step or 0 for info in infos))
    return infos, [i for i in infos if (i.manifest.step or 0) not in keep]


def prune(
    backend: StorageBackend,
    policy: RetentionPolicy | None,
    *,
    spare: Iterable[str] = (),
    manifest_key: bytes | None = None,
    trusted: Iterable[str] = (),
    verified: Iterable[str] = (),
    infos: Sequence[CheckpointInfo] | None = None,
    lineage: Sequence[str] | None = None,
    damaged: set[str] | None = None,
) -> list[str]:
    """Apply ``policy`` to the committed checkpoints under ``backend``; return what was
    deleted. Never deletes the newest, the one ``latest`` names, any in ``spare``, or
    the newest checkpoint that verifies.

    A checkpoint found damaged never protects the run: before deleting anything, the
    checkpoints are verified newest first (every byte against its manifest) until one
    passes, and that one is kept whatever the policy says. Names in ``trusted`` (just
    committed and checked by the caller) count as verified without reading them again,
    unless on a local disk they link files of earlier checkpoints (incremental saves):
    those bytes were written long before and may have rotted since, and every later
    checkpoint would share the damage, so they are read. Names in ``verified`` (every
    byte just read by the caller, linked files too) count as verified as they are.
    With a ``manifest_key`` only validly signed checkpoints count (and are deleted): a
    forged "newer" checkpoint must not push real ones out. ``infos`` limits retention to
    those checkpoints (the backup tier passes its own run's; default: all listed);
    ``lineage`` (run ids) to the checkpoints of those runs and those that record none.
    ``damaged`` (a set) gets the names of those found damaged on the way.
    """
    infos, doomed = _let_go(backend, policy, infos, lineage, manifest_key)
    if not doomed:
        return []
    linked = {i.name for i in infos if i.manifest.linked and backend.capabilities.local}
    good = newest_verified(
        backend,
        infos,
        trusted=(set(trusted) - linked) | set(verified),
        manifest_key=manifest_key,
        damaged=damaged,
    )
    if good is None:
        log.warning(
            "retention: no checkpoint under %s verifies; deleting nothing (run `ckptstore "
            "verify %s` to see what is damaged)",
            backend.url,
            backend.url,
        )
        return []
    spared = set(spare) | set(read_lines(backend, LATEST_FILE)[:1]) | {good}
    deleted = []
    for info in doomed:
        if info.name not in spared:
            backend.delete(info.name)
            crash_point("retention.after_delete")
            deleted.append(info.name)
            log.info("retention: deleted %s/%s", backend.url, info.name)
    return deleted


def of_lineage(
    infos: Sequence[CheckpointInfo], lineage: Sequence[str], *, unrecorded: bool
) -> list[CheckpointInfo]:
    """The checkpoints written by a run in ``lineage`` (a run and the runs it branched
    from), and with ``unrecorded`` those that record no run (older ckptstore). Another
    run's checkpoints are never what retention deletes or what protects this run."""
    runs = set(lineage)
    return [
        i for i in infos if i.manifest.run_id in runs or (unrecorded and i.manifest.run_id is None)
    ]


def newest_verified(
    backend: StorageBackend,
    infos: Sequence[CheckpointInfo],
    *,
    trusted: set[str],
    manifest_key: bytes | None,
    damaged: set[str] | None = None,
) -> str | None:
    """The newest of ``infos`` (oldest first) that verifies, or None; names in
    ``trusted`` are taken as verified until a newer one is found damaged (it may link
    the damaged file from an older one: incremental saves). Damaged ones passed over
    are named in a warning, and added to ``damaged``."""
    from ckptstore.engine.ops import verify  # torch: imported here, not when listing

    for info in reversed(infos):
        if info.name in trusted:
            return info.name
        problems = verify(backend, info.name, None, manifest_key=manifest_key)
        if not problems:
            return info.name
        log.warning(
            "retention: %s/%s is damaged (%s); it does not count as the checkpoint that "
            "protects the run",
            backend.url,
            info.name,
            problems[0],
        )
        if damaged is not None:
            damaged.add(info.name)
        trusted = set()
    return None
