"""Committing a checkpoint written to node-local disks: every disk's part, rank 0's last.

When the ranks' roots lie on different disks (each node its own ``--ckpt-dir``; told
apart by :meth:`~ckptstore.storage.base.StorageBackend.disk_id`), a save writes one
*part* per disk: that disk's ranks' shards, with its own ``.metadata`` and manifest
(``Manifest.part``). DCP's planning, writing and the coordinator's ``finish`` run as for
one disk (``ckptstore.dcp.writer``); once DCP returns, :func:`commit_parts`:

1. rank 0 sends each disk's committing rank (its lowest), point to point and no other
   rank, that disk's manifest and ``.metadata``, and the names of the checkpoints
   committed in its own root. The parts' ``.metadata`` share one body (pickled once,
   ``MetadataCache.dumps_part``), which goes down a binomial tree of the committers
   that lack it (rank 0 sends it log2(D) times, not D - 1); each part's own head (its
   copies of replicated items) and tail go in its message. While the layout holds, a
   committer that holds its part's body and head (both sides learn it from step 3's
   outcome) is sent the tail alone (the checkpoint's name);
2. each of those ranks removes the parts on its disk that rank 0's root no longer has
   (retention there, or a save that died before rank 0 committed it), then commits its
   part (fsync, rename, fsync: as any local checkpoint);
3. the ranks learn whether every part committed; only then rank 0 commits its own part,
   the commit point of the whole checkpoint, and tells every rank how that went.

A checkpoint whose part is missing on a disk (a node died between 2 and 3, or after)
is not complete: restore picks the newest step committed on every disk, and removes
the parts rank 0 lacks (:func:`complete_steps`). A failure anywhere fails the save on
every rank, and the parts already committed are removed again. Per save, on the
checkpointer's own group: one send from rank 0 to each committer (and, on the first
save of a layout, the tree's sends), and two small collectives; none on a shared file
system.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch.distributed as dist

from ckptstore.dcp.spec import PartFiles
from ckptstore.dcp.writer import CkptStorageWriter
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
    handout: dict[int, Any] | None = None
    error: str | None = None
    failure: BaseException | None = None
    tree: list[int] | None = None
    if rank == 0:
        keep: list[str] | None = None
        try:
            keep = [n for n in backend.list_names() if STEP_NAME.match(n)]
        except Exception as exc:  # every committer still hears from rank 0 (None)
            failure, error = exc, f"{type(exc).__name__}: {exc}"
        handout, tree = _handout(writer, handed, keep)
    # Each committer is sent its own disk's files alone, the shared body through a tree
    # (a scatter would send every rank the largest .metadata: world size x its bytes).
    commits = writer.part is not None and writer.part_name is not None
    mine = groups.hand_out(handout, group, receives=commits)
    body: bytes | None = None
    if mine is None and commits:
        error = "rank 0 sent this disk no part to commit (see rank 0's error)"
    elif mine is not None and writer.part is not None:
        files, keep, coordinator, tree = mine
        try:
            sent = groups.tree_broadcast(None, tree, group) if tree is not None else None
            body = _body(files, cache, sent)  # and this part's head
            data = _checked(body + files.tail, files.manifest)
            prune(backend, set(keep), coordinator)
            writer.part.write_file(METADATA_FILE, data)
            writer.part.commit(files.manifest)
        except Exception as exc:
            failure, error = exc, f"{type(exc).__name__}: {exc}"
    if rank == 0 and tree is not None:
        groups.tree_broadcast(writer.parts[writer.coordinator_disk].body, tree, group)
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


def _handout(
    writer: CkptStorageWriter, handed: dict[int, str], keep: list[str] | None
) -> tuple[dict[int, Any], list[int] | None]:
    """What rank 0 sends each committer (None for all when ``keep`` is: rank 0 failed),
    and the ranks the parts' shared ``.metadata`` body goes to through a tree (rank 0
    first): the committers that do not hold their part's body and head. Each part's
    head and tail go in its own message; a committer that holds them gets the tail."""
    parts = {r: writer.parts[d] for r, d in writer.committers.items()}
    tree: list[int] | None = None
    lacking = sorted(r for r, files in parts.items() if handed.get(r) != files.ident)
    if keep is not None and lacking and parts[lacking[0]].shared is not None:
        tree = [0, *lacking]  # every part's body is the one shared (dumps_part)
    handout: dict[int, Any] = {}
    for r, files in parts.items():
        in_tree = tree is not None and r in tree
        if files.ident is not None and handed.get(r) == files.ident:
            files = dataclasses.replace(files, body=b"", head=b"")  # it holds them
        elif in_tree:
            files = dataclasses.replace(files, body=b"")  # the tree brings the body
        mine = tree if in_tree else None
        handout[r] = None if keep is None else (files, keep, writer.coordinator_disk, mine)
    return handout, tree


def _body(files: PartFiles, cache: Any, sent: bytes | None) -> bytes:
    """The part's ``.metadata`` but its tail: the body as sent (through the tree, or
    with the part's files) and its head, or what this rank holds from the last save
    (rank 0 sends neither when the committer holds them)."""
    if sent is not None or files.body or files.ident is None:
        body = files.body if sent is None else sent
        return body + files.head if files.head else body
    held = cache.held if cache is not None else None
    if held is None or held[0] != files.ident:
        raise CkptStoreError(
            "this rank does not hold the .metadata rank 0 expects it to (caches out of "
            "step); this save fails, and the next one sends it whole"
        )
    return held[1]  # type: ignore[no-any-return]  # as held: no copy


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
