"""Which backend opens which URL: a table from URL scheme to factory.

::

    /runs/exp1, file://..., local://...   LocalBackend       (options: direct_io)
    s3://..., s3a://...                   S3Backend          (options: part_bytes, ...)
    any other fsspec URL (memory://, gs://, ...)   FsspecBackend (no options)

A new backend registers its schemes once (at import of the module that defines it)::

    register_backend("myfs", open_myfs, options={"block_bytes"})

and from then on every ``Checkpointer``, ``CheckpointManager`` and command that takes a
root opens ``myfs://...`` with it: nothing above the storage layer names a backend.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ckptstore.errors import InvalidArgumentError, InvalidArgumentTypeError
from ckptstore.storage import local, objectstore, s3, s3_options
from ckptstore.storage.base import StorageBackend


class BackendFactory(Protocol):
    """Makes the backend for one URL; registered with :func:`register_backend`.

    ``url``: as the user gave it (a plain local path for the ``file`` scheme).
    ``storage_options``: for the file system library (fsspec: endpoint, credentials);
    never log them. ``backend_options``: constructor options of the backend, only names
    registered for the scheme. ``create``: make the root if missing, where that means
    something. Raise :class:`ValueError` for a URL or option it cannot use.
    """

    def __call__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any],
        backend_options: dict[str, Any],
        create: bool,
    ) -> StorageBackend: ...


@dataclass(frozen=True)
class _Entry:
    factory: BackendFactory
    options: frozenset[str]


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_LOCK = threading.Lock()
_FACTORIES: dict[str, _Entry] = {}
# A URL whose scheme nobody registered goes to fsspec, which knows dozens.
_FALLBACK = _Entry(objectstore.open_fsspec_backend, frozenset())
LOCAL_SCHEME = "file"  # the scheme of a plain path (no "://")


def register_backend(
    schemes: str | Iterable[str],
    factory: BackendFactory,
    *,
    options: Iterable[str] = (),
    replace: bool = False,
) -> None:
    """Open URLs of ``schemes`` (``"s3"``, or several) with ``factory`` from now on.

    ``options``: the names ``backend_options`` may hold for these URLs; any other name
    is refused before the factory is called. A scheme already registered raises
    :class:`ValueError` unless ``replace=True``. ``"file"`` is the scheme of plain paths.
    """
    if isinstance(schemes, str):
        names = [schemes]
    elif isinstance(schemes, Iterable):
        names = list(schemes)
    else:
        raise InvalidArgumentError(f"a URL scheme is a string (or several), got {schemes!r}")
    if not names:
        raise InvalidArgumentError("register_backend needs at least one scheme")
    for name in names:
        if not isinstance(name, str) or not _SCHEME.fullmatch(name):
            raise InvalidArgumentError(
                f"a URL scheme is a letter then letters, digits, +, - or .; got {name!r}"
            )
    if not callable(factory):
        raise InvalidArgumentError(f"factory must be callable, got {factory!r}")
    entry = _Entry(factory, frozenset(options))
    with _LOCK:
        taken = [n for n in names if n in _FACTORIES]
        if taken and not replace:
            raise InvalidArgumentError(
                f"scheme(s) {taken} already have a backend; pass replace=True to replace it"
            )
        for name in names:
            _FACTORIES[name] = entry


def open_backend(
    url: str | os.PathLike[str] | StorageBackend,
    *,
    storage_options: dict[str, Any] | None = None,
    create: bool = True,
    backend_options: dict[str, Any] | None = None,
) -> StorageBackend:
    """The backend for a local path, ``file://`` URL or any registered or fsspec URL.

    A :class:`StorageBackend` instance is returned as it is (custom backends, or
    wrappers that inject faults in tests); ``backend_options`` cannot apply to one and
    are refused. ``storage_options`` go to the fsspec file system (endpoint,
    credentials, ...); they are never logged, and never written into a checkpoint.
    ``backend_options`` go to the backend's constructor (``LocalBackend(direct_io=)``,
    ``S3Backend(part_bytes=, ...)``); names the backend does not take are refused.
    ``create=False`` leaves a missing local root to be created by the first save.
    """
    backend_opts = dict(backend_options or {})
    if isinstance(url, StorageBackend):
        if backend_opts:
            raise InvalidArgumentError(
                f"backend_options {sorted(backend_opts)} cannot apply to {url!r}, "
                "a backend already made: pass them to its constructor"
            )
        return url
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str):
        raise InvalidArgumentTypeError(
            f"checkpoint root must be a path or URL, got {type(url).__name__} {url!r}"
        )
    if not url:
        raise InvalidArgumentError("checkpoint root must be a path or URL, got ''")
    scheme = url.split("://", 1)[0] if "://" in url else LOCAL_SCHEME
    entry = _FACTORIES.get(scheme, _FALLBACK)
    unknown = sorted(set(backend_opts) - entry.options)
    if unknown:
        accepted = ", ".join(sorted(entry.options)) or "none"
        raise InvalidArgumentError(
            f"unknown backend option(s) {unknown} for {scheme}:// roots (accepted: {accepted})"
        )
    return entry.factory(
        url,
        storage_options=dict(storage_options or {}),
        backend_options=backend_opts,
        create=create,
    )


register_backend((LOCAL_SCHEME, "local"), local.open_local_backend, options=local.BACKEND_OPTIONS)
register_backend(("s3", "s3a"), s3.open_s3_backend, options=s3_options.BACKEND_OPTIONS)
