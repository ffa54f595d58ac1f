"""Committing a checkpoint written to node-local disks: every disk's part, rank 0's last.

When the ranks' roots lie on different disks (each node its own ``--ckpt-dir``; told
apart by :meth:`~ckptstore.storage.base.StorageBackend.disk_id`), a save writes one
*part* per disk: that disk's ranks' shards, with its own ``.metadata`` and manifest
(``Manifest.part``). DCP's planning, writing and the coordinator's ``finish`` run as for
one disk (``ckptstore.dcp.writer``); once DCP returns, :func:`commit_parts`:

1. rank 0 hands each disk's committing rank (its lowest) that disk's ``.metadata`` and
   manifest, and the names of the checkpoints committed in its own root; while the
   layout holds, the ``.metadata`` differs from the last save's only in its tail
   (``MetadataCache.dumps_split``), and a committer that holds the last one's body is
   sent the tail alone (what it holds, both sides learn from step 3's outcome);
2. each of those ranks removes the parts on its disk that rank 0's root no longer has
   (retention there, or a save that died before rank 0 committed it), then commits its
   part (fsync, rename, fsync: as any local checkpoint);
3. the ranks learn whether every part committed; only then rank 0 commits its own part,
   the commit point of the whole checkpoint, and tells every rank how that went.

A checkpoint whose part is missing on a disk (a node died between 2 and 3, or after)
is not complete: restore picks the newest step committed on every disk, and removes
the parts rank 0 lacks (:func:`complete_steps`). A failure anywhere fails the save on every rank, and the
parts already committed are removed again. Three small collectives per save, on the
checkpointer's own group; none on a shared file system.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch.distributed as dist

from ckptstore.dcp.writer import CkptStorageWriter, PartFiles
from ckptstore.engine import groups
from ckptstore.engine.listing import read_manifest
from ckptstore.errors import CkptStoreError
from ckptstore.format.checksum import digest
from ckptstore.format.manifest import Manifest
from ckptstore.layout import METADATA_FILE, STEP_NAME, checkpoint_name
from ckptstore.storage.base import StorageBackend

log = logging.getLogger("ckptstore")


def commit_parts(
    writer: CkptStorageWriter, backend: StorageBackend, name: str, group: dist.ProcessGroup
) -> None:
    """Commit the parts of a node-local save on every disk, rank 0's last (module doc)."""
    rank = groups.rank(group)
    cache = writer.cache  # what each committer holds of its part's .metadata
    handed: dict[int, str] = cache.handed if cache is not None else {}
    handout: list[Any] | None = None
    if rank == 0:
        keep = [n for n in backend.list_names() if STEP_NAME.match(n)]
        handout = [None] * groups.world_size(group)
        for r, disk in writer.committers.items():
            files = writer.parts[disk]
            if files.ident is not None and handed.get(r) == files.ident:
                files = dataclasses.replace(files, body=b"")  # it holds that body
            handout[r] = (files, keep, writer.coordinator_disk)
    mine = groups.scatter(handout, group)
    error: str | None = None
    failure: BaseException | None = None
    body: bytes | None = None
    if mine is not None and writer.part is not None:
        files, keep, coordinator = mine
        try:
            body = _body(files, cache)
            data = _checked(body + files.tail, files.manifest)
            prune(backend, set(keep), coordinator)
            writer.part.write_file(METADATA_FILE, data)
            writer.part.commit(files.manifest)
        except Exception as exc:
            failure, error = exc, f"{type(exc).__name__}: {exc}"
    errors = groups.all_gather(error, group)
    if rank == 0 and not any(errors):
        try:
            writer.commit_coordinator_part()
        except Exception as exc:
            failure, error = exc, f"{type(exc).__name__}: {exc}"
            errors[0] = error
    outcome = groups.broadcast(errors, group)
    assert isinstance(outcome, list)
    failed = [(r, e) for r, e in enumerate(outcome) if e]
    if cache is not None:  # what each committer holds now: known alike on both sides
        if failed:
            cache.handed, cache.held = {}, None
        elif rank == 0:
            idents = {r: writer.parts[d].ident for r, d in writer.committers.items()}
            cache.handed = {r: i for r, i in idents.items() if i is not None}
        elif mine is not None and body is not None:
            cache.held = (mine[0].ident, body) if mine[0].ident is not None else None
    if not failed:
        writer.release_part()
        return
    if mine is not None and error is None:  # this disk's part committed: not any more
        with contextlib.suppress(Exception):
            backend.delete(name)
    writer.abort()
    if failure is not None:
        raise failure
    r, e = failed[0]
    raise CkptStoreError(f"rank {r} could not commit its disk's part of {name}: {e}")


def _body(files: PartFiles, cache: Any) -> bytes:
    """The part's ``.metadata`` body: as sent, or the one this rank holds from the
    last save (rank 0 sends none when the committer holds it)."""
    if files.body or files.ident is None:
        return files.body
    held = cache.held if cache is not None else None
    if held is None or held[0] != files.ident:
        raise CkptStoreError(
            "this rank does not hold the .metadata rank 0 expects it to (caches out of "
            "step); this save fails, and the next one sends it whole"
        )
    body: bytes = held[1]  # as held: no copy
    return body


def _checked(data: bytes, manifest: bytes) -> bytes:
    """``data``, if it is the ``.metadata`` ``manifest`` lists (a part put together
    from a held body and a sent tail is checked before it is written)."""
    entry = Manifest.from_json(manifest, "this disk's part").files.get(METADATA_FILE)
    if entry is None or digest(data) != entry.xxh3_64:
        raise CkptStoreError(
            "the .metadata put together for this disk's part does not match its manifest "
            "(caches out of step); this save fails, and the next one sends it whole"
        )
    return data


def prune(backend: StorageBackend, keep: set[str], coordinator: str) -> list[str]:
    """Delete the parts on this disk of checkpoints rank 0's root (on ``coordinator``)
    no longer holds; parts of other jobs' checkpoints, and whole checkpoints, stay."""
    removed = []
    for name in backend.list_names():
        if not STEP_NAME.match(name) or name in keep:
            continue
        try:
            manifest = read_manifest(backend, name)
        except (CkptStoreError, OSError):
            continue  # not a committed part of ours: not ours to delete
        if manifest.part is not None and manifest.part.coordinator == coordinator:
            backend.delete(name)
            removed.append(name)
    if removed:
        log.info("removed parts no longer kept on rank 0's disk: %s", ", ".join(removed))
    return removed


def complete_steps(
    backend: StorageBackend,
    steps: list[int],
    disks: list[str],
    group: dist.ProcessGroup | None,
) -> tuple[set[int], set[int]]:
    """Of ``steps`` (this rank's committed ones), those committed on every rank's disk;
    and rank 0's.

    Collective, at restore. Each disk's lowest rank also removes the parts on its disk
    that rank 0's root does not hold (a save that died before rank 0 committed it), so
    that the run can save those steps again. One disk (a shared file system): ``steps``
    as they are, and nothing else is done."""
    if len(set(disks)) < 2:
        return set(steps), set(steps)
    everyone = groups.all_gather(sorted(steps), group)
    rank = groups.rank(group)
    if disks[rank] != disks[0] and disks.index(disks[rank]) == rank:
        prune(backend, {checkpoint_name(s) for s in everyone[0]}, disks[0])
    common = set(everyone[0])
    for other in everyone[1:]:
        common &= set(other)
    return common, set(everyone[0])
