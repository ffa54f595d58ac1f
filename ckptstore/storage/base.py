"""The storage interface: one checkpoint root on one file system.

Everything above this layer speaks in *names* relative to the root (``step_00000500``,
``step_00000500/manifest.json``); only backends know paths, URLs, fds and errnos.
Backend errors are translated once, at this boundary, into :mod:`ckptstore.errors`:
callers see :class:`~ckptstore.errors.StorageError` (errno kept) for I/O failures,
a :class:`FileNotFoundError` subclass for "absent", and :class:`ValueError` for a name
that :func:`~ckptstore.layout.check_name` refuses.

Who calls what, in which order, for one checkpoint write (DCP's save, driven by
``ckptstore.dcp.writer``; every step runs on the checkpointer's writer thread, or the
caller's thread for a synchronous save)::

    pending = backend.begin("step_00000500")       # coordinator rank, once
    #   pending.token travels to the other ranks inside DCP's plan
    pending = backend.attach(token)                 # every other rank, once
    name = pending.stored_name("__0_0.distcp")      # every rank: its shard's name
    sink = pending.create_file(name)                # every rank
    sink.write(...); sink.align(...); sink.tell()   # one thread per sink, front to back
    sink.close()                                    # durable when it returns
    pending.write_file(pending.stored_name(".metadata"), data)   # coordinator
    pending.commit(manifest_bytes)                  # coordinator: the atomic switch
    # or, on any failure on any rank: pending.abort()   (coordinator, best effort)

Until ``commit`` returns, nothing of the checkpoint is visible under its final name
with a manifest: local disk writes into a temp directory renamed at commit; object
stores write the manifest last. Readers treat a name without a valid manifest as absent.

Reads (load, verify, list, copies) come from any thread: ``list_names``, ``exists``,
``read_bytes`` and ``open_reader``; one :class:`RangeReader` is read by several
threads at once. Housekeeping runs on one rank (the coordinator): ``sweep`` when a
checkpointer opens the root, ``put_atomic`` (the ``latest`` pointer) and ``delete``
(retention) on the manager's housekeeping thread, the replicator's thread or the
command line, possibly while a save is in flight.

Backends are used from several threads at once (writer thread, codec pool, caller):
implementations keep no per-call state on the backend object itself.

What a backend can do beyond this contract is declared, not probed: its
:attr:`StorageBackend.capabilities` (a frozen :class:`Capabilities`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ckptstore.errors import InvalidOperationError


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the contract; read as ``backend.capabilities``.

    Every field defaults to the conservative answer, so a backend that declares nothing
    is treated as a plain object store.
    """

    local: bool = False
    """A POSIX file system on this machine: files have fds, ``fsync`` makes them
    durable, and local-disk speeds apply (no compression by default, short sweep grace)."""

    atomic_rename: bool = False
    """A pending checkpoint lives under a temp name and ``commit`` renames it into place
    in one atomic, durable step; its files keep their own names
    (:meth:`PendingCheckpoint.stored_name` is the identity)."""

    conditional_put: bool = False
    """``commit`` creates the manifest only if absent, in one request (S3
    ``If-None-Match: *``), so two writers racing for one name cannot both win. Without
    it, an object store commits by check-then-put."""

    save_locks: bool = False
    """A save in progress holds a lock that dies with its process, so :meth:`sweep` can
    tell it from a dead one's leftovers whatever its age (where the file system has
    locks; elsewhere it goes by age). Without it sweep goes by ``grace_s`` alone."""

    read_only: bool = False
    """Writes (``begin``, ``put_atomic``, ``delete``, ``sweep``) are refused."""

    direct_io: bool = False
    """Sinks may write with ``O_DIRECT``, straight from the caller's buffer: a sink's
    live answer is :attr:`FileSink.wants_alignment` (it may fall back to buffered
    writes, e.g. where the file system refuses direct I/O)."""

    alignment_bytes: int = 1
    """The buffer address and length multiple that direct I/O needs (1: none)."""

    multipart_uploads: bool = False
    """Files are uploaded in parts that can outlive a dead process: the backend has
    ``open_uploads()`` (those under the root) and ``abort_orphans()`` (abort again the
    ones whose abort failed)."""

    streaming_reads: bool = False
    """Its readers have ``stream(piece_bytes)``: the whole file front to back from one
    request, cheaper than a ranged read per piece."""

    def __post_init__(self) -> None:
        a = self.alignment_bytes
        if isinstance(a, bool) or not isinstance(a, int) or a < 1 or a & (a - 1):
            raise ValueError(f"alignment_bytes must be a power of two >= 1, got {a!r}")
        if self.direct_io and a == 1:
            raise ValueError("direct_io needs alignment_bytes > 1 (the device block size)")


