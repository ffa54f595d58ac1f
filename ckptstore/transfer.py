"""Copying committed checkpoints between two roots (local disk, object storage), verified.

:func:`copy_checkpoint` copies one committed checkpoint between two roots the way a save
writes one: every file through the destination's pending checkpoint (multipart on S3),
the manifest last, so the copy becomes visible only when complete. Every byte read from
the source is hashed and checked against the source's manifest, so a damaged checkpoint
is never propagated; on an object store every uploaded file is then read back and
checked again, since the server's word that it stored the bytes is not enough, unless
the store checks each part's checksum itself and reports it back (S3:
:meth:`~ckptstore.storage.s3.S3Backend.checks_uploads`).

:func:`replace_checkpoint` copies one over a different checkpoint of the same name (another
run's, or a retired branch's) so that the destination holds a complete checkpoint under
that name or beside it at every moment. :func:`fetch` brings one back (restore from a
backup). The background replicator that
runs these copies for ``CheckpointManager(backup=...)`` is
:mod:`ckptstore.manager.replicate`; the command line's ``sync``/``pull`` call
:func:`copy_checkpoint` directly; node-local checkpoints' backups are
:mod:`ckptstore.transfer_parts`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import xxhash

from ckptstore.engine.listing import read_manifest
from ckptstore.errors import (
    CheckpointExistsError,
    CopyStoppedError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    StorageError,
    without_verify_hint,
)
from ckptstore.format.manifest import Manifest
from ckptstore.layout import MANIFEST_FILE, REPLACING_SUFFIX
from ckptstore.linking import damaged_holders, note_checked, without_held
from ckptstore.progress import Progress
from ckptstore.storage import StorageBackend
from ckptstore.units import format_bytes

log = logging.getLogger("ckptstore")

PIECE_BYTES = 8 << 20  # read and hashed in pieces of this size


def copy_checkpoint(
    src: StorageBackend,
    dst: StorageBackend,
    name: str,
    *,
    threads: int = 4,
    replace: bool = False,
    progress: Progress | None = None,
    verify_upload: bool | None = None,
    file_retries: int = 2,
    stop: threading.Event | None = None,
    manifest_key: bytes | None = None,
    dst_name: str | None = None,
    link_from: str | None = None,
    damaged: set[str] | None = None,
) -> Manifest:
    """Copy committed checkpoint ``name`` from ``src`` to ``dst`` (as ``dst_name`` there,
    default ``name``); return its manifest. ``link_from``: a checkpoint in ``dst`` that
    is a verified copy of the same one, whose files are linked (on an object store,
    copied inside it) instead of sent again.

    Raises :class:`CorruptCheckpointError` if the source does not match its manifest
    (nothing is written to ``dst`` then), :class:`CheckpointExistsError` if ``dst``
    already has ``name`` (unless ``replace``: the copy there, presumably damaged, is
    deleted before the copy, since a local root cannot commit over it; a local source
    is checked before that), :class:`StorageError`
    for I/O trouble. ``verify_upload``
    (default: when ``dst`` is not a local disk) reads every file back from ``dst``.
    A file that fails on an object store is retried ``file_retries`` times, with backoff.
    With a ``manifest_key``, a source whose
    manifest is not signed with it is refused before anything is copied; the manifest
    is copied byte for byte, signature included. ``damaged``: each
    ``"<checkpoint>/<file>"`` in ``dst`` that the copy found damaged there (a linked
    file's copies, which it then did not use) is added to it.
    """
    manifest_bytes = src.read_bytes(f"{name}/{MANIFEST_FILE}")
    manifest = Manifest.from_json(manifest_bytes, f"{src.url}/{name}", key=manifest_key)
    if manifest.step is not None and name != f"step_{manifest.step:08d}":
        raise CorruptCheckpointError(f"{src.url}/{name}: the manifest says step {manifest.step}")
    if manifest.part is not None:
        raise IncompatibleCheckpointError(
            f"{src.url}/{name} is one node's part of a checkpoint written to node-local "
            f"disks ({len(manifest.part.elsewhere)} shard files are on other nodes); copying "
            "a part alone would look like a whole checkpoint, so it is refused"
        )
    target = name if dst_name is None else dst_name
    exists = dst.exists(f"{target}/{MANIFEST_FILE}")
    if exists and not replace:
        raise CheckpointExistsError(f"{dst.url}/{target} already exists")
    if verify_upload is None:
        verify_upload = not dst.capabilities.local
    # Imported here: verifying reads DCP's metadata (torch); listing and --help need neither.
    from ckptstore.engine.ops import verify as verify_checkpoint

    if src.capabilities.local:
        # A shard's manifest checksum covers its index, which covers its chunks: check
        # them all (a local read) so that a damaged checkpoint is never propagated, and
        # before the copy it would replace is deleted
        problems = verify_checkpoint(src, name, None, manifest_key=manifest_key)
        if problems:
            raise CorruptCheckpointError(f"not copied: {'; '.join(problems[:3])}")
    if exists:
        # Local disk commits by rename and refuses an existing name: make room first.
        log.warning("replacing %s/%s with the copy from %s", dst.url, target, src.url)
        dst.delete(target)
    retries = (
        file_retries if not dst.capabilities.local else 0
    )  # a local temp file cannot be redone
    every = sorted(manifest.files.items(), key=lambda kv: -kv[1].size_bytes)
    skip = (target, name)  # not linked from: the one a copy beside replaces is presumably damaged
    # Object stores: each linked file is checked there before it is copied inside the
    # store. Local disk: linked unchecked, since the copy is read in full after its
    # commit; where that finds a linked file damaged, again, linking only what is
    # checked intact there (a holder that is not the damaged file), then nothing.
    rounds = [(True, True)] if not dst.capabilities.local else [(True, False), (True, True), (False, False)]  # fmt: skip
    bad = damaged if damaged is not None else set()
    base = (progress.payload, progress.moving_s) if progress is not None else (0, None)
    try:
        for link, check in rounds:
            pending = dst.begin(target)
            try:
                files = without_held(
                    dst, pending, manifest, skip, manifest_key, every, link, link_from,
                    check=check, stop=stop, damaged=bad,
                )  # fmt: skip
                if progress is not None:  # incremental: only what dst lacks
                    payload = sum(e.size_bytes for _, e in files)
                    progress.payload, progress.moving_s = base  # (again: this round's)
                    progress.restart(payload * (2 if verify_upload else 1), payload)
                job = CopyJob(src, dst, pending, name, target, verify_upload, retries, progress, stop)  # fmt: skip
                started = time.monotonic()
                job.copy_all(files, threads)
                if progress is not None:  # (a speed is taken from it: not the checks)
                    progress.moving_s = (progress.moving_s or 0.0) + time.monotonic() - started
                pending.commit(manifest_bytes)
            except BaseException:
                pending.abort()
                raise
            if not dst.capabilities.local:
                break
            # Downloaded: check every chunk of the copy now (a local read), not at load.
            problems = verify_checkpoint(dst, target, None, manifest_key=manifest_key)
            if not problems:
                break
            dst.delete(target)
            if len(files) == len(every) and src.capabilities.local:
                # Read through before copying (above), and intact: the copy went bad here
                raise CorruptCheckpointError(
                    f"its copy at {dst.url} failed its check ({without_verify_hint(problems[0])}) "
                    f"although {src.url}/{name} read intact just before: suspect the "
                    "destination's disk (or this machine's memory); nothing of the copy was kept"
                )
            if len(files) == len(every):
                # Every byte came from the source: name its file (the copy is gone)
                here, there = f"{dst.url}/{target}/", f"{src.url}/{name}/"
                problem = without_verify_hint(problems[0]).replace(here, there)
                raise CorruptCheckpointError(
                    f"{problem} (found in its copy at {dst.url}, which was not kept): the "
                    f"source is likely damaged; run `ckptstore verify {src.url}` to see what else is"
                )
            if not check:  # which checkpoints there hold the damaged file
                damaged_holders(dst, manifest, skip, manifest_key, bad)
            log.warning(
                "%s/%s: a file linked from another checkpoint there is damaged (%s): copied "
                "again, %s",
                dst.url, target, without_verify_hint(problems[0]),
                "from the source" if check else "linking only files checked intact there",
            )  # fmt: skip
    finally:
        if progress is not None:
            progress.finish()
    beside = f"{name}{REPLACING_SUFFIX}"
    if dst_name is None and dst.exists(f"{beside}/{MANIFEST_FILE}"):
        # A replace that failed once the old one was gone left its new copy beside it
        # (replace_checkpoint); this copy under the name supersedes it
        dst.delete(beside)
    return manifest


def moved(manifest: Manifest, progress: Progress) -> str:
    """What a copy moved, said for a person: its bytes, or of a chain's checkpoint
    (incremental) the part copied, the rest linked from a checkpoint the destination held."""
    whole = format_bytes(manifest.stored_bytes)
    if progress.payload >= manifest.stored_bytes:
        return whole
    linked = format_bytes(manifest.stored_bytes - progress.payload)
    return f"{format_bytes(progress.payload)} copied, {linked} linked"


@dataclass
class CopyJob:
    """What every file of one checkpoint copy shares."""

    src: StorageBackend
    dst: StorageBackend
    pending: Any
    name: str  # in src
    dst_name: str
    verify_upload: bool
    retries: int
    progress: Progress | None
    stop: threading.Event | None

    def copy_all(self, files: list[tuple[str, Any]], threads: int) -> None:
        """Copy ``files`` (name, manifest entry), ``threads`` at a time; the first error
        (or a stop) stops the rest."""
        pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="ckptstore-copy")
        try:
            futures = [pool.submit(self.copy_with_retries, fname, e) for fname, e in files]
            while True:
                done, not_done = wait(futures, timeout=0.5, return_when=FIRST_EXCEPTION)
                if self.progress is not None:
                    self.progress.show()
                if any(f.exception() is not None for f in done) or not not_done:
                    break
                if self.stop is not None and self.stop.is_set():
                    raise CopyStoppedError(f"copy of {self.src.url}/{self.name} stopped")
            for f in futures:
                error = f.exception() if f.done() else None
                if error is not None:
                    for g in futures:
                        g.cancel()
                    raise error
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def copy_with_retries(self, fname: str, entry: Any) -> None:
        for attempt in range(self.retries + 1):
            counted = [0]
            try:
                self.copy(fname, entry.kind, entry.size_bytes, entry.xxh3_64, counted)
                return
            except CorruptCheckpointError:
                raise  # the source is damaged: trying again does not help
            except StorageError as exc:
                if self.progress is not None:
                    self.progress.add(-counted[0])
                if attempt == self.retries or (self.stop is not None and self.stop.is_set()):
                    raise
                delay = min(30.0, 0.5 * 2**attempt)
                log.warning(
                    "copying %s/%s to %s failed (%s); retrying in %.1f s",
                    self.name,
                    fname,
                    self.dst.url,
                    exc,
                    delay,
                )
                time.sleep(delay)

    def copy(self, fname: str, kind: str, size: int, xxh3: str, counted: list[int]) -> None:
        src, dst, name, progress, stop = self.src, self.dst, self.name, self.progress, self.stop
        where = f"{src.url}/{name}/{fname}"
        h = xxhash.xxh3_64()
        with src.open_reader(f"{name}/{fname}") as reader:
            if reader.size != size:
                raise CorruptCheckpointError(
                    f"{where}: {reader.size} B, the manifest says {size} B"
                )
            sink = self.pending.create_file(fname, size_hint=size)
            try:
                for piece in _pieces(reader, size):
                    if stop is not None and stop.is_set():
                        raise CopyStoppedError(f"copy of {where} stopped")
                    h.update(piece)
                    sink.write(piece)
                    _count(progress, counted, len(piece))
                sent = h.hexdigest()
                if kind == "file" and sent != xxh3:
                    raise CorruptCheckpointError(
                        f"{where}: checksum {sent}, the manifest says {xxh3}; not copied"
                    )
                sink.close()
            except BaseException:
                sink.abort()
                raise
        if not self.verify_upload:
            return
        if getattr(sink, "confirmed", False) and dst.checks_uploads():
            # The store checked every part against its CRC32 and reported the same one
            # back: what it stored is what was read and hashed here.
            _count(progress, counted, size)
            note_checked(dst, f"{self.dst_name}/{fname}")
            return
        back = f"{dst.url}/{self.dst_name}/{fname}"
        h = xxhash.xxh3_64()
        try:
            with dst.open_reader(f"{self.dst_name}/{fname}") as reader:
                if reader.size != size:
                    raise StorageError(f"{back}: {reader.size} B after upload, expected {size} B")
                for piece in _pieces(reader, size):
                    h.update(piece)
                    _count(progress, counted, len(piece))
        except FileNotFoundError:
            raise StorageError(f"{back}: missing after upload") from None
        if h.hexdigest() != sent:
            raise StorageError(f"{back}: read back with checksum {h.hexdigest()}, sent {sent}")
        note_checked(dst, f"{self.dst_name}/{fname}")


def _count(progress: Progress | None, counted: list[int], n: int) -> None:
    counted[0] += n
    if progress is not None:
        progress.add(n)


def _pieces(reader: Any, size: int, ahead: int = 4) -> Iterable[memoryview]:
    """The file in order, piece by piece: streamed in one request where the reader can
    (S3), else with up to ``ahead`` ranged reads in parallel."""
    stream = getattr(reader, "stream", None)
    if stream is not None:
        for piece in stream(PIECE_BYTES):
            yield memoryview(piece)
        return
    offsets = list(range(0, size, PIECE_BYTES))
    if len(offsets) <= 1:
        if size:
            yield reader.read(0, size)
        return
    with ThreadPoolExecutor(ahead, thread_name_prefix="ckptstore-read") as pool:
        window: list[Future[memoryview]] = []
        it = iter(offsets)
        for off in it:
            window.append(pool.submit(reader.read, off, min(PIECE_BYTES, size - off)))
            if len(window) >= ahead:
                break
        try:
            while window:
                piece = window.pop(0).result()
                nxt = next(it, None)
                if nxt is not None:
                    window.append(pool.submit(reader.read, nxt, min(PIECE_BYTES, size - nxt)))
                yield piece
        finally:
            for f in window:
                f.cancel()


def replace_checkpoint(
    src: StorageBackend,
    dst: StorageBackend,
    name: str,
    *,
    threads: int = 4,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    manifest_key: bytes | None = None,
    damaged: set[str] | None = None,
) -> Manifest:
    """Copy committed checkpoint ``name`` from ``src`` over the checkpoint of that name
    on ``dst`` (or to ``dst`` if it has none); return its manifest.

    ``dst`` holds a complete checkpoint, the old or the new, at every moment: a copy is
    not a rename, and an object store has none, so the new one is first copied in full
    beside the old (``<name>.replacing``), then the old is deleted, the new copied again
    under ``name`` (on a local disk its files are hard-linked from the one beside it, and
    read in full; an object store's copies inside it are not read back, so there the
    bytes are sent again, and read back), and the one beside it deleted.
    Stopped or failed anywhere, a second call finishes the job. Raises what
    :func:`copy_checkpoint` raises.
    """
    beside = f"{name}{REPLACING_SUFFIX}"
    kw: dict[str, Any] = {
        "threads": threads, "stop": stop, "manifest_key": manifest_key, "damaged": damaged
    }  # fmt: skip
    link_from = None
    if dst.exists(f"{name}/{MANIFEST_FILE}"):
        # A leftover beside it is of an earlier attempt; the old one is complete.
        dst.delete(beside)
        copy_checkpoint(src, dst, name, dst_name=beside, progress=progress, **kw)
        log.warning(
            "replacing %s/%s with the copy from %s (copied beside it as %s first)",
            dst.url,
            name,
            src.url,
            beside,
        )
        dst.delete(name)
        if dst.capabilities.local:  # hard links, read in full after the commit
            link_from = beside  # its files are linked, not sent a second time
    elif name in dst.list_names():
        dst.delete(name)  # files without a manifest: an unfinished copy
    manifest = copy_checkpoint(src, dst, name, progress=progress, link_from=link_from, **kw)
    dst.delete(beside)
    return manifest


def fetch(
    remote: StorageBackend,
    local: StorageBackend,
    name: str,
    *,
    threads: int = 8,
    replace: bool = False,
    show_progress: bool = True,
    manifest_key: bytes | None = None,
) -> Manifest:
    """Download committed checkpoint ``name`` from ``remote`` into ``local``, verified
    (and, with a ``manifest_key``, only if its manifest is signed with it)."""
    # A clear CheckpointNotFoundError if it is not there:
    read_manifest(remote, name, manifest_key=manifest_key)
    progress = Progress(f"downloading {name} from {remote.url}", 0, enabled=show_progress)
    start = time.monotonic()
    manifest = copy_checkpoint(
        remote,
        local,
        name,
        threads=threads,
        replace=replace,
        progress=progress,
        manifest_key=manifest_key,
    )
    log.info(
        "downloaded %s from %s (%s, in %.1f s)",
        name,
        remote.url,
        moved(manifest, progress),
        time.monotonic() - start,
    )
    return manifest
