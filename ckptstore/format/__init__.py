"""On-storage format: the manifest, shard files, checksums.

The names below are imported on first use (PEP 562): the shard files need numpy and the
codecs, and reading a manifest (``ckptstore ls``) needs neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckptstore.format.manifest import FORMAT_VERSION, FileEntry, Manifest
    from ckptstore.format.shard import DEFAULT_CHUNK_BYTES, ShardInfo, ShardReader, ShardWriter
    from ckptstore.layout import MANIFEST_FILE

_LAZY = {
    "DEFAULT_CHUNK_BYTES": "ckptstore.format.shard",
    "FORMAT_VERSION": "ckptstore.format.manifest",
    "MANIFEST_FILE": "ckptstore.layout",
    "FileEntry": "ckptstore.format.manifest",
    "Manifest": "ckptstore.format.manifest",
    "ShardInfo": "ckptstore.format.shard",
    "ShardReader": "ckptstore.format.shard",
    "ShardWriter": "ckptstore.format.shard",
}

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "FileEntry",
    "Manifest",
    "ShardInfo",
    "ShardReader",
    "ShardWriter",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
