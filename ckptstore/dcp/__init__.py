"""The DCP adapter: a StorageWriter/StorageReader pair over ckptstore's format.

::

    writer.py    CkptStorageWriter: DCP's write items into shard files, the manifest
    raw.py       an item's raw bytes (tensor_bytes) and its key in a shard's index
    reader.py    CkptStorageReader: read items out of shard files, checked
    planner.py   the save planner of staged states; SafeLoadPlanner (no arbitrary unpickling)
    packs.py     many small tensors stored in groups, listed one by one in .metadata
    metadata.py  .metadata: pickled by DCP's classes, unpickled through an allowlist
    plancache.py plans, metadata and item tables reused while the state's layout holds
    incremental.py  incremental saves: unchanged items linked from the last save, not written
    driver.py    DCP's save steps (with the plan cache) and load entry point, errors unwrapped
"""

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
