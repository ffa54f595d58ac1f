"""The DCP adapter: a StorageWriter/StorageReader pair over ckptstore's format."""

from ckptstore.dcp.planner import SafeLoadPlanner, SerializedValue, StagedSavePlanner
from ckptstore.dcp.reader import CkptStorageReader
from ckptstore.dcp.writer import CkptStorageWriter

__all__ = [
    "CkptStorageReader",
    "CkptStorageWriter",
    "SafeLoadPlanner",
    "SerializedValue",
    "StagedSavePlanner",
]
