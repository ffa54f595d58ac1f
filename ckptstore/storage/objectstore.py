"""Any other fsspec file system (``memory://``, object stores): the manifest is the commit.

Object stores have no rename (s3fs's is copy + delete, not atomic), so a checkpoint's
files are written under their final prefix and the checkpoint exists from the moment
``manifest.json`` is written, last. A prefix without a manifest is invisible to every
reader, and :meth:`FsspecBackend.sweep` removes it once it is older than a grace period.

Each file is uploaded in one piece from memory when its sink closes, so an exception
while writing publishes nothing under the final key (s3fs publishes a truncated object
if an exception interrupts ``with fs.open(path, "wb")``). That holds one file in memory
per writer; :mod:`ckptstore.storage.s3` replaces it for S3 with bounded, parallel
multipart uploads and a conditional create of the manifest, through the hooks a
subclass overrides: :meth:`FsspecBackend.create_sink` (how a file is uploaded),
:meth:`FsspecBackend.create_manifest` (how the commit point is created) and
:meth:`FsspecBackend.open_reader` (with :class:`ObjectStoreReader` as the base for
ranged reads); :meth:`FsspecBackend.store_path` and :func:`translate_error` are theirs
to use.

Two writers racing to commit the same name: the first manifest wins; the loser removes
the files it wrote. A save names its files per attempt (``__0_0-<attempt>.distcp``,
``.metadata-<attempt>``, see :meth:`PendingCheckpoint.stored_name`) and its manifest lists
those names, so two writers never write, overwrite or delete the same object: the
winner's checkpoint is exactly what it wrote, whatever the loser did (a loser that
failed early used to delete a shared shard, leaving the winner's manifest pointing at a
missing or foreign file). Copies (backup, fetch) keep the names of their source.
"""

from __future__ import annotations

import contextlib
import errno
import json
import posixpath
import re
import time
import uuid
import weakref
from typing import Any

from ckptstore.crashpoints import crash_point
from ckptstore.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidOperationError,
    ManifestExistsError,
    StorageError,
    storage_error,
)
from ckptstore.layout import (
    MANIFEST_FILE,
    check_name,
    read_limit_bytes,
    set_aside_kind,
    written_by_ckptstore,
)
from ckptstore.storage.base import FileSink, PendingCheckpoint, RangeReader, StorageBackend

# Checkpoints being written by this process, on any backend object: sweep() spares them.
# Weak: a pending checkpoint nobody holds any more can never commit, so it is not live.
# (fsspec caches file system instances, so the same store is the same object.)
_LIVE: weakref.WeakValueDictionary[tuple[int, str], _FsspecPending] = weakref.WeakValueDictionary()


def translate_error(exc: Exception, action: str, path: str) -> StorageError:
    """The :class:`StorageError` for an exception from a file-system library (fsspec,
    s3fs, botocore), raised ``from exc`` by the caller.

    ``action`` says what we were doing ("upload", "read", "list"), ``path`` on what. An
    ``OSError`` keeps its errno (ENOSPC becomes :class:`StorageFullError`); anything
    else becomes a StorageError naming its type. Messages never include credentials:
    only the exception's own text and the object path.
    """
    if isinstance(exc, OSError):
        return storage_error(exc, action, path)
    return StorageError(f"{action} {path} failed: {type(exc).__name__}: {exc}")


class _MemorySink(FileSink):
    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path
        self._parts: list[bytes] = []
        self._size = 0
        self._closed = False

    def write(self, data: Any) -> None:
        mv = memoryview(data)
        if mv.nbytes == 0:
            return
        b = (
            data
            if isinstance(data, bytes)
            else bytes(mv.cast("B") if mv.c_contiguous else mv.tobytes())
        )
        self._parts.append(b)
        self._size += len(b)

    def tell(self) -> int:
        return self._size

    def close(self) -> int:
        if self._closed:
            return self._size
        try:
            self.fs.pipe_file(self.path, b"".join(self._parts))
        except Exception as exc:
            raise translate_error(exc, "upload", self.path) from exc
        finally:
            self._parts = []
        self._closed = True
        return self._size

    def abort(self) -> None:
        self._parts = []


class ObjectStoreReader(RangeReader):
    """Ranged reads of the object ``path`` on the fsspec file system ``fs``: one
    request per :meth:`read`; its size is asked for once, at open.

    Subclasses (S3's window cache) call :meth:`read` of this class for the requests
    they do make. A missing object raises :class:`FileNotFoundError` at open.
    """

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path
        try:
            self.size = int(fs.size(path))
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise translate_error(exc, "stat", path) from exc

    def read(self, offset: int, length: int) -> memoryview:
        if offset < 0 or offset + length > self.size:
            raise StorageError(
                f"read of {length} B at {offset} runs past the end of {self.path} ({self.size} B)"
            )
        if length == 0:  # s3fs reads the whole object for an empty range
            return memoryview(b"")
        try:
            data = self.fs.cat_file(self.path, start=offset, end=offset + length)
        except Exception as exc:
            raise translate_error(exc, "read", self.path) from exc
        if len(data) != length:
            raise StorageError(f"short read from {self.path}: {len(data)} of {length} B")
        return memoryview(data)