class FileSink(ABC):
    """A file being written once, front to back.

    Made by :meth:`PendingCheckpoint.create_file`; used by one thread only (the rank's
    writer thread), in the order ``write``/``align``/``tell`` ..., then exactly one of
    ``close`` (success) or ``abort`` (failure). Nothing of the file is promised durable,
    or even present, before ``close`` returns.
    """

    @abstractmethod
    def write(self, data: Any) -> None:
        """Append a bytes-like object (any buffer: bytes, memoryview, numpy array)."""

    @abstractmethod
    def tell(self) -> int:
        """Bytes written so far (padding from :meth:`align` included)."""

    def align(self, boundary: int) -> None:  # noqa: B027 - optional hook, default no-op
        """Pad with zeros to a multiple of ``boundary`` if the sink writes faster that way.

        The shard writer calls this before large uncompressed tensors so that they can
        go from the staging buffer to disk without a copy (O_DIRECT).
        """

    @abstractmethod
    def close(self) -> int:
        """Flush and make the data durable (fsync on disk); return the file size.

        A second call returns the size again; after a failed write or close it raises
        again (a failure is never turned into success).
        """

    @abstractmethod
    def abort(self) -> None:
        """Drop the file's handle without making it durable; never raises."""

    @property
    def wants_alignment(self) -> bool:
        """Whether :meth:`align` pads now. Live, unlike :attr:`Capabilities.direct_io`:
        a sink that started with direct I/O may have fallen back to buffered writes."""
        return False


class RangeReader(ABC):
    """Random access to one stored file, from :meth:`StorageBackend.open_reader`.

    Thread-safe: a load reads chunks of one file from several threads at once.
    The opener closes it (or uses it as a context manager).
    """

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
    """A checkpoint being written: invisible until :meth:`commit`.

    The coordinator gets it from :meth:`StorageBackend.begin`, the other ranks from
    :meth:`StorageBackend.attach` with the coordinator's :attr:`token`. Every rank calls
    :meth:`stored_name` and :meth:`create_file` (from its writer thread; several files
    of one pending checkpoint may be written from several threads at once); only the
    coordinator calls :meth:`commit` or :meth:`abort`, once all ranks' files are closed.
    """

    token: str  # identifies it to attach() on other ranks; a plain string

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
    def create_file(self, name: str, size_hint: int | None = None) -> FileSink:
        """A new file inside the checkpoint; never replaces one. ``size_hint``: its
        size, where the writer knows it (a copy) or expects it (an incremental save):
        object stores size their parts by it (local disk can write a small file
        through the page cache: ``_direct_io.BUFFERED_BYTES``, off by default). A file
        may still end up larger."""

    def write_file(self, name: str, data: bytes) -> None:
        """Write a small file in one go, durably."""
        sink = self.create_file(name)
        try:
            sink.write(data)
            sink.close()
        except BaseException:
            sink.abort()
            raise

    def link_files(self, links: dict[str, str]) -> bool:
        """Make each file ``name`` of this checkpoint share the bytes of ``links[name]``
        (``"<checkpoint>/<file>"`` under the same root, committed): all of them or
        none. False where the store cannot (no hard links, another file system, the
        source gone): the caller then writes the bytes. Incremental saves use it."""
        return False

    @abstractmethod
    def commit(self, manifest: bytes) -> None:
        """Write the manifest and make the checkpoint visible, atomically and durably.

        Coordinator only (others raise :class:`~ckptstore.errors.InvalidOperationError`).
        Raises :class:`~ckptstore.errors.CheckpointExistsError` if another writer
        committed the same name first; the other checkpoint is left untouched.
        """

    def release(self) -> None:  # noqa: B027 - optional hook
        """Let go of a pending checkpoint that another rank commits or aborts."""

    @abstractmethod
    def abort(self) -> None:
        """Remove what this pending checkpoint wrote; best effort, never raises, and
        may be called more than once (also after a failed commit)."""


