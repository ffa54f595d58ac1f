"""The small files beside a root's checkpoints: ``latest`` (the newest committed one,
replaced atomically after each commit) and ``finals`` (checkpoints that ended a
completed run, which ``KeepFinal`` keeps)."""

from __future__ import annotations

import logging

from ckptstore.errors import CkptStoreError
from ckptstore.layout import FINALS_FILE, LATEST_FILE, MANIFEST_FILE, damaged_name
from ckptstore.storage import StorageBackend

log = logging.getLogger("ckptstore")


def read_lines(backend: StorageBackend, name: str) -> list[str]:
    """The non-empty lines of a small file; none if it is missing or unreadable."""
    try:
        text = backend.read_bytes(name).decode()
    except (FileNotFoundError, UnicodeDecodeError, CkptStoreError):
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_latest(backend: StorageBackend) -> str | None:
    """The checkpoint ``latest`` names, or None."""
    lines = read_lines(backend, LATEST_FILE)
    return lines[0] if lines else None


def write_latest(backend: StorageBackend, name: str) -> None:
    """Point ``latest`` at ``name`` (atomically)."""
    backend.put_atomic(LATEST_FILE, f"{name}\n".encode())


def move_latest(backend: StorageBackend, name: str) -> bool:
    """Point ``latest`` at ``name`` if it is still committed (else leave it, and return
    False). The manager's housekeeping runs behind saves that commit faster than it
    points and prunes: pointing at a checkpoint pruned meanwhile would leave ``latest``
    naming nothing, or for good after a crash."""
    if not backend.exists(f"{name}/{MANIFEST_FILE}"):
        return False
    write_latest(backend, name)
    return True


def record_final(backend: StorageBackend, name: str) -> None:
    """Add ``name`` to ``finals``; a failure is only logged (the save it follows stands)."""
    finals = read_lines(backend, FINALS_FILE)
    if name not in finals:
        try:
            backend.put_atomic(FINALS_FILE, ("\n".join([*finals, name]) + "\n").encode())
        except CkptStoreError as exc:
            log.warning("could not record %s as final: %s", name, exc)


def forget_finals(backend: StorageBackend, names: set[str]) -> None:
    """Remove ``names`` from ``finals`` (checkpoints moved aside: a new checkpoint of the
    same name did not end a run)."""
    finals = read_lines(backend, FINALS_FILE)
    if names & set(finals):
        kept = [n for n in finals if n not in names]
        backend.put_atomic(FINALS_FILE, "".join(f"{n}\n" for n in kept).encode())


def set_aside(backend: StorageBackend, name: str, when_unix_s: float) -> str:
    """Move ``name`` aside as ``step_N.damaged-<UTC>`` and drop it from ``finals``, so
    that a new checkpoint saved at that name is not taken for the end of a run. The move
    comes first: a crash between the two leaves a stale mark, which only keeps more.
    Returns the new name; a failed move raises and changes nothing."""
    aside = damaged_name(name, when_unix_s)
    backend.move_aside(name, aside)
    try:
        forget_finals(backend, {name})
    except CkptStoreError as exc:
        log.warning("could not drop %s from %s: %s", name, FINALS_FILE, exc)
    return aside
