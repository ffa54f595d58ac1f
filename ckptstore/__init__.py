"""ckptstore: asynchronous, sharded, compressed, checksummed, atomically committed
checkpoints for PyTorch, on ``torch.distributed.checkpoint``.

::

    import ckptstore

    ckptstore.save(state_dict, "ckpt/final")            # synchronous, like dcp.save
    ckptstore.load(state_dict, "ckpt/final")            # in place, like dcp.load

    with ckptstore.Checkpointer("runs/exp1") as ckpt:   # numbered, asynchronous
        pending = ckpt.save_async(state_dict, step=500)  # returns after one copy
        ...
        ckpt.load(state_dict)                           # the latest

Importing this package is cheap: nothing runs at import beyond torch's own imports.
"""

from ckptstore.codecs.auto import AutoCodec
from ckptstore.config import BackupConfig, CheckpointerConfig, ManagerConfig
from ckptstore.engine.checkpointer import Checkpointer
from ckptstore.engine.oneshot import load, save
from ckptstore.engine.ops import CheckpointInfo
from ckptstore.engine.pending import PendingSave, SaveResult
from ckptstore.errors import (
    BackgroundSaveError,
    CheckpointerClosedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptStoreError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    RankFailedError,
    StorageError,
    StorageFullError,
    UnsafeCheckpointError,
    UnsupportedStateError,
    WriterLeaseError,
)
from ckptstore.integrations.data import ResumableDataLoader, ResumableSampler
from ckptstore.integrations.trainstate import TrainState
from ckptstore.manager import CheckpointManager, ManagedCheckpoint
from ckptstore.manager.policies import (
    AnyOf,
    KeepBest,
    KeepEvery,
    KeepFinal,
    KeepLast,
    SaveAt,
    SaveEvery,
)
from ckptstore.version import __version__

__all__ = [
    "AnyOf",
    "AutoCodec",
    "BackgroundSaveError",
    "BackupConfig",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "Checkpointer",
    "CheckpointerClosedError",
    "CheckpointerConfig",
    "CkptStoreError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "KeepBest",
    "KeepEvery",
    "KeepFinal",
    "KeepLast",
    "ManagedCheckpoint",
    "ManagerConfig",
    "PendingSave",
    "RankFailedError",
    "ResumableDataLoader",
    "ResumableSampler",
    "SaveAt",
    "SaveEvery",
    "SaveResult",
    "StorageError",
    "StorageFullError",
    "TrainState",
    "UnsafeCheckpointError",
    "UnsupportedStateError",
    "WriterLeaseError",
    "__version__",
    "load",
    "save",
]