class StorageBackend(ABC):
    """A checkpoint root: a directory on disk or a prefix in a bucket.

    Opened by :func:`ckptstore.storage.open_backend` from a path or URL (or built
    directly); one object per root per process is usual, but several (one per rank,
    or another process) may work on one root at once: see the module docstring for
    who calls what.
    """

    url: str  # for messages; never carries credentials
    # sweep() removes nothing younger than this, whatever grace it is given
    min_sweep_age_s: float = 0.0

    @property
    def capabilities(self) -> Capabilities:
        """What this backend can do beyond the contract (default: nothing)."""
        return Capabilities()

    @abstractmethod
    def list_names(self) -> list[str]:
        """Names directly under the root (checkpoints, temp entries, other files), sorted."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether ``name`` (a file) exists."""

    def version_tag(self, name: str) -> str | None:
        """What changes whenever file ``name`` is written again (S3: its ETag), or None
        where the store has no such thing or the file is not there (default)."""
        return None

    @abstractmethod
    def read_bytes(self, name: str) -> bytes:
        """A whole (small) file; :class:`FileNotFoundError` subclass if absent."""

    @abstractmethod
    def open_reader(self, name: str) -> RangeReader:
        """Random access to a (large) file; :class:`FileNotFoundError` subclass if absent."""

    @abstractmethod
    def begin(self, name: str) -> PendingCheckpoint:
        """Start writing checkpoint ``name`` (coordinator, writer thread).

        Raises :class:`~ckptstore.errors.CheckpointExistsError` if ``name`` is committed.
        """

    @abstractmethod
    def attach(self, token: str) -> PendingCheckpoint:
        """Join a pending checkpoint started by the coordinator (other ranks)."""

    def disk_id(self) -> str:
        """Names the storage this root lies on, the same from every process that sees it.

        Ranks whose roots have different ids write a checkpoint in parts, one per disk
        (node-local disks: :mod:`ckptstore.dcp.parts`). An object store is one store:
        its URL."""
        return self.url

    def join_part(self, token: str, name: str | None) -> PendingCheckpoint:
        """On a disk the coordinator's root is not on: this disk's part of the pending
        checkpoint ``token``, created by the first rank to join; ``name`` for the rank
        that commits the part. Only backends whose ``disk_id`` can differ between ranks
        need it."""
        raise InvalidOperationError(f"{self.url} cannot hold a part of a checkpoint")

    @abstractmethod
    def put_atomic(self, name: str, data: bytes) -> None:
        """Create or replace the small file ``name`` under the root, atomically and durably.

        Readers see the old content or the new one, never a mix (the ``latest`` pointer).
        """

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete a committed checkpoint, manifest first so it is never half-listed.
        Deleting a name that is not there does nothing."""

    def swap(self, name: str, other: str) -> bool:
        """Exchange two committed checkpoints' names in one atomic step (each is under
        one of the two names at every moment); False where this backend cannot, and
        then nothing was changed. Local disk on Linux can (``RENAME_EXCHANGE``)."""
        return False

    def discard_uncommitted(self, name: str, files: list[str]) -> list[str]:
        """Remove those of ``files`` (names in ``name``) that are there while ``name`` is
        not committed: leftovers of a dead attempt at writing them, which a new attempt
        writes again (files are written once: it would fail on them). Return those
        removed. Raises :class:`~ckptstore.errors.CheckpointExistsError` once ``name``
        is committed. Node-local part backups use it on object stores; elsewhere (a
        local root writes into a temp directory) nothing is left to discard."""
        return []

    def foreign_files(self, name: str) -> list[str]:
        """What lies under ``name`` that ckptstore does not write (a subdirectory named
        with a trailing ``/``; :func:`ckptstore.layout.written_by_ckptstore`). A name
        holding any is someone else's, never deleted as a dead save's leftovers (a
        replace, ``sweep``). A backend that cannot list them says so with a
        placeholder, which keeps ``name`` too."""
        return [f"{name}/* (this backend cannot list them)"]

    def move_aside(self, name: str, new_name: str) -> None:
        """Move the entry ``name`` (a damaged checkpoint, or a stray at a checkpoint's
        name) to ``new_name`` under the root, keeping its content for inspection.

        Called on the coordinator by the manager's restore and by ``ckptstore
        quarantine``. A backend that cannot move entries raises
        :class:`~ckptstore.errors.InvalidOperationError`.
        """
        raise InvalidOperationError(f"{self.url} cannot move {name} aside")

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

    def checks_uploads(self) -> bool:
        """Whether the store itself checks what it received against a checksum sent with
        it, and its sinks confirm each one (``FileSink.confirmed``): then a copy needs no
        read-back. False unless a backend shows it (S3: a probe)."""
        return False

    def is_local(self) -> bool:
        """True when this is a POSIX file system on this machine
        (``capabilities.local``; kept while callers move to the capabilities)."""
        return self.capabilities.local

    def join(self, *names: str) -> str:
        """``name/inner`` in this backend's naming (always '/')."""
        return "/".join(names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
