"""Backups of checkpoints written to node-local disks (``Manifest.part``): each disk's
committing rank uploads its part (:func:`upload_part`), and rank 0 commits the whole
checkpoint on the backup once every disk's files are in (:func:`commit_parts_backup`).

Copies go as :func:`ckptstore.transfer.copy_checkpoint`'s do: every byte checked against
the manifest, every upload read back, linked files (incremental saves) that a checkpoint
there holds copied inside the store instead of sent.

A node that will not upload its part (its local copy is damaged, or it gave up after
five failed uploads at the end of its run) says so in the backup: a small
``<shard file>.refused`` next to each file it will not send (:func:`refuse_part`),
naming the file's size and index checksum (a marker about other bytes, another save of
that step, is not about this one) and why. Rank 0, waiting for those files, gives up on
that checkpoint at once (:class:`PartRefusedError`) instead of after ``wait_s`` (600 s;
at ``close()``, once for each of its five attempts). The node removes its markers
whenever it starts an upload of that step again. A marker left lies in a prefix not
committed (``ckptstore ls --all`` lists it as uncommitted), which ``ckptstore gc``
removes an hour after its last write, unless a later save of that step commits there:
then it stays inside, unlisted, and nothing reads it.

What a dead attempt left under a file's name (not whole: another save of the step, or
cut short) is removed before the file is written again (files are written once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ckptstore.engine.listing import read_manifest
from ckptstore.errors import (
    CheckpointExistsError,
    CkptStoreError,
    CopyStoppedError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    PartRefusedError,
    PartsMissingError,
    StorageError,
)
from ckptstore.format.manifest import Manifest
from ckptstore.linking import without_held
from ckptstore.progress import Progress
from ckptstore.storage import StorageBackend
from ckptstore.transfer import CopyJob

log = logging.getLogger("ckptstore")

REFUSED_SUFFIX = ".refused"


def upload_part(
    src: StorageBackend,
    dst: StorageBackend,
    name: str,
    *,
    threads: int = 4,
    stop: threading.Event | None = None,
    manifest_key: bytes | None = None,
) -> list[str]:
    """Upload this disk's shard files of ``name``, one part of a checkpoint written to
    node-local disks (``Manifest.part``), into ``dst``'s ``name``; return those uploaded.

    Run by each disk's committing rank, other than rank 0's: :func:`commit_parts_backup`
    on rank 0 commits the whole checkpoint there once every disk's files are in. A file
    already there whole (its size and index checksum as listed) is not sent again, nor
    is a linked file (incremental saves) that another checkpoint there holds: it is
    copied inside the store. Each file is read back after the upload, as in
    :func:`copy_checkpoint`. A part whose local copy is damaged is not sent
    (:class:`CorruptCheckpointError`), as :func:`commit_parts_backup` does not send rank
    0's: the backup would list a checkpoint that does not load.
    """
    manifest = _part_manifest(src, name, manifest_key)
    # Markers this node left (a refusal of an earlier attempt, or of another save of
    # that step): gone before anything else, or rank 0 would give this upload up
    shards = [f for f, e in manifest.files.items() if e.kind == "shard"]
    with contextlib.suppress(CheckpointExistsError):  # (committed meanwhile: harmless)
        _discard_leftovers(dst, name, [f"{f}{REFUSED_SUFFIX}" for f in shards])
    todo = [
        (f, e)
        for f, e in manifest.files.items()
        if e.kind == "shard" and not _there(dst, name, f, e)
    ]
    if todo:
        problems = verify_checkpoint_files(src, name, manifest_key)
        if problems:
            raise CorruptCheckpointError(f"not copied: {'; '.join(problems[:3])}")
        _discard_leftovers(dst, name, [f for f, _ in todo])
        pending = dst.attach(f"{name}#{uuid.uuid4().hex[:12]}")
        job = CopyJob(src, dst, pending, name, name, True, 2, None, stop)
        try:
            todo = without_held(dst, pending, manifest, (name,), manifest_key, todo, stop=stop)
            job.copy_all(todo, threads)
        except BaseException:
            pending.abort()
            raise
    return [f for f, _ in todo]


def refuse_part(
    src: StorageBackend,
    dst: StorageBackend,
    name: str,
    why: str,
    *,
    manifest_key: bytes | None = None,
) -> list[str]:
    """Mark in ``dst`` this disk's shard files of ``name`` as not coming (its local copy
    is damaged: ``why``), so that rank 0 stops waiting for them; return the markers
    written. Best effort: a manifest too damaged to name the files marks nothing."""
    try:
        manifest = _part_manifest(src, name, manifest_key)
    except (CkptStoreError, FileNotFoundError):
        return []
    shards = sorted((f, e) for f, e in manifest.files.items() if e.kind == "shard")
    _discard_leftovers(dst, name, [f"{f}{REFUSED_SUFFIX}" for f, _ in shards])  # (stale)
    pending = dst.attach(f"{name}#{uuid.uuid4().hex[:12]}")
    written = []
    for fname, entry in shards:
        body = {"size_bytes": entry.size_bytes, "xxh3_64": entry.xxh3_64, "why": why[:2000]}
        try:
            pending.write_file(f"{fname}{REFUSED_SUFFIX}", json.dumps(body).encode())
            written.append(f"{fname}{REFUSED_SUFFIX}")
        except StorageError as exc:
            if exc.errno != errno.EEXIST:  # (EEXIST: marked by an earlier attempt)
                raise
    return written


def _refused(dst: StorageBackend, name: str, files: dict[str, Any]) -> list[tuple[str, str]]:
    """Those of ``files`` (name -> entry, still missing) another node marked as not
    coming, each with the reason it gave."""
    refused = []
    for fname, entry in files.items():
        try:
            body = json.loads(dst.read_bytes(f"{name}/{fname}{REFUSED_SUFFIX}"))
        except FileNotFoundError:
            continue
        except (CkptStoreError, ValueError) as exc:  # unreadable: wait on, as without it
            log.debug("backup: %s/%s%s unreadable: %s", name, fname, REFUSED_SUFFIX, exc)
            continue
        if (
            isinstance(body, dict)
            and body.get("size_bytes") == entry.size_bytes
            and body.get("xxh3_64") == entry.xxh3_64
        ):
            refused.append((fname, str(body.get("why", "")) or "no reason given"))
    return refused


def commit_parts_backup(
    src: StorageBackend,
    dst: StorageBackend,
    name: str,
    *,
    threads: int = 4,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    manifest_key: bytes | None = None,
    wait_s: float = 600.0,
    given_up: Callable[[], bool] = lambda: False,
) -> Manifest:
    """On rank 0: upload rank 0's part of ``name`` (node-local disks), wait until the
    other disks' shard files are in ``dst`` (:func:`upload_part`, checked by size and
    index checksum), then commit the whole checkpoint there: ``.metadata`` is rank 0's
    (it names every shard), the manifest lists every disk's files and no ``part``.

    Gives up with :class:`PartsMissingError` after ``wait_s`` seconds, at once when
    ``given_up()`` (a newer checkpoint is waiting), and with :class:`PartRefusedError`
    as soon as another node marked its files as not coming (:func:`refuse_part`).
    """
    manifest = _part_manifest(src, name, manifest_key)
    assert manifest.part is not None
    problems = verify_checkpoint_files(src, name, manifest_key)
    if problems:
        raise CorruptCheckpointError(f"not copied: {'; '.join(problems[:3])}")
    # Rank 0's own files a dead attempt left: whole ones are kept, others written again
    files = [(f, e) for f, e in manifest.files.items() if not _there(dst, name, f, e)]
    _discard_leftovers(dst, name, [f for f, _ in files])
    pending = dst.begin(name)
    try:
        files = sorted(files, key=lambda kv: -kv[1].size_bytes)
        files = without_held(dst, pending, manifest, (name,), manifest_key, files, stop=stop)
        if progress is not None:
            payload = sum(e.size_bytes for _, e in files)
            progress.restart(2 * payload, payload)
        job = CopyJob(src, dst, pending, name, name, True, 2, progress, stop)
        started = time.monotonic()
        job.copy_all(files, threads)
        if progress is not None:  # (not the wait below: an upload speed is taken from it)
            progress.moving_s = time.monotonic() - started
        deadline = time.monotonic() + wait_s
        missing = dict(manifest.part.elsewhere)
        while True:
            missing = {f: e for f, e in missing.items() if not _there(dst, name, f, e)}
            if not missing:
                break
            _raise_if_refused(dst, name, missing)
            if (stop is not None and stop.is_set()) or given_up():
                raise CopyStoppedError(f"backup of {name} stopped while waiting for other nodes")
            if time.monotonic() > deadline:
                raise PartsMissingError(
                    f"backup of {name}: after {wait_s:.0f} s, {dst.url} still lacks the other "
                    f"nodes' shard files {sorted(missing)[:4]}; is their backup failing?"
                )
            time.sleep(1.0)
        all_files = {**manifest.files, **manifest.part.elsewhere}
        other_raw = manifest.part.elsewhere_raw_bytes  # (None: a part from before 12-07)
        whole = dataclasses.replace(
            manifest,
            files=all_files,
            raw_bytes=manifest.raw_bytes + (other_raw or 0),
            stored_bytes=sum(e.size_bytes for e in all_files.values()),
            part=None,
        )
        pending.commit(whole.to_json(manifest_key))
    except BaseException:
        pending.abort()
        raise
    finally:
        if progress is not None:
            progress.finish()
    return whole


def _discard_leftovers(dst: StorageBackend, name: str, files: list[str]) -> None:
    """Remove what a dead attempt left under ``files``' names (not whole: another save
    of that step, or cut short) before they are written again: files are written once,
    and the upload failed on them at every attempt (EEXIST), never ending."""
    removed = dst.discard_uncommitted(name, files)
    if removed:
        log.info("backup: removed a dead attempt's %s of %s first", ", ".join(removed), name)


def _raise_if_refused(dst: StorageBackend, name: str, files: dict[str, Any]) -> None:
    refused = _refused(dst, name, files)
    if refused:
        raise PartRefusedError(
            f"another node did not upload its part of {name} "
            f"({', '.join(f for f, _ in refused[:4])}): {refused[0][1]}; so the backup will "
            f"not hold {name}"
        )


def _part_manifest(src: StorageBackend, name: str, key: bytes | None) -> Manifest:
    manifest = read_manifest(src, name, manifest_key=key)
    if manifest.part is None:
        raise IncompatibleCheckpointError(f"{src.url}/{name} is not a node-local part")
    return manifest


def verify_checkpoint_files(src: StorageBackend, name: str, key: bytes | None) -> list[str]:
    from ckptstore.engine.ops import verify as verify_checkpoint

    return verify_checkpoint(src, name, None, manifest_key=key)


def _there(dst: StorageBackend, name: str, fname: str, entry: Any) -> bool:
    """Whether ``dst`` holds ``name/fname`` as ``entry`` lists it (a shard: its size and
    index checksum)."""
    from ckptstore.format.shard import ShardReader

    try:
        with dst.open_reader(f"{name}/{fname}") as reader:
            if reader.size != entry.size_bytes:
                return False
            where = f"{dst.url}/{name}/{fname}"
            ShardReader(reader, where, size_bytes=entry.size_bytes, index_xxh3=entry.xxh3_64)
            return True
    except (FileNotFoundError, CkptStoreError):
        return False
