"""On-storage format: the manifest, shard files, checksums."""

from ckptstore.format.manifest import FORMAT_VERSION, FileEntry, Manifest
from ckptstore.format.shard import DEFAULT_CHUNK_BYTES, ShardInfo, ShardReader, ShardWriter
from ckptstore.layout import MANIFEST_FILE

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
