"""The storage interface: one checkpoint root on one file system.

Everything above this layer speaks in *names* relative to the root (``step_00000500``,
``step_00000500/manifest.json``); only backends know paths, URLs, fds and errnos.
Backend errors are translated here, once, into :mod:`ckptstore.errors`.

Call order for one checkpoint write::

    pending = backend.begin("step_00000500")      # coordinator rank, writer thread
    # other ranks: backend.attach(pending.token)   (token travels in DCP's plan)
    sink = pending.create_file("__0_0.distcp")    # every rank, writer thread
    sink.write(...); sink.close()                 # durable when close() returns
    pending.write_file(".metadata", data)         # coordinator
    pending.commit(manifest_bytes)                # coordinator: the atomic switch
    # or, on any failure: pending.abort()         # coordinator, best effort

Until ``commit`` returns, nothing of the checkpoint is visible to ``list_names`` under
its final name with a manifest: local disk writes into a temp directory renamed at
commit; object stores write the manifest last. Readers treat a name without a valid
manifest as absent.

Backends are used from several threads at once (writer thread, codec pool, caller):
implementations keep no per-call state on the backend object itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class FileSink(ABC):
    """A file being written once, front to back. Not thread-safe: one writer thread."""

    @abstractmethod
    def write(self, data: Any) -> None:
        """Append a bytes-like object."""

    @abstractmethod
    def tell(self) -> int:
        """Bytes written so far."""

    def align(self, boundary: int) -> None:  # noqa: B027 - optional hook, default no-op
        """Pad with zeros to a multiple of ``boundary`` if the sink writes faster that way.

        The shard writer calls this before large uncompressed tensors so that they can
        go from the staging buffer to disk without a copy (O_DIRECT).
        """

    @abstractmethod
    def close(self) -> int:
        """Flush and make the data durable (fsync on disk); return the file size."""

    @abstractmethod
    def abort(self) -> None:
        """Drop the file's handle without making it durable; never raises."""

    @property
    def wants_alignment(self) -> bool:
        return False


class RangeReader(ABC):
    """Random access to one stored file. Thread-safe: chunks are read in parallel."""

    size: int

    @abstractmethod
    def read(self, offset: int, length: int) -> memoryview:
        """Exactly ``length`` bytes at ``offset``; a short read is an error."""

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` from ``offset`` (backends that can, read without a copy)."""
        out[:] = self.read(offset, out.nbytes)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the handle."""

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PendingCheckpoint(ABC):
    """A checkpoint being written: invisible until :meth:`commit`."""

    token: str  # identifies it to attach() on other ranks

    def stored_name(self, name: str) -> str:
        """The name under which a save stores its file ``name`` in this attempt.

        The checkpoint writer creates its files under these names and lists them in
        the manifest. Object stores make them unique per attempt, so that two writers
        racing for one checkpoint never write or delete each other's objects; local
        disk writes each attempt into its own temp directory and keeps ``name``.
        Copies call :meth:`create_file` with the source's names as they are.
        """
        return name

    @abstractmethod
    def create_file(self, name: str) -> FileSink:
        """A new file inside the checkpoint; never replaces one."""

    def write_file(self, name: str, data: bytes) -> None:
        """Write a small file in one go, durably."""
        sink = self.create_file(name)
        try:
            sink.write(data)
            sink.close()
        except BaseException:
            sink.abort()
            raise

    @abstractmethod
    def commit(self, manifest: bytes) -> None:
        """Write the manifest and make the checkpoint visible, atomically and durably.

        Raises :class:`~ckptstore.errors.CheckpointExistsError` if another writer
        committed the same name first; the other checkpoint is left untouched.
        """

    @abstractmethod
    def abort(self) -> None:
        """Remove what this pending checkpoint wrote; best effort, never raises."""


class StorageBackend(ABC):
    """A checkpoint root: a directory on disk or a prefix in a bucket."""

    url: str  # for messages; never carries credentials

    @abstractmethod
    def list_names(self) -> list[str]:
        """Names directly under the root (checkpoints, temp entries, other files)."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether ``name`` (a file) exists."""

    @abstractmethod
    def read_bytes(self, name: str) -> bytes:
        """A whole (small) file; :class:`FileNotFoundError` subclass if absent."""

    @abstractmethod
    def open_reader(self, name: str) -> RangeReader:
        """Random access to a (large) file."""

    @abstractmethod
    def begin(self, name: str) -> PendingCheckpoint:
        """Start writing checkpoint ``name`` (coordinator)."""

    @abstractmethod
    def attach(self, token: str) -> PendingCheckpoint:
        """Join a pending checkpoint started by the coordinator (other ranks)."""

    @abstractmethod
    def put_atomic(self, name: str, data: bytes) -> None:
        """Create or replace the small file ``name`` under the root, atomically and durably.

        Readers see the old content or the new one, never a mix (the ``latest`` pointer).
        """

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete a committed checkpoint, manifest first so it is never half-listed."""

    @abstractmethod
    def sweep(self, grace_s: float) -> list[str]:
        """Remove leftovers of dead saves older than ``grace_s``; return what was removed.

        A save in progress in this process is never removed. One in another process is
        protected by a lock where the file system has them (local disk: whatever its
        age) and by ``grace_s`` where it does not (object stores): there, choose a grace
        period longer than the slowest save.
        """

    def check_access(self) -> None:  # noqa: B027 - optional hook
        """Fail now, with a message that says what to fix, if the root is unusable
        (missing bucket, wrong credentials); network trouble raises StorageError."""

    def is_local(self) -> bool:
        """True when this is a POSIX file system on this machine."""
        return False

    def join(self, *names: str) -> str:
        """``name/inner`` in this backend's naming (always '/')."""
        return "/".join(names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
