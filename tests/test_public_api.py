"""The public surface is pinned; importing the package is cheap."""

from __future__ import annotations

from helpers import run_python

import ckptstore

EXPECTED = [
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


def test_all_is_pinned_and_sorted():
    assert ckptstore.__all__ == EXPECTED
    assert sorted(ckptstore.__all__, key=str.lower) == sorted(EXPECTED, key=str.lower)
    for name in ckptstore.__all__:
        assert hasattr(ckptstore, name), name


def test_error_tree():
    for name in EXPECTED:
        obj = getattr(ckptstore, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, ckptstore.CkptStoreError), name
            assert issubclass(obj, Exception), f"{name} must not be a bare BaseException"
    assert issubclass(ckptstore.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(ckptstore.CheckpointExistsError, FileExistsError)
    assert issubclass(ckptstore.IncompatibleCheckpointError, ValueError)
    assert issubclass(ckptstore.StorageFullError, OSError)
    assert issubclass(ckptstore.UnsafeCheckpointError, ckptstore.CorruptCheckpointError)
    assert issubclass(ckptstore.InvalidArgumentError, ValueError)
    assert issubclass(ckptstore.InvalidArgumentTypeError, ckptstore.InvalidArgumentError)
    assert issubclass(ckptstore.InvalidArgumentTypeError, TypeError)


def test_import_starts_nothing_and_pulls_no_cloud_sdk():
    proc = run_python(
        """
        import sys, threading
        before = threading.active_count()
        import ckptstore
        assert threading.active_count() == before, "import started a thread"
        for mod in ("s3fs", "botocore", "aiobotocore", "fsspec.implementations.memory"):
            assert mod not in sys.modules, mod
        print("OK")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"
