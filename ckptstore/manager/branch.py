"""Checkpoints newer than the one a run resumed: found in both tiers, refused, or moved
aside as a retired branch.

A run that resumes step 10 of a root holding 10, 20 and 30 would, training on, save
over steps 20 and 30. The training command decides before training
(``ckptstore train --discard-newer``); :meth:`CheckpointManager.restore` takes
``newer="keep" | "refuse" | "discard"``. Discarding never deletes: each newer
checkpoint is moved aside as ``step_N.retired-<UTC>`` (listed by ``ckptstore ls --all``,
never loaded, swept or deleted by ckptstore), in the local root and on the backup, and
the run goes on as a new branch: a new run id whose lineage names the run it left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence

from ckptstore.engine.ops import CheckpointInfo, list_checkpoints
from ckptstore.errors import CkptStoreError, NewerCheckpointsError
from ckptstore.layout import MANIFEST_FILE, retired_name
from ckptstore.manager import pointer
from ckptstore.storage import StorageBackend

log = logging.getLogger("ckptstore")

NEWER_CHOICES = ("keep", "refuse", "discard")


def newer_in(
    backend: StorageBackend, than: int | None, *, manifest_key: bytes | None
) -> list[CheckpointInfo]:
    """The committed checkpoints under ``backend`` past step ``than`` (None: all)."""
    infos = list_checkpoints(backend, manifest_key=manifest_key)
    return [i for i in infos if than is None or (i.manifest.step or 0) > than]


def refuse(
    found: Sequence[tuple[StorageBackend, Sequence[CheckpointInfo]]],
    restored: str | None,
    damaged: Collection[tuple[str, str]] = (),
) -> NewerCheckpointsError:
    """The error that says what is there, and the three ways on. ``damaged``: (url,
    name) of those found damaged while restoring (a download that failed its checksums),
    said as such: training on from an older one is then what is left."""
    where = "; ".join(
        f"{backend.url}: {summary(infos)}{_damaged(backend, infos, damaged)}"
        for backend, infos in found
        if infos
    )
    if restored is None:
        what = f"this run starts from scratch, but there are checkpoints already ({where})"
    else:
        what = f"{restored} is older than checkpoints already there ({where})"
    what += "; training on would save over them"
    return NewerCheckpointsError(
        f"{what}. Resume the newest instead, save into another root, or restore with "
        "newer='discard' (they are moved aside as step_N.retired-<time>, not deleted)",
        [i.name for _, infos in found for i in infos],
        what,
    )


def _damaged(
    backend: StorageBackend, infos: Sequence[CheckpointInfo], damaged: Collection[tuple[str, str]]
) -> str:
    bad = [i.name for i in infos if (backend.url, i.name) in damaged]
    if not bad:
        return ""
    return (
        f", of which {', '.join(bad)} failed its checksums when this restore downloaded it: "
        "damaged there too"
    )


def summary(infos: Sequence[CheckpointInfo]) -> str:
    """``step_00000020..step_00000030 (2, run 4f0c...)``: names, count and runs."""
    names = [i.name for i in infos]
    span = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
    runs = sorted({i.manifest.run_id or "not recorded" for i in infos})
    return f"{span} ({len(names)}, run {', '.join(runs)})"


def retire(backend: StorageBackend, infos: Sequence[CheckpointInfo]) -> list[str]:
    """Move each of ``infos`` aside as retired (newest first, so that a crash half way
    leaves a prefix of the old branch: never a gap under a newer checkpoint); return the
    new names. A move that fails raises: the caller must not train on over them."""
    moved = []
    now = time.time()
    for info in sorted(infos, key=lambda i: i.manifest.step or 0, reverse=True):
        aside = retired_name(info.name, now)
        try:
            backend.move_aside(info.name, aside)
        except CkptStoreError:
            log.error("could not move %s/%s aside to %s", backend.url, info.name, aside)
            raise
        moved.append(aside)
    pointer.forget_finals(backend, {i.name for i in infos})
    if moved:
        log.warning(
            "moved %d newer checkpoint(s) under %s aside as a retired branch (kept, never "
            "loaded or deleted by ckptstore; `ckptstore ls %s --all` lists them): %s",
            len(moved),
            backend.url,
            backend.url,
            ", ".join(moved),
        )
    return moved


def retire_newer(
    backend: StorageBackend, newer: Sequence[CheckpointInfo], info: CheckpointInfo | None
) -> None:
    """Retire ``newer`` in ``backend`` and point ``latest`` at ``info`` where it is."""
    retire(backend, newer)
    if info is not None and backend.exists(f"{info.name}/{MANIFEST_FILE}"):
        try:  # (not ckptstore's latest there: it is not needed to go on)
            pointer.write_latest(backend, info.name)
        except CkptStoreError as exc:
            log.warning("could not point %s/latest at %s: %s", backend.url, info.name, exc)
