"""``ckptstore.save`` / ``ckptstore.load``: one checkpoint, synchronously, like DCP.

``path`` is the checkpoint itself (a directory, or a prefix in a bucket), not a root
of numbered checkpoints: that is :class:`~ckptstore.Checkpointer`'s job. Single process
without a process group, and multi-rank (a collective) when one is initialised;
``no_dist=True`` makes a save or load this process's alone even then (a save that
only rank 0 makes). :func:`read` returns a checkpoint's whole state dict, no target needed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, overload

import torch.distributed as dist

from ckptstore.codecs import get_codec
from ckptstore.codecs.auto import AutoCodec
from ckptstore.config import default_threads, io_window, resolve_manifest_key
from ckptstore.dcp.spec import SaveSpec
from ckptstore.engine import groups
from ckptstore.engine.arguments import check_metadata, check_step
from ckptstore.engine.lazyread import LazyStateDict, empty_flat, load_flat, nest, open_lazy
from ckptstore.engine.ops import (
    CheckpointInfo,
    load_into,
    read_dcp_metadata,
    read_manifest,
    save_staged,
)
from ckptstore.engine.stager import StagedState, stage_in_place
from ckptstore.errors import CheckpointExistsError, CheckpointNotFoundError, InvalidArgumentError
from ckptstore.layout import STEP_NAME, split_checkpoint_path
from ckptstore.storage import StorageBackend, open_backend, replace


def _split(
    path: str | os.PathLike[str] | None, checkpoint_id: str | os.PathLike[str] | None = None
) -> tuple[str, str]:
    """``(root, name)`` of the checkpoint ``path`` (or ``checkpoint_id=``, DCP's name
    for it: either, not both)."""
    if (path is None) == (checkpoint_id is None):
        raise InvalidArgumentError(
            "give the checkpoint's path, as path or as checkpoint_id= (DCP's name), once"
        )
    path = path if path is not None else checkpoint_id
    assert path is not None
    root, name = split_checkpoint_path(os.fspath(path))
    if not name:
        raise InvalidArgumentError(f"{os.fspath(path)!r} does not name a checkpoint directory")
    return root, name


def save(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str] | None = None,
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    step: int | None = None,
    codec: str | dict[str, Any] = "auto",
    metadata: dict[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
    threads: int | None = None,
    storage_options: dict[str, Any] | None = None,
    no_dist: bool = False,
    overwrite: bool = False,
) -> CheckpointInfo:
    """Save ``state_dict`` as the checkpoint ``path`` and return once it is durable.

    Fails with :class:`~ckptstore.errors.CheckpointExistsError` if ``path`` already
    holds a committed checkpoint, unless ``overwrite``: then the new one is written
    complete beside it and switched in (in one step on local disk; on object stores a
    reader finds the new copy beside it for the moment between delete and move). With a process group
    initialised, every rank of it must call this (a collective) unless ``no_dist``: then
    this process saves ``state_dict`` alone, as the whole checkpoint, and runs no collective.
    """
    root, name = _split(path, checkpoint_id)
    if step is not None:
        check_step(step)
    user_md = check_metadata(metadata)
    key = resolve_manifest_key()
    backend = open_backend(root, storage_options=storage_options)
    n_threads = threads or default_threads()
    chosen = (
        AutoCodec(local=backend.capabilities.local, threads=n_threads).choose()
        if codec == "auto"
        else get_codec(codec)
    )
    failure: Exception | None = None
    try:
        staged = stage_in_place(state_dict)
    except Exception as exc:  # the other ranks must hear of it, not wait for this one
        failure, staged = exc, StagedState({}, {}, None, 0, 0, 0.0)
    with (
        _group(process_group, no_dist) as group,
        ThreadPoolExecutor(n_threads, thread_name_prefix="ckptstore-codec") as pool,
    ):
        if failure is not None and group is None:
            raise failure
        try:
            save_staged(
                staged,
                backend,
                name,
                SaveSpec(
                    chosen,
                    step=step,
                    window=io_window(n_threads),
                    metadata=user_md,
                    manifest_key=key,
                    overwrite=overwrite,
                ),
                pool=pool,
                group=group,
                failure=None if failure is None else f"{type(failure).__name__}: {failure}",
            )
        except Exception as exc:
            if failure is not None:  # this rank's own error, not the save's echo of it
                raise failure from None
            committed = type(exc) is CheckpointExistsError and "already committed" in str(exc)
            if committed and not overwrite:  # (said in a path's terms, with the way out)
                raise CheckpointExistsError(
                    f"{backend.url}/{name} is already a committed checkpoint: save to another "
                    "path, or pass overwrite=True (the new one is written whole beside it, "
                    "then switched in)"
                ) from None
            raise
    manifest = read_manifest(backend, name, manifest_key=key)
    return CheckpointInfo(name, f"{backend.url}/{name}", manifest)


def load(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str] | None = None,
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    allow_partial: bool = False,
    allow_cast: bool = False,
    process_group: dist.ProcessGroup | None = None,
    threads: int | None = None,
    storage_options: dict[str, Any] | None = None,
    no_dist: bool = False,
) -> CheckpointInfo:
    """Load the checkpoint at ``path`` into ``state_dict`` in place (resharding as needed).

    Every byte read is checked against the manifest; nothing is unpickled outside an
    allowlist. ``allow_partial`` leaves keys the checkpoint lacks untouched;
    ``allow_cast`` converts tensors whose target's dtype cannot hold their values
    exactly, fp32 into fp16 say (else :class:`~ckptstore.errors.IncompatibleCheckpointError`
    names them); a widening (fp32 into fp64) converts without it. ``no_dist``: this
    process loads alone, without collectives, even with a process group initialised.
    """
    root, name = _split(path, checkpoint_id)
    backend = open_backend(root, storage_options=storage_options, create=False)
    name = replace.readable_name(backend, name)
    with (
        _group(process_group, no_dist) as group,
        ThreadPoolExecutor(
            threads or default_threads(), thread_name_prefix="ckptstore-codec"
        ) as pool,
    ):
        try:
            manifest = load_into(
                state_dict,
                backend,
                name,
                pool=pool,
                group=group,
                allow_partial=allow_partial,
                allow_cast=allow_cast,
                manifest_key=resolve_manifest_key(),
            )
        except CheckpointNotFoundError as exc:
            hint = _root_hint(f"{root}/{name}")
            if hint:
                raise CheckpointNotFoundError(f"{exc}. {hint}") from None
            raise
    return CheckpointInfo(name, f"{backend.url}/{name}", manifest)


@overload
def read(
    path: str | os.PathLike[str],
    *,
    lazy: Literal[False] = False,
    threads: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]: ...


@overload
def read(
    path: str | os.PathLike[str],
    *,
    lazy: Literal[True],
    threads: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> LazyStateDict: ...


def read(
    path: str | os.PathLike[str],
    *,
    lazy: bool = False,
    threads: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any] | LazyStateDict:
    """The whole state dict saved as checkpoint ``path``, without a target to load into.

    Tensors come back on the CPU with their stored dtypes and shapes, other values as
    saved (unpickled with ``weights_only=True``), every byte checked against the
    manifest. This process reads alone: no collectives, whatever process group exists.
    Rebuilt from the stored paths, so two things do not come back as saved: dict keys
    are strings (``{0: t}`` returns as ``{"0": t}``) and an empty dict is absent.
    ``lazy=True``: a read-only mapping whose tensors are read on first access
    (:class:`~ckptstore.engine.lazyread.LazyStateDict`), for a look at a few of them.
    """
    root, name = _split(path)
    backend = open_backend(root, storage_options=storage_options, create=False)
    name = replace.readable_name(backend, name)
    key = resolve_manifest_key()
    try:
        manifest = read_manifest(backend, name, manifest_key=key)
    except CheckpointNotFoundError as exc:
        hint = _root_hint(path)
        if hint:
            raise CheckpointNotFoundError(f"{exc}. {hint}") from None
        raise
    metadata = read_dcp_metadata(backend, name, manifest)
    n_threads = threads or default_threads()
    if lazy:
        return open_lazy(backend, name, manifest, metadata, n_threads)
    # Loaded flat (one entry per stored item, named as stored), then nested: a nested
    # target would be flattened again by DCP's rules, which can differ for a rebuilt
    # list of placeholders.
    flat = empty_flat(metadata)
    load_flat(flat, backend, name, manifest, metadata, n_threads)
    return nest(metadata, flat)


@contextlib.contextmanager
def _group(
    process_group: dist.ProcessGroup | None, no_dist: bool
) -> Iterator[dist.ProcessGroup | None]:
    if no_dist:
        if process_group is not None:
            raise InvalidArgumentError("pass process_group or no_dist=True, not both")
        yield None
        return
    with groups.caller_group(process_group) as group:
        yield group


def _root_hint(path: str | os.PathLike[str]) -> str:
    """If ``path`` is a root of numbered checkpoints, say which ones it holds."""
    try:
        inner: StorageBackend = open_backend(path, create=False)
        names = [n for n in inner.list_names() if STEP_NAME.match(n)]
    except Exception:  # the hint is a courtesy; the original error stands
        return ""
    if not names:
        return ""
    shown = ", ".join(names[-3:])
    return (
        f"{os.fspath(path)} looks like a checkpoint root ({len(names)} checkpoints: ... {shown}); "
        "pass one of them, or use ckptstore.Checkpointer(root).load(state_dict)"
    )
