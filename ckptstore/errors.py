"""Every error ckptstore raises on purpose.

One tree, rooted at :class:`CkptStoreError`. Each leaf also subclasses the builtin it
means, so ``except FileNotFoundError`` or ``except OSError`` in existing code keeps
working::

    CkptStoreError(Exception)
    ├── CheckpointNotFoundError        (+ FileNotFoundError)  nothing committed there
    │   └── PartElsewhereError                                needs another node-local disk's part
    ├── CheckpointExistsError          (+ FileExistsError)    step already committed
    │   ├── ManifestExistsError                               lost a conditional manifest put
    │   └── NewerCheckpointsError                             resuming would train past newer ones
    ├── CorruptCheckpointError         (+ OSError)            bytes on storage are wrong
    │   ├── UnsafeCheckpointError                             refused unread: unsafe or unsigned
    │   └── PartRefusedError                                  a node's part will not reach the backup
    ├── IncompatibleCheckpointError    (+ ValueError)         keys / shapes / format differ
    ├── ExportError                    (+ ValueError)         cannot convert to / from a file
    ├── UnsupportedStateError          (+ TypeError)          a value ckptstore cannot save
    ├── InvalidArgumentError           (+ ValueError)         a public call's argument is wrong
    │   ├── InvalidArgumentTypeError   (+ TypeError)          ... of the wrong type
    │   └── RanksDisagreeError                                ranks set up differently for one save
    ├── StorageError                   (+ OSError)            I/O failed; errno kept
    │   ├── StorageFullError                                  ENOSPC / quota
    │   └── PartsMissingError                                 other nodes' parts never reached the backup
    ├── BackgroundSaveError                                   an earlier async save failed
    ├── RankFailedError                                       another rank's loop failed
    ├── InvalidOperationError          (+ RuntimeError)       called in the wrong state
    │   ├── CheckpointerClosedError                           used after close()
    │   └── StateChangedError                                 changed while copied in the background
    ├── CopyStoppedError                                      a copy was asked to stop
    ├── WriterLeaseError                                      another process writes this root
    ├── CliError                                              a command failed; carries its exit code
    └── BenchError                                            a benchmark's setup is wrong (exit 2)

Messages say what was expected, what was found and what to do next. Errors cross
process boundaries (DCP gathers them from every rank with pickle), so every class here
pickles with its attributes: ``BaseException.__reduce__`` carries ``__dict__``.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "BackgroundSaveError",
    "BenchError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CheckpointerClosedError",
    "CkptStoreError",
    "CliError",
    "CopyStoppedError",
    "CorruptCheckpointError",
    "ExportError",
    "IncompatibleCheckpointError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "InvalidOperationError",
    "ManifestExistsError",
    "NewerCheckpointsError",
    "PartElsewhereError",
    "PartRefusedError",
    "RankFailedError",
    "RanksDisagreeError",
    "StateChangedError",
    "StorageError",
    "StorageFullError",
    "UnsafeCheckpointError",
    "UnsupportedStateError",
    "WriterLeaseError",
]


class CkptStoreError(Exception):
    """Root of every error ckptstore raises on purpose."""


class CheckpointNotFoundError(CkptStoreError, FileNotFoundError):
    """No committed checkpoint at the requested place or step."""


class PartElsewhereError(CheckpointNotFoundError):
    """This disk's part of a checkpoint saved to node-local disks, read by a rank that
    needs data another node wrote: it loads on the shape that saved it, or from its
    backup (where the parts are one checkpoint)."""


class CheckpointExistsError(CkptStoreError, FileExistsError):
    """A committed checkpoint already holds that step; ckptstore never overwrites one."""


class NewerCheckpointsError(CheckpointExistsError):
    """A restore (``newer="refuse"``) found checkpoints newer than the one it restored
    (or, restoring nothing, any checkpoint): training on would save over their steps.
    Nothing was changed; ``names`` lists them, ``what`` says what is where."""

    def __init__(self, message: str, names: list[str] | None = None, what: str = "") -> None:
        super().__init__(message)
        self.names = list(names or [])
        self.what = what or message  # the facts alone, without advice


class CorruptCheckpointError(CkptStoreError, OSError):
    """What is on storage does not match what the manifest promises.

    Subclasses ``OSError`` like :class:`gzip.BadGzipFile`: the bytes read back are bad.
    """


class UnsafeCheckpointError(CorruptCheckpointError):
    """Refused unread: the checkpoint asks to unpickle something outside the allowed set,
    or a manifest key is configured and its manifest's HMAC is missing or wrong."""


class PartRefusedError(CorruptCheckpointError):
    """Node-local disks: another node did not upload its part of a checkpoint to the
    backup (its copy is damaged), so rank 0 does not commit that checkpoint there."""


class IncompatibleCheckpointError(CkptStoreError, ValueError):
    """The checkpoint is intact but does not fit: format version, keys, shapes."""


class UnsupportedStateError(CkptStoreError, TypeError):
    """A ``state_dict`` value that ckptstore cannot save and load back safely."""


class InvalidArgumentError(CkptStoreError, ValueError):
    """Misuse: an argument of a public call (a step, a root, a codec, a config field)
    that can never work. Raised before anything is read or written."""


class RanksDisagreeError(InvalidArgumentError):
    """The ranks of one save were set up differently (one given ``incremental=True``,
    another not: a launch mistake); every save fails the same way until they agree."""


