"""What a copy's destination already holds (incremental saves): a linked file that a
checkpoint there lists is hard-linked (local disk) or copied inside the store (object
stores) instead of sent again, once it is checked there (:func:`without_held`). Used by
:mod:`ckptstore.transfer` and :mod:`ckptstore.transfer_parts`."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptstore.errors import CopyStoppedError, CorruptCheckpointError, StorageError
from ckptstore.format.manifest import Manifest
from ckptstore.storage import StorageBackend

log = logging.getLogger("ckptstore")

# Files on object stores that this process read back after an upload or checked before a
# copy inside the store, with their version tag then (S3: ETag and size) and whether they
# were intact: while the tag is the same, so are the bytes, and a later copy inside the
# store takes the file, or passes over a damaged one, without downloading it again.
# (dst url, name) -> (tag, intact).
_checked: dict[tuple[str, str], tuple[str, bool]] = {}
_checked_lock = threading.Lock()


def note_checked(dst: StorageBackend, name: str, ok: bool = True) -> None:
    tag = dst.version_tag(name)
    if tag is not None:
        with _checked_lock:
            _checked[(dst.url, name)] = (tag, ok)


def _known(dst: StorageBackend, name: str) -> bool | None:
    """Whether the file was intact when this process last read it, if the store says it
    has not been written since; None: not known."""
    with _checked_lock:
        known = _checked.get((dst.url, name))
    if known is None or dst.version_tag(name) != known[0]:
        return None
    return known[1]


def without_held(
    dst: StorageBackend,
    pending: Any,
    manifest: Manifest,
    skip: tuple[str, ...],
    key: bytes | None,
    files: list[tuple[str, Any]],
    link: bool = True,
    link_from: str | None = None,
    *,
    check: bool = True,
    stop: threading.Event | None = None,
    damaged: set[str] | None = None,
) -> list[tuple[str, Any]]:
    """Of ``files`` (name, manifest entry), those left to send once the linked files
    (incremental saves) that a checkpoint in ``dst`` not named in ``skip`` (the one
    being written among them) holds are linked, or copied
    inside the store, into ``pending`` (``link`` False: all of them; ``link_from``: a
    copy of this checkpoint there, every file of which is linked).

    A link or a copy inside the store sends no bytes from here, so nothing here would
    see that the file there is damaged: with ``check`` each is read and checked first
    (:func:`intact`), the oldest holder first and the next where it is damaged, and one
    no holder has intact is sent from the source. (``copy_checkpoint`` reads a local
    destination's whole checkpoint after its commit instead: ``check=False``.) Each
    ``"<checkpoint>/<file>"`` found damaged there is added to ``damaged``, and those in it
    already are passed over unread."""
    if not link:
        return files
    names = {f for f, _ in files}
    if link_from is not None:
        held = {f: f"{link_from}/{f}" for f in names}
    else:
        holders = {f: at for f, at in _held_by(dst, manifest, skip, key).items() if f in names}
        entries = dict(files)
        bad = damaged if damaged is not None else set()
        held = {}
        for f, ats in holders.items():
            at = next(
                (
                    a
                    for a in ats
                    if a not in bad and (not check or intact(dst, a, entries[f], stop, bad))
                ),
                None,
            )
            if at is not None:
                held[f] = at
    if held and pending.link_files(held):
        return [(f, e) for f, e in files if f not in held]
    return files


def intact(
    dst: StorageBackend,
    at: str,
    entry: Any,
    stop: threading.Event | None = None,
    damaged: set[str] | None = None,
) -> bool:
    """Whether shard file ``at`` in ``dst`` matches ``entry`` (size, index checksum,
    every chunk): read in full, unless this process read it before and the store says it
    has not been written since (:func:`_known`). Logs why not where it does not, and
    adds ``at`` to ``damaged`` where it is damaged (not where it could not be read)."""
    ok = _intact(dst, at, entry, stop)
    if ok is False and damaged is not None:
        damaged.add(at)
    return bool(ok)


def _intact(dst: StorageBackend, at: str, entry: Any, stop: threading.Event | None) -> bool | None:
    """:func:`intact`; None: it could not be read."""
    from ckptstore.format.shard import ShardReader

    where = f"{dst.url}/{at}"
    known = _known(dst, at)
    if known is not None:
        return known
    if stop is not None and stop.is_set():
        raise CopyStoppedError(f"copy to {dst.url} stopped before checking {at} there")
    try:
        with ThreadPoolExecutor(4, thread_name_prefix="ckptstore-check") as pool:
            reader = dst.open_reader(at)
            try:
                ShardReader(
                    reader, where, size_bytes=entry.size_bytes, index_xxh3=entry.xxh3_64
                ).verify(pool)
            finally:
                reader.close()
    except CorruptCheckpointError as exc:
        reason = str(exc).removeprefix(f"{where}: ").split("; restore an earlier")[0]
        # (This reads every chunk of the file; verify reads the items each checkpoint
        # uses, so damage in an item later saves replaced is in no checkpoint there.)
        log.warning(
            "%s is damaged (%s): not copied from there. `ckptstore verify %s` names the "
            "checkpoints there that read damaged bytes (none, if the damage lies only in "
            "items later saves replaced); `ckptstore sync <intact source> %s "
            "--verify-existing --replace-damaged` repairs them",
            where, reason, dst.url, dst.url,
        )  # fmt: skip
        note_checked(dst, at, ok=False)
        return False
    except (StorageError, FileNotFoundError) as exc:  # (gone meanwhile: a prune there)
        log.warning("%s could not be checked (%s): not copied from there", where, exc)
        return None
    note_checked(dst, at)
    return True


def damaged_holders(
    dst: StorageBackend,
    manifest: Manifest,
    skip: tuple[str, ...],
    key: bytes | None,
    damaged: set[str],
) -> None:
    """Add to ``damaged`` each copy in ``dst`` of ``manifest``'s linked files that is
    damaged there: after a copy linked from them (unchecked, ``check=False``) read back
    damaged, which checkpoints there hold the damage. On a local disk the checkpoints of
    a chain hold one file (hard links): it is read once, and all of them named."""
    for f, ats in _held_by(dst, manifest, skip, key).items():
        read: dict[Any, bool | None] = {}  # (device, inode) -> intact (None: unreadable)
        for at in ats:
            ident = _inode(dst, at)
            if ident is None or ident not in read:
                ok = _intact(dst, at, manifest.files[f], None)
                if ident is not None:
                    read[ident] = ok
            else:
                ok = read[ident]
            if ok is False:
                damaged.add(at)


def forget_damaged(damaged: set[str], name: str) -> None:
    """Drop from ``damaged`` (``"<checkpoint>/<file>"``, as :func:`damaged_holders` notes
    them) the files of checkpoint ``name``: it was copied again, or is given up on."""
    damaged.difference_update([at for at in frozenset(damaged) if at.startswith(f"{name}/")])


def _inode(dst: StorageBackend, at: str) -> tuple[int, int] | None:
    """The file's (device, inode) on a local disk; None elsewhere, or gone."""
    if not dst.capabilities.local:
        return None
    try:
        st = os.stat(os.path.join(dst.url, at))
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _held_by(
    dst: StorageBackend, manifest: Manifest, skip: tuple[str, ...], key: bytes | None
) -> dict[str, list[str]]:
    """Linked files (incremental saves) that other checkpoints in ``dst`` list with the
    same size and checksum: their name -> each ``"<checkpoint>/<file>"`` there, oldest
    first (the one that wrote it, or a repaired one: replacing a chain oldest first links
    each from the one just replaced, not a damaged newer)."""
    if not manifest.linked:
        return {}
    from ckptstore.engine.listing import list_checkpoints

    there: dict[tuple[int, str], list[str]] = {}
    for i in list_checkpoints(dst, manifest_key=key):  # oldest first
        if i.name in skip:
            continue
        for f, e in i.manifest.files.items():
            if e.kind == "shard":
                there.setdefault((e.size_bytes, e.xxh3_64), []).append(f"{i.name}/{f}")
    wanted = {f: (manifest.files[f].size_bytes, manifest.files[f].xxh3_64) for f in manifest.linked}
    return {f: there[k] for f, k in wanted.items() if k in there}