# A pending checkpoint's token: "<name>#<attempt>" (the attempt id travels to every rank).
_ATTEMPT = re.compile(r"^(?P<name>.+)#(?P<attempt>[0-9a-f]{12})$")


class _FsspecPending(PendingCheckpoint):
    def __init__(
        self, backend: FsspecBackend, name: str, coordinator: bool, attempt: str | None = None
    ) -> None:
        self.name = name
        self.attempt = attempt or uuid.uuid4().hex[:12]
        self.token = f"{name}#{self.attempt}"
        self._backend = backend
        self._coordinator = coordinator
        self._written: list[str] = []
        if coordinator:
            _LIVE[backend._live_key(name)] = self

    def stored_name(self, name: str) -> str:
        """``__0_0.distcp`` -> ``__0_0-<attempt>.distcp``, ``.metadata`` -> ``.metadata-<attempt>``."""
        stem, ext = posixpath.splitext(check_name(name, what="file name"))
        return f"{stem}-{self.attempt}{ext}"

    def create_file(self, name: str, size_hint: int | None = None) -> FileSink:
        check_name(name, what="file name")
        path = self._backend.store_path(f"{self.name}/{name}")
        # A name this attempt made (stored_name) is new by construction: no probe (on S3
        # a HEAD and a LIST, per file per rank per save). Copies keep their names: probed.
        if name == self.stored_name(name.replace(f"-{self.attempt}", "")):
            exists = False
        else:
            try:
                exists = self._backend.object_exists(path)
            except Exception as exc:
                raise translate_error(exc, "stat", path) from exc
        if exists:
            raise StorageError(
                errno.EEXIST, "file exists; a checkpoint's files are written once", path
            )
        self._written.append(path)
        return self._backend.create_sink(path, size_hint)

    def link_files(self, links: dict[str, str]) -> bool:
        # No links in an object store: a copy inside the store (S3's CopyObject), which
        # sends no bytes from this machine; each checkpoint keeps its own copy.
        made: list[str] = []
        try:
            for name, source in links.items():
                path = self._backend.store_path(f"{self.name}/{check_name(name)}")
                if self._backend.object_exists(path):  # another copy's: never ours to remove
                    raise FileExistsError(path)
                self._backend.copy_inside(self._backend.store_path(source), path)
                made.append(path)
        except Exception:
            for path in made:
                with contextlib.suppress(Exception):
                    self._backend.fs.rm_file(path)
            return False
        self._written.extend(made)
        return True

    def commit(self, manifest: bytes) -> None:
        if not self._coordinator:
            raise InvalidOperationError("only the rank that began a checkpoint commits it")
        path = self._backend.store_path(f"{self.name}/{MANIFEST_FILE}")
        crash_point("fsspec.commit.before_manifest")
        try:
            self._backend.create_manifest(path, manifest)
        except ManifestExistsError:
            self._discard_strays(path)
            raise CheckpointExistsError(
                f"{self._backend.url}/{self.name} was committed by another writer while "
                "this save ran; it was left as it is and this save discarded"
            ) from None
        except StorageError:
            raise
        except Exception as exc:
            raise translate_error(exc, "commit", path) from exc
        _LIVE.pop(self._backend._live_key(self.name), None)

    def _discard_strays(self, manifest_path: str) -> None:
        """After losing a commit race: remove what we wrote that the winner does not list."""
        try:
            listed = set(json.loads(self._backend.fs.cat_file(manifest_path))["files"])
        except Exception:
            return  # cannot tell what is the winner's: leave everything
        prefix = self._backend.store_path(self.name) + "/"
        for path in self._written:
            if path.startswith(prefix) and path[len(prefix) :] not in listed:
                with contextlib.suppress(Exception):
                    self._backend.fs.rm_file(path)
        self._written = []

    def abort(self) -> None:
        for path in self._written:
            with contextlib.suppress(Exception):
                self._backend.fs.rm_file(path)
        if self._coordinator:
            _LIVE.pop(self._backend._live_key(self.name), None)


