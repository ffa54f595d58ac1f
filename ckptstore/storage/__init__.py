"""Storage backends: local disk (full crash-safe commit) and any fsspec file system.

::

    base.py         the interface (StorageBackend, PendingCheckpoint, FileSink,
                    RangeReader), its contract, and Capabilities
    registry.py     open_backend(url) and register_backend(scheme, factory)
    local.py        LocalBackend: temp directory, fsync, no-replace rename
    _direct_io.py   its O_DIRECT sink, renameat2 and directory fsync (private)
    _local_read.py  its readers, regular files only (private)
    objectstore.py  FsspecBackend: any fsspec file system, manifest written last
    s3.py           S3Backend: multipart uploads, conditional commit
    s3_options.py   its settings (part size, timeouts, retries): defaults, checks
    s3_reader.py    its reads: window cache, one-GET streams
    s3_upload.py    its uploads (MultipartSink): CRC32s the store checks, back-off
    testing/        the contract suite every backend runs (BackendContract) and
                    FaultyBackend; imports pytest, so nothing imports it from here
"""

from __future__ import annotations

from ckptstore.layout import MANIFEST_FILE, TEMP_PREFIX, check_name
from ckptstore.storage.base import (
    Capabilities,
    FileSink,
    PendingCheckpoint,
    RangeReader,
    StorageBackend,
)
from ckptstore.storage.local import LocalBackend
from ckptstore.storage.objectstore import FsspecBackend, ObjectStoreReader
from ckptstore.storage.registry import BackendFactory, open_backend, register_backend
from ckptstore.storage.s3 import S3Backend

__all__ = [
    "MANIFEST_FILE",
    "TEMP_PREFIX",
    "BackendFactory",
    "Capabilities",
    "FileSink",
    "FsspecBackend",
    "LocalBackend",
    "ObjectStoreReader",
    "PendingCheckpoint",
    "RangeReader",
    "S3Backend",
    "StorageBackend",
    "check_name",
    "open_backend",
    "register_backend",
]
