"""Storage backends: local disk (full crash-safe commit) and any fsspec file system."""

from __future__ import annotations

import os
from typing import Any

from ckptstore.layout import MANIFEST_FILE, TEMP_PREFIX, check_name
from ckptstore.storage.base import FileSink, PendingCheckpoint, RangeReader, StorageBackend
from ckptstore.storage.local import LocalBackend
from ckptstore.storage.objectstore import FsspecBackend
from ckptstore.storage.s3 import S3Backend, is_s3

__all__ = [
    "MANIFEST_FILE",
    "TEMP_PREFIX",
    "FileSink",
    "FsspecBackend",
    "LocalBackend",
    "PendingCheckpoint",
    "RangeReader",
    "S3Backend",
    "StorageBackend",
    "check_name",
    "open_backend",
]


def open_backend(
    url: str | os.PathLike[str] | StorageBackend,
    *,
    storage_options: dict[str, Any] | None = None,
    create: bool = True,
) -> StorageBackend:
    """The backend for a local path, ``file://`` URL or any fsspec URL.

    A :class:`StorageBackend` instance is returned as it is (custom backends, or
    wrappers that inject faults in tests). ``storage_options`` go to the fsspec file
    system (endpoint, credentials, ...); they are never logged, and never written into
    a checkpoint.
    """
    if isinstance(url, StorageBackend):
        return url
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise ValueError(f"checkpoint root must be a path or URL, got {url!r}")
    if "://" not in url:
        return LocalBackend(url, create=create)
    protocol = url.split("://", 1)[0]
    if protocol in ("file", "local"):
        return LocalBackend(url.split("://", 1)[1], create=create)

    import fsspec  # deferred: importing it pulls in its registry

    options = dict(storage_options or {})
    s3 = protocol in ("s3", "s3a")
    if s3:
        # Listings must be fresh: a cached one hides another rank's or process's commit.
        options.setdefault("use_listings_cache", False)
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot open {url!r}: {type(exc).__name__}: {exc}") from exc
    if s3 and is_s3(fs):
        return S3Backend(fs, root, url)
    return FsspecBackend(fs, root, url)
