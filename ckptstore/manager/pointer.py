"""The small files beside a root's checkpoints: ``latest`` (the newest committed one,
replaced atomically after each commit) and ``finals`` (checkpoints that ended a
completed run, which ``KeepFinal`` keeps)."""

from __future__ import annotations

import logging
import re

from ckptstore.errors import CkptStoreError, StorageError
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


_NAME_LINE = re.compile(r"^[^\s/\\*?\[\]]+$")  # one checkpoint's name, as these files hold


def put(backend: StorageBackend, fname: str, data: bytes) -> None:
    """Replace ``fname`` with ``data``, unless what is there is someone else's text: a
    ``latest`` or ``finals`` holds checkpoint names, one a line (a file that does not
    decode is taken for a damaged one of ours). The root may be a directory that holds
    other things: a user's notes named ``latest`` were replaced until 2026-12-07. (A
    symlink or directory there is refused by the local backend's put_atomic.)"""
    try:
        text = backend.read_bytes(fname).decode()
    except (FileNotFoundError, UnicodeDecodeError, CkptStoreError):
        text = ""
    if not all(_NAME_LINE.match(line.strip()) for line in text.splitlines() if line.strip()):
        raise StorageError(  # (one argument: no "[Errno 17] ...: 'path'" around it)
            f"{backend.url}/{fname} does not hold checkpoint names, so it is not "
            "ckptstore's: not replacing it. Move it away, or give this run a directory of "
            "its own"
        )
    backend.put_atomic(fname, data)


def write_latest(backend: StorageBackend, name: str) -> None:
    """Point ``latest`` at ``name`` (atomically)."""
    put(backend, LATEST_FILE, f"{name}\n".encode())


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
            put(backend, FINALS_FILE, ("\n".join([*finals, name]) + "\n").encode())
        except CkptStoreError as exc:
            log.warning("could not record %s as final: %s", name, exc)


def forget_finals(backend: StorageBackend, names: set[str]) -> None:
    """Remove ``names`` from ``finals`` (checkpoints moved aside: a new checkpoint of the
    same name did not end a run)."""
    finals = read_lines(backend, FINALS_FILE)
    if names & set(finals):
        kept = [n for n in finals if n not in names]
        put(backend, FINALS_FILE, "".join(f"{n}\n" for n in kept).encode())


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
