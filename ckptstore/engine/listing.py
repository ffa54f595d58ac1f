"""Committed checkpoints, read from their manifests: :func:`list_checkpoints`,
:func:`read_manifest` and :class:`CheckpointInfo`.

Kept apart from :mod:`ckptstore.engine.ops` because nothing here needs torch: listing a
root (``ckptstore ls``) reads JSON manifests only, and starts in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ckptstore.errors import CheckpointNotFoundError, CkptStoreError
from ckptstore.format.manifest import Manifest
from ckptstore.layout import MANIFEST_FILE, STEP_NAME
from ckptstore.storage.base import StorageBackend


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as its manifest describes it."""

    name: str
    url: str
    manifest: Manifest

    @property
    def step(self) -> int | None:
        return self.manifest.step

    @property
    def created_unix_s(self) -> float:
        return self.manifest.created_unix_s

    @property
    def raw_bytes(self) -> int:
        return self.manifest.raw_bytes

    @property
    def stored_bytes(self) -> int:
        return self.manifest.stored_bytes

    @property
    def ratio(self) -> float:
        return self.manifest.ratio

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest.metadata


def checkpoint_url(backend: StorageBackend, name: str) -> str:
    """Where checkpoint ``name`` of ``backend`` lives, for messages and listings."""
    return f"{backend.url}/{name}"


def read_manifest(
    backend: StorageBackend, name: str, *, manifest_key: bytes | None = None
) -> Manifest:
    """The manifest of ``name``, checked. A missing one means: not a checkpoint.

    ``manifest_key`` (default: ``$CKPTSTORE_MANIFEST_KEY``): refuse a manifest that is
    not signed with it (:class:`~ckptstore.errors.UnsafeCheckpointError`).
    """
    try:
        data = backend.read_bytes(f"{name}/{MANIFEST_FILE}")
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {checkpoint_url(backend, name)} (no {MANIFEST_FILE}); "
            "a save that did not finish leaves nothing loadable"
        ) from None
    return Manifest.from_json(data, checkpoint_url(backend, name), key=manifest_key)


def step_mismatch(backend: StorageBackend, name: str, manifest: Manifest) -> str | None:
    """Why ``name`` is not a checkpoint although its manifest checks out, or None.

    A ``step_N`` name is a checkpoint only when its manifest says step N: a symlink to
    another checkpoint, or a copy under another step's name, is not one. ``ls``,
    ``verify``, restore and retention all go by this (through :func:`list_checkpoints`
    or directly). Names saved by path (not ``step_*``) carry no step to disagree with.
    """
    match = STEP_NAME.match(name)
    if match is None or manifest.step == int(match.group(1)):
        return None
    return (
        f"{checkpoint_url(backend, name)}: not a checkpoint: its manifest says step {manifest.step}, "
        f"its name step {int(match.group(1))} (a copy or a link under another step's name?); "
        "ls and restore ignore it: delete it, or move it to the name of the step it holds"
    )


def list_checkpoints(
    backend: StorageBackend,
    names: Iterable[str] | None = None,
    *,
    manifest_key: bytes | None = None,
) -> list[CheckpointInfo]:
    """Committed checkpoints named ``step_*`` under the root, by step.

    A directory without a valid manifest (with a ``manifest_key``: a validly signed
    one) is not a checkpoint and is not listed.
    """
    infos = []
    for name in backend.list_names() if names is None else names:
        match = STEP_NAME.match(name)
        if not match:
            continue
        try:
            manifest = read_manifest(backend, name, manifest_key=manifest_key)
        except CkptStoreError:
            continue
        if step_mismatch(backend, name, manifest) is not None:
            continue
        infos.append(CheckpointInfo(name, checkpoint_url(backend, name), manifest))
    infos.sort(key=lambda info: info.manifest.step or 0)
    return infos