class FsspecBackend(StorageBackend):
    """A prefix on any fsspec file system; commit = manifest written last.

    ``fs``: the fsspec file system; ``root``: the prefix on it (no protocol);
    ``url``: the root as the user wrote it, for messages (never with credentials).
    """

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")

    def copy_inside(self, src: str, dst: str, recursive: bool = False) -> None:
        """Copy ``src`` to ``dst`` (store paths) inside the store: no bytes through
        this machine."""
        self.fs.copy(src, dst, recursive=recursive)

    def store_path(self, name: str) -> str:
        """The file system's path of ``name`` (checked by ``check_name``) under the root."""
        return f"{self.root}/{check_name(name)}"

    def _live_key(self, name: str) -> tuple[int, str]:
        return (id(self.fs), self.store_path(name))

    # ---- hooks that object-store subclasses override (S3Backend does) ----------------
    # Both are called by this backend's pending checkpoints on the rank's writer thread,
    # with a path from store_path(); several at once, for different paths.

    def create_sink(self, path: str, size_hint: int | None = None) -> FileSink:
        """A sink for the new object ``path`` (the pending checkpoint has checked that
        it does not exist). The object appears under ``path`` only when the sink's
        ``close`` succeeds; after ``abort``, or a failed close, nothing is published.
        Errors are raised as :class:`StorageError` (see :func:`translate_error`).

        This one holds the file in memory and uploads it in one piece at close.
        """
        return _MemorySink(self.fs, path)

    def create_manifest(self, path: str, data: bytes) -> None:
        """Create the object ``path`` holding ``data`` unless it exists: then raise
        :class:`~ckptstore.errors.ManifestExistsError` and leave it as it is.

        The commit point of a checkpoint (coordinator, writer thread). This one checks,
        then puts: two writers racing can both pass the check. Override it with a
        conditional create where the store has one (and declare ``conditional_put``).
        Other exceptions may be raw; the caller translates them.
        """
        if self.object_exists(path):
            raise ManifestExistsError(path)
        self.fs.pipe_file(path, data)

    def list_names(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:  # file systems without ``refresh``
            entries = self.fs.ls(self.root, detail=False)
        except Exception as exc:
            raise translate_error(exc, "list", self.root) from exc
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries})

    def exists(self, name: str) -> bool:
        try:
            return self.object_exists(self.store_path(name))
        except Exception as exc:
            raise translate_error(exc, "stat", self.store_path(name)) from exc

    def object_exists(self, path: str) -> bool:
        """Whether the object (a file, not a prefix) at store path ``path`` exists.

        ``fs.exists`` here; S3 answers it with one HEAD (s3fs's ``exists`` follows a
        missing key with a LIST, to find a "directory" of that name).
        """
        return bool(self.fs.exists(path))

    def read_bytes(self, name: str) -> bytes:
        # At most one byte past the cap for this kind of file, in the same single GET:
        # a 16 GiB object named ``latest`` is refused, not read until memory runs out.
        path = self.store_path(name)
        limit = read_limit_bytes(name)
        try:
            try:
                data = bytes(self.fs.cat_file(path, start=0, end=limit + 1))
            except OSError as exc:
                if "range" not in str(exc).lower() or isinstance(exc, FileNotFoundError):
                    raise
                data = bytes(self.fs.cat_file(path))  # S3 has no range of an empty object
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise translate_error(exc, "read", path) from exc
        if len(data) > limit:
            raise CorruptCheckpointError(
                f"{path}: more than the {limit} B such a file may hold; refusing to read it "
                "(it is not what ckptstore writes there)"
            )
        return data

    def open_reader(self, name: str) -> RangeReader:
        return ObjectStoreReader(self.fs, self.store_path(name))

    def begin(self, name: str) -> PendingCheckpoint:
        check_name(name)
        if self.exists(f"{name}/{MANIFEST_FILE}"):
            raise CheckpointExistsError(
                f"{self.url}/{name} is already committed; ckptstore never overwrites a "
                "checkpoint: save under another step, or delete that one first"
            )
        return _FsspecPending(self, name, coordinator=True)

    def attach(self, token: str) -> PendingCheckpoint:
        match = _ATTEMPT.match(token) if isinstance(token, str) else None
        if match is None:
            check_name(token)  # an unsafe name gets the usual message
            raise ValueError(f"refusing unsafe token {token!r}: expected '<name>#<attempt>'")
        return _FsspecPending(
            self, check_name(match["name"]), coordinator=False, attempt=match["attempt"]
        )

    def discard_uncommitted(self, name: str, files: list[str]) -> list[str]:
        check_name(name)
        if self.exists(f"{name}/{MANIFEST_FILE}"):
            raise CheckpointExistsError(
                f"{self.url}/{name} is committed; its files are not leftovers to discard"
            )
        removed = []
        for fname in files:
            path = self.store_path(f"{name}/{check_name(fname, what='file name')}")
            try:
                if self.object_exists(path):
                    self.fs.rm_file(path)
                    removed.append(fname)
            except FileNotFoundError:
                continue
            except Exception as exc:
                raise translate_error(exc, "remove", path) from exc
        return removed

    def foreign_files(self, name: str) -> list[str]:
        path = self.store_path(check_name(name))
        try:
            found = self.fs.find(path, detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise translate_error(exc, "list", path) from exc
        return _foreign(path, found)

    def put_atomic(self, name: str, data: bytes) -> None:
        path = self.store_path(name)
        try:
            self.fs.pipe_file(path, data)  # one PUT: atomic on object stores
        except Exception as exc:
            raise translate_error(exc, "replace", path) from exc

    def delete(self, name: str) -> None:
        # Manifest first: from then on the checkpoint is invisible, whatever happens
        # to the rest of the delete.
        try:
            if self.exists(f"{name}/{MANIFEST_FILE}"):
                self.fs.rm_file(self.store_path(f"{name}/{MANIFEST_FILE}"))
                crash_point("fsspec.delete.after_manifest")
            if self.fs.exists(self.store_path(name)):
                self.fs.rm(self.store_path(name), recursive=True)
        except Exception as exc:
            raise translate_error(exc, "delete", self.store_path(name)) from exc

    def move_aside(self, name: str, new_name: str) -> None:
        # Object stores have no rename: copy every object, then delete the original
        # (manifest first). A crash in between leaves both; neither is loaded as the
        # damaged checkpoint's replacement, and the copy is never swept.
        src, dst = self.store_path(name), self.store_path(new_name)
        try:
            if self.fs.exists(dst):
                raise StorageError(errno.EEXIST, "cannot move aside: the name is taken", dst)
            self.copy_inside(src, dst, recursive=self.fs.isdir(src))
        except StorageError:
            raise
        except Exception as exc:
            raise translate_error(exc, "copy", src) from exc
        self.delete(name)
        if self.fs.exists(src):  # a stray file, not a checkpoint prefix
            try:
                self.fs.rm(src, recursive=True)
            except Exception as exc:
                raise translate_error(exc, "delete", src) from exc

    def sweep(self, grace_s: float) -> list[str]:
        removed = []
        now = time.time()
        for name in self.list_names():
            if self._live_key(name) in _LIVE:
                continue  # being written by this process
            if set_aside_kind(name) is not None:
                continue  # moved aside (damaged, retired): kept until a person removes it
            path = self.store_path(name)
            try:
                if not self.fs.isdir(path) or self.object_exists(f"{path}/{MANIFEST_FILE}"):
                    continue
                found = self.fs.find(path, detail=True)
                if _foreign(path, list(found)):
                    continue  # someone else's files: not a dead save's leftovers
                newest = 0.0
                for info in found.values():
                    mtime = info.get("LastModified") or info.get("created") or info.get("mtime")
                    if hasattr(mtime, "timestamp"):
                        mtime = mtime.timestamp()
                    newest = max(newest, float(mtime or now))
                if now - newest < grace_s:
                    continue
                self.fs.rm(path, recursive=True)
                removed.append(name)
            except FileNotFoundError:
                continue
        return removed


def _foreign(path: str, found: list[str]) -> list[str]:
    """Of the objects ``found`` under the prefix ``path``, those ckptstore does not
    write inside a checkpoint (a deeper one named by its first level and ``/``)."""
    top = path.rstrip("/")
    if any(f.rstrip("/") == top for f in found):  # an object of that name, not a prefix
        return [f"{posixpath.basename(top)} (an object, not a checkpoint's prefix)"]
    rel = [f.removeprefix(top + "/") for f in found]
    return sorted(
        {r.split("/", 1)[0] + "/" if "/" in r else r for r in rel if not written_by_ckptstore(r)}
    )


def filesystem_from_url(url: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    """``(fs, root)`` for an fsspec URL; a URL fsspec cannot open is an
    :class:`~ckptstore.errors.InvalidArgumentError` (a ``ValueError``)."""
    import fsspec  # deferred: importing it pulls in its registry

    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
    except (ImportError, ValueError) as exc:
        raise InvalidArgumentError(
            f"cannot open {url!r}: {type(exc).__name__}: {exc}; a root is a local path or a URL "
            "of a registered scheme (s3://, memory://, file://) or of an installed fsspec one"
        ) from exc
    return fs, str(root)


def open_fsspec_backend(
    url: str, *, storage_options: dict[str, Any], backend_options: dict[str, Any], create: bool
) -> StorageBackend:
    """The backend for any fsspec URL without a backend of its own (``open_backend``'s
    fallback); it takes no backend options, and ``create`` does not apply."""
    del backend_options, create  # none accepted: open_backend checked them
    fs, root = filesystem_from_url(url, dict(storage_options))
    return FsspecBackend(fs, root, url)
