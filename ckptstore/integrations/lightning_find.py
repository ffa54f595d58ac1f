"""Finding the checkpoint to resume from in a Lightning checkpoint directory:
:func:`last_checkpoint`, also importable from :mod:`ckptstore.integrations.lightning`.
Needs no Lightning."""

from __future__ import annotations

import logging
import os
from typing import Any

from ckptstore.config import resolve_manifest_key
from ckptstore.engine.listing import read_manifest
from ckptstore.errors import CheckpointNotFoundError, CkptStoreError
from ckptstore.layout import REPLACING_SUFFIX
from ckptstore.storage import open_backend

log = logging.getLogger("ckptstore")


def last_checkpoint(
    dirpath: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> str | None:
    """The path of the newest committed ckptstore checkpoint named ``*.ckpt`` in
    ``dirpath`` (by when its save began), or None: ``trainer.fit(model,
    ckpt_path=last_checkpoint(dirpath) )``.

    For object stores, where Lightning 2.6's ``ckpt_path="last"`` does not work: it
    lists ``s3://`` directories without their scheme (finds nothing, starts over) and
    fails on an ``on_exception.ckpt`` there (s3fs has no modification time for a
    prefix). Lightning's "last" takes the newest of ``last*.ckpt`` and
    ``on_exception.ckpt``; this takes the newest of all, top-k ones included (saved at
    the same step as ``last.ckpt``, they hold the same state). A damaged or unsigned
    manifest is passed over with a warning; a half-swapped ``last.ckpt`` (only
    ``last.ckpt.replacing`` left) is found under its own name, as loading it does.
    """
    root = os.fspath(dirpath).rstrip("/")
    try:
        backend = open_backend(root, storage_options=storage_options, create=False)
        names = backend.list_names()
    except FileNotFoundError:
        return None
    key = resolve_manifest_key()
    newest: tuple[float, str] | None = None
    for listed in names:
        name = listed.removesuffix(REPLACING_SUFFIX)
        if not name.endswith(".ckpt") or (listed != name and name in names):
            continue
        try:
            manifest = read_manifest(backend, listed, manifest_key=key)
        except CheckpointNotFoundError:
            continue  # (a save in progress, or not a checkpoint)
        except CkptStoreError as exc:
            log.warning("last_checkpoint: passing over %s/%s: %s", root, listed, exc)
            continue
        if newest is None or (manifest.created_unix_s, name) > newest:
            newest = (manifest.created_unix_s, name)
    return None if newest is None else f"{root}/{newest[1]}"
