"""Replacing a committed checkpoint without a moment when none is there.

A checkpoint is replaced (``StorageWriter(overwrite=True)``, ``ckptstore.save(...,
overwrite=True)``, Lightning's ``last``) in three steps:

1. :func:`begin_replace`: where the new copy goes. ``<name>.replacing`` when ``name``
   holds a committed checkpoint (a leftover there, of a replace cut short, is removed
   first); else ``name`` itself (leftover files without a manifest removed first, if
   they are all files ckptstore writes: anything else there is someone else's, and the
   replace is refused, as ``overwrite=True`` on a directory of the user's files, a
   checkpoint root or ``.`` used to delete it whole until 2026-12-07).
2. The save commits the new copy there, as any save does.
3. :func:`finish_replace`: the new copy takes ``name``. Where the backend swaps names
   in one step (local disk on Linux), the old copy is then deleted; elsewhere the old
   copy is deleted, then the new one moved to ``name``: for that moment the complete
   new copy sits beside it, and :func:`readable_name` makes readers find it there.

Killed before step 3 finishes, ``name`` holds the old checkpoint (or the new one beside
it); the next replace removes the leftover.
"""

from __future__ import annotations

from ckptstore.errors import CheckpointExistsError
from ckptstore.layout import MANIFEST_FILE, REPLACING_SUFFIX
from ckptstore.storage.base import StorageBackend


def beside(name: str) -> str:
    return f"{name}{REPLACING_SUFFIX}"


def is_committed(backend: StorageBackend, name: str) -> bool:
    return backend.exists(f"{name}/{MANIFEST_FILE}")


def begin_replace(backend: StorageBackend, name: str) -> str:
    """Where a save that replaces ``name`` writes its new copy (run on the coordinator,
    before the save)."""
    if is_committed(backend, name):
        _delete_leftover(backend, beside(name))  # a replace cut short before
        return beside(name)
    if name in backend.list_names():
        _delete_leftover(backend, name)  # files without a manifest: not a checkpoint
    return name


def _delete_leftover(backend: StorageBackend, name: str) -> None:
    """Delete ``name``, a dead save's leftover if it holds only files ckptstore writes;
    refuse anything else (CheckpointExistsError): it is not ours to delete."""
    if is_committed(backend, name):  # (a whole copy beside: ours)
        backend.delete(name)
        return
    foreign = backend.foreign_files(name)
    if foreign:
        shown = ", ".join(foreign[:4]) + (
            f" and {len(foreign) - 4} more" if len(foreign) > 4 else ""
        )
        raise CheckpointExistsError(
            f"{backend.url}/{name} exists and is not a checkpoint: it holds {shown} (a "
            "checkpoint holds only the files ckptstore writes in it). Not replacing it, "
            "even with overwrite=True: give the checkpoint a path of its own (such as "
            f"{backend.url}/{name}/step_N), or move that one away"
        )
    backend.delete(name)


def finish_replace(backend: StorageBackend, name: str, written: str) -> None:
    """After the save committed ``written`` (from :func:`begin_replace`): make it ``name``."""
    if written == name:
        backend.delete(beside(name))  # a replace cut short before: this one is newer
        return
    if backend.swap(written, name):
        backend.delete(written)  # the old copy, now beside
    else:
        backend.delete(name)
        backend.move_aside(written, name)


def readable_name(backend: StorageBackend, name: str) -> str:
    """``name``, or the complete new copy beside it while a replace is between its last
    two steps on a backend that cannot swap names."""
    if not is_committed(backend, name) and is_committed(backend, beside(name)):
        return beside(name)
    return name
