"""ckptstore: asynchronous, sharded, compressed, checksummed, atomically committed
checkpoints for PyTorch, on ``torch.distributed.checkpoint``.

::

    import ckptstore

    ckptstore.save(state_dict, "ckpt/final")            # synchronous, like dcp.save
    ckptstore.load(state_dict, "ckpt/final")            # in place, like dcp.load
    state_dict = ckptstore.read("ckpt/final")           # all of it, no target needed

    with ckptstore.Checkpointer("runs/exp1") as ckpt:   # numbered, asynchronous
        pending = ckpt.save_async(state_dict, step=500)  # returns after one copy
        ...
        ckpt.load(state_dict)                           # the latest

Importing this package is cheap: it imports no torch and nothing of its own beyond
``__version__``; each name in ``__all__`` is imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckptstore.version import __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time, __getattr__ below
    from ckptstore.codecs.auto import AutoCodec
    from ckptstore.config import BackupConfig, CheckpointerConfig, ManagerConfig
    from ckptstore.engine.checkpointer import Checkpointer
    from ckptstore.engine.listing import CheckpointInfo
    from ckptstore.engine.oneshot import load, read, save
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
        NewerCheckpointsError,
        RankFailedError,
        RanksDisagreeError,
        StateChangedError,
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

# Each public name and the module it is imported from when first asked for.
_LAZY: dict[str, str] = {
    "AnyOf": "ckptstore.manager.policies",
    "AutoCodec": "ckptstore.codecs.auto",
    "BackgroundSaveError": "ckptstore.errors",
    "BackupConfig": "ckptstore.config",
    "Checkpointer": "ckptstore.engine.checkpointer",
    "CheckpointerClosedError": "ckptstore.errors",
    "CheckpointerConfig": "ckptstore.config",
    "CheckpointExistsError": "ckptstore.errors",
    "CheckpointInfo": "ckptstore.engine.listing",
    "CheckpointManager": "ckptstore.manager",
    "CheckpointNotFoundError": "ckptstore.errors",
    "CkptStoreError": "ckptstore.errors",
    "CorruptCheckpointError": "ckptstore.errors",
    "IncompatibleCheckpointError": "ckptstore.errors",
    "InvalidArgumentError": "ckptstore.errors",
    "InvalidArgumentTypeError": "ckptstore.errors",
    "KeepBest": "ckptstore.manager.policies",
    "KeepEvery": "ckptstore.manager.policies",
    "KeepFinal": "ckptstore.manager.policies",
    "KeepLast": "ckptstore.manager.policies",
    "load": "ckptstore.engine.oneshot",
    "ManagedCheckpoint": "ckptstore.manager",
    "ManagerConfig": "ckptstore.config",
    "NewerCheckpointsError": "ckptstore.errors",
    "PendingSave": "ckptstore.engine.pending",
    "RankFailedError": "ckptstore.errors",
    "RanksDisagreeError": "ckptstore.errors",
    "read": "ckptstore.engine.oneshot",
    "ResumableDataLoader": "ckptstore.integrations.data",
    "ResumableSampler": "ckptstore.integrations.data",
    "save": "ckptstore.engine.oneshot",
    "SaveAt": "ckptstore.manager.policies",
    "SaveEvery": "ckptstore.manager.policies",
    "SaveResult": "ckptstore.engine.pending",
    "StateChangedError": "ckptstore.errors",
    "StorageError": "ckptstore.errors",
    "StorageFullError": "ckptstore.errors",
    "TrainState": "ckptstore.integrations.trainstate",
    "UnsafeCheckpointError": "ckptstore.errors",
    "UnsupportedStateError": "ckptstore.errors",
    "WriterLeaseError": "ckptstore.errors",
}

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
    "NewerCheckpointsError",
    "PendingSave",
    "RankFailedError",
    "RanksDisagreeError",
    "ResumableDataLoader",
    "ResumableSampler",
    "SaveAt",
    "SaveEvery",
    "SaveResult",
    "StateChangedError",
    "StorageError",
    "StorageFullError",
    "TrainState",
    "UnsafeCheckpointError",
    "UnsupportedStateError",
    "WriterLeaseError",
    "__version__",
    "load",
    "read",
    "save",
]


def __getattr__(name: str) -> Any:
    """``ckptstore.X`` and ``from ckptstore import X``: import X's module on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