class InvalidArgumentTypeError(InvalidArgumentError, TypeError):
    """Misuse: an argument of the wrong type (a string or a tensor as a step). Also a
    ``ValueError``, as every :class:`InvalidArgumentError` is."""


class StorageError(CkptStoreError, OSError):
    """An I/O operation failed at the storage boundary. ``errno`` and ``filename`` are kept."""


class PartsMissingError(StorageError):
    """Node-local disks: the other nodes' shard files of a checkpoint did not reach the
    backup in time (a node that cannot reach the store leaves no word why)."""


class StorageFullError(StorageError):
    """The destination ran out of space (ENOSPC / EDQUOT)."""


class BackgroundSaveError(CkptStoreError):
    """An earlier asynchronous save failed; raised by the next ``save_async``, ``wait``
    or ``close``.

    ``step`` is the step that failed; the original error is ``__cause__``. When raised
    by ``save_async``, the save that call asked for was still started (every rank must
    enter every save, or ranks fall out of step): its handle is ``pending``.
    """

    def __init__(self, message: str, *, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.pending: object | None = None


class RankFailedError(CkptStoreError):
    """Another rank's training loop failed; this rank stops too (raised by ``maybe_save``)."""


class InvalidOperationError(CkptStoreError, RuntimeError):
    """An operation called in a state that does not allow it."""


class CheckpointerClosedError(InvalidOperationError):
    """The :class:`~ckptstore.Checkpointer` was closed; make a new one."""


class StateChangedError(InvalidOperationError):
    """Tensors of a state changed while a background copy of them was running (an
    in-place edit outside ``optimizer.step()``, which ckptstore waits for), or, with
    ``trust_version_counters=True``, a tensor earlier saves found unchanged hashed
    differently after the save returned: that save was abandoned rather than written
    torn or stale. ``names`` lists what changed."""

    def __init__(self, message: str, names: list[str] | None = None) -> None:
        super().__init__(message)
        self.names = list(names or [])


class ManifestExistsError(CheckpointExistsError):
    """An object store's conditional put of a manifest found one there already: another
    writer committed this checkpoint first. Raised and caught inside the storage layer."""


class ExportError(CkptStoreError, ValueError):
    """A checkpoint cannot be exported to, or imported from, the file asked for."""


class CopyStoppedError(CkptStoreError):
    """A copy between roots was asked to stop (Ctrl+C, or a replicator closing without
    waiting); nothing of the checkpoint it was copying was committed."""


class WriterLeaseError(CkptStoreError):
    """Another process holds the writer lease on this root (two training runs started on
    one checkpoint directory). ``holder`` is what it recorded: host, pid, since."""

    def __init__(self, message: str, *, holder: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.holder = holder


# Exit statuses of the command line (``ckptstore``): 0 ok, 1 failed, 2 usage.
EXIT_FAILED = 1
EXIT_USAGE = 2


class CliError(CkptStoreError):
    """A command-line failure to report in one line that says what to do next; ``code``
    is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class BenchError(CkptStoreError):
    """A problem with a benchmark's setup (target, space): said plainly, exit status 2."""


# The advice that errors reading a checkpoint end with ("...; <hint>"): run verify. One
# text each, here, so that ``ckptstore verify``, which is that advice, strips it from
# the problems it reports (:func:`without_verify_hint`) whatever the wording becomes.
HINT_DAMAGED_FILE = (
    "restore an earlier checkpoint, or run `ckptstore verify ROOT` to see what else is damaged"
)
HINT_DAMAGED_METADATA = (
    "restore an earlier checkpoint, or run `ckptstore verify ROOT` (Checkpointer.verify in Python)"
)
HINT_DAMAGED_MANIFEST = "restore an earlier checkpoint, or run `ckptstore verify` on this one"
_READ_VERIFY_NOTE = " (`ckptstore verify ROOT` checks every checkpoint under ROOT)"
HINT_READ_FAILED = (
    f"check that the storage is reachable and the checkpoint complete{_READ_VERIFY_NOTE}"
)


def without_verify_hint(problem: str) -> str:
    """``problem`` without the advice to run verify that errors reading a checkpoint
    give (for verify's own report)."""
    for hint in (HINT_DAMAGED_FILE, HINT_DAMAGED_METADATA, HINT_DAMAGED_MANIFEST):
        problem = problem.replace(f"; {hint}", "")
    return problem.replace(_READ_VERIFY_NOTE, "")


def storage_error(exc: OSError, action: str, path: str) -> StorageError:
    """Translate an ``OSError`` from a backend into a :class:`StorageError` once.

    ``action`` is what we were doing ("write", "fsync", "rename"); ``path`` is the
    file. ENOSPC and EDQUOT become :class:`StorageFullError`.
    """
    if isinstance(exc, StorageError):
        return exc
    code = exc.errno
    reason = exc.strerror or str(exc) or type(exc).__name__
    cls = StorageFullError if code in (_errno.ENOSPC, _errno.EDQUOT) else StorageError
    if cls is StorageFullError:
        hint = (
            "free space on that file system (or keep fewer checkpoints: retention deletes "
            "old ones only after the next one is committed, so the space must hold one "
            "more than you keep; `ckptstore prune ROOT --keep-last N --yes` frees it now) "
            "and save again"
        )
    elif action in ("read", "open", "stat", "list"):
        hint = HINT_READ_FAILED
    else:
        hint = "check the path, its permissions and the device, then save again"
    if code is None:
        err = cls(f"{action} {path} failed: {reason}; {hint}")
    else:
        err = cls(code, f"{action} failed: {reason}; {hint}", path)
    return err
