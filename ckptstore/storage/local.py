"""Local disk: temp directory, fsync everything, atomic no-replace rename, fsync parent.

The commit order survives power loss (SQLite, LevelDB and RocksDB use the same one):
write files -> fsync each file -> write manifest, fsync it -> fsync the temp directory
-> rename it to its final name (``renameat2(RENAME_NOREPLACE)``: never over a
committed checkpoint) -> fsync the root. An fsync error fails the checkpoint and is
never retried: after one, Linux may have dropped the dirty pages and a second fsync
can report success for data that is gone. A rename that reports an error but took
effect (the final name holding this manifest) counts as done: a save reports success
exactly when its checkpoint is listed and durable.

Large files are written with O_DIRECT where the file system supports it (the sink, the
rename, links and the directory fsync live in :mod:`ckptstore.storage._direct_io`, the
reader in :mod:`ckptstore.storage._local_read`). Every
OS call goes through this module's globals (``os``, ``fcntl``, ``shutil``, ``fsync_dir``,
``renameat2_noreplace``) or those modules': the fault and power-loss tests replace those.
Each temp directory holds a ``.lock`` file ``flock``-ed by its writer (removed just before
the rename); it dies with the process (even on SIGKILL), so :meth:`LocalBackend.sweep`
tells a dead save's leftovers from a live one's; without locks, by age alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import time
import uuid
from typing import Any

from ckptstore.crashpoints import crash_point
from ckptstore.errors import (
    CheckpointExistsError,
    InvalidOperationError,
    StorageError,
    UnsafeCheckpointError,
    storage_error,
)
from ckptstore.layout import (
    DISK_ID_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    POINTER_TEMP_PREFIX,
    TEMP_PREFIX,
    check_name,
    own_temp_name,
    read_limit_bytes,
    written_by_ckptstore,
)
from ckptstore.storage._direct_io import (
    ALIGN,
    O_DIRECT,
    DirectFileSink,
    fsync_dir,
    link_all,
    renameat2_exchange,
    renameat2_noreplace,
)
from ckptstore.storage._local_read import LocalReader, read_small
from ckptstore.storage.base import (
    Capabilities,
    FileSink,
    PendingCheckpoint,
    RangeReader,
    StorageBackend,
)

# flock errors that mean "this file system has no locks" (NFS without lockd, Lustre
# mounted without -o flock): then a save in progress is protected by sweep's age only.
_NO_LOCKS = frozenset({errno.ENOLCK, errno.EBADF, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


class _LocalPending(PendingCheckpoint):
    def __init__(
        self, backend: LocalBackend, token: str, final: str | None, lock_fd: int | None
    ) -> None:
        self.token = token
        self._backend = backend
        self._dir = os.path.join(backend.root, token)
        self._final = final
        self._lock_fd = lock_fd

    def create_file(self, name: str, size_hint: int | None = None) -> FileSink:
        check_name(name, what="file name")
        path = os.path.join(self._dir, name)
        if "/" in name:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as exc:
                raise storage_error(exc, "create directory", os.path.dirname(path)) from exc
        return DirectFileSink(path, direct=self._backend.direct_io, expect=size_hint)

    def link_files(self, links: dict[str, str]) -> bool:
        root = self._backend.root  # the commit's fsync of self._dir makes the links durable
        return link_all([(os.path.join(root, check_name(s)), os.path.join(self._dir, check_name(n))) for n, s in links.items()])  # fmt: skip

    def commit(self, manifest: bytes) -> None:
        if self._final is None:
            raise InvalidOperationError("only the rank that began a checkpoint commits it")
        final = os.path.join(self._backend.root, self._final)
        crash_point("local.commit.before_manifest")
        self.write_file(MANIFEST_FILE, manifest)
        step = "fsync"
        try:
            # The lock file is not part of the checkpoint. Removing it refreshes the
            # directory's mtime, so sweep (which spares anything younger than a few
            # seconds) cannot mistake the unlocked directory for a dead save.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._dir, LOCK_FILE))
            fsync_dir(self._dir)
            crash_point("local.commit.before_rename")
            step = "rename"
            try:
                if not renameat2_noreplace(self._dir, final):
                    # No renameat2 here: rename() refuses a non-empty target (ENOTEMPTY),
                    # which is what a committed checkpoint always is.
                    if os.path.exists(os.path.join(final, MANIFEST_FILE)):
                        raise OSError(errno.EEXIST, "exists", final)
                    os.rename(self._dir, final)
            except OSError:
                # A rename can take effect and still report an error (NFS retransmits
                # one whose reply was lost, and the retry finds no source). If ours did,
                # the checkpoint is listed: make it durable and report success, rather
                # than a failure for a checkpoint every reader sees.
                if not self._renamed_to(final, manifest):
                    raise
            crash_point("local.commit.before_root_fsync")
            step = "fsync of the root after the rename"
            fsync_dir(self._backend.root)
        except OSError as exc:
            if step == "rename" and exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                self.abort()
                raise CheckpointExistsError(
                    f"{self._backend.url}/{self._final} was committed by another writer "
                    "while this save ran; it was left as it is and this save discarded"
                ) from exc
            if step.startswith("fsync of the root"):
                # Visible, but its name may not survive a power loss: undo it rather
                # than report a failure while it stays listed.
                try:
                    os.rename(final, self._dir)
                except OSError as undo:
                    raise StorageError(
                        exc.errno,
                        f"committed, but the root's fsync failed ({exc.strerror}) and the "
                        f"rename could not be undone ({undo.strerror}): the checkpoint is "
                        "listed but may not survive a power loss; save again under a new step",
                        final,
                    ) from exc
            self.abort()
            raise storage_error(exc, f"commit ({step})", final) from exc
        finally:
            self._unlock()

    def _renamed_to(self, final: str, manifest: bytes) -> bool:
        """Whether this checkpoint's temp directory is now ``final``: the temp name is
        gone and ``final`` holds this very manifest (no other writer's)."""
        if os.path.lexists(self._dir):
            return False
        try:
            with open(os.path.join(final, MANIFEST_FILE), "rb") as f:
                return f.read() == manifest
        except OSError:
            return False

    def abort(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
        self._unlock()

    def release(self) -> None:
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _lock(path: str) -> int | None:
    """flock ``path`` (created), held until the fd is closed; None where there are no locks.

    A regular file opened read-write: NFS emulates flock with byte-range locks, which
    need a writable file (a directory fd gives EBADF there).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_LOCKS:
            return None  # this file system has no locks: sweep falls back on age
        raise
    return fd


class LocalBackend(StorageBackend):
    """A directory on a local (POSIX) file system."""

    # begin() makes a save's directory, then locks it: a sweep in between must not take
    # it for a dead one
    min_sweep_age_s = 5.0

    def __init__(self, root: str, *, create: bool = True, direct_io: bool = True) -> None:
        """``root``: the directory (created with its parents unless ``create=False``;
        then ``begin`` creates it). ``direct_io=False``: always write through the page
        cache (O_DIRECT is also skipped where the platform or file system lacks it)."""
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.root
        self.direct_io = direct_io
        self._disk_id: str | None = None
        direct = bool(direct_io and O_DIRECT)
        self._capabilities = Capabilities(
            local=True,
            atomic_rename=True,
            save_locks=True,
            direct_io=direct,
            alignment_bytes=ALIGN if direct else 1,
        )
        if create and not os.path.isdir(self.root):
            # Every directory created here needs its entry made durable too (an fsync of
            # its parent), or the first checkpoint could vanish with it after a power
            # loss: for runs/exp1, both runs/ and exp1/ when neither existed.
            created = []
            path = self.root
            while not os.path.isdir(path) and os.path.dirname(path) != path:
                created.append(path)
                path = os.path.dirname(path)
            try:
                os.makedirs(self.root, exist_ok=True)
                for path in created:
                    fsync_dir(os.path.dirname(path))
            except (FileExistsError, NotADirectoryError) as exc:  # a file in the root's way
                in_way = next((p for p in reversed(created) if os.path.lexists(p)), self.root)
                raise StorageError(
                    exc.errno,
                    "a checkpoint root must be a directory, and this is a file (give a "
                    "directory's path, or move the file away)",
                    in_way,
                ) from exc
            except OSError as exc:
                raise storage_error(exc, "create directory", self.root) from exc

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def _path(self, name: str) -> str:
        return os.path.join(self.root, check_name(name))

    def _read_path(self, name: str) -> str:
        """``_path`` for a read: the file must really lie under the root.

        Names are checked, but a symlink planted inside the root (to a file or a
        directory elsewhere) would still take a read outside it: refused. The root
        itself may be reached through a symlink.
        """
        path = self._path(name)
        real, real_root = os.path.realpath(path), os.path.realpath(self.root)
        if os.path.commonpath([real, real_root]) != real_root:
            raise UnsafeCheckpointError(
                f"{path}: a symlink leads outside the checkpoint root (to {real}); "
                "refusing to read it. Remove the link, or copy the checkpoint into the root"
            )
        return path

    def list_names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise storage_error(exc, "list", self.root) from exc

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def read_bytes(self, name: str) -> bytes:
        return read_small(self._read_path(name), self.root, read_limit_bytes(name))

    def open_reader(self, name: str) -> RangeReader:
        return LocalReader(self._read_path(name), self.root)

    def begin(self, name: str) -> PendingCheckpoint:
        check_name(name)
        if name.startswith(TEMP_PREFIX) or "/" in name:
            raise ValueError(
                f"{name!r} cannot name a checkpoint: names starting {TEMP_PREFIX!r} are reserved"
            )
        final = os.path.join(self.root, name)
        if os.path.exists(os.path.join(final, MANIFEST_FILE)):
            raise CheckpointExistsError(
                f"{self.url}/{name} is already committed; ckptstore never overwrites a "
                "checkpoint: save under another step, or delete that one first"
            )
        if os.path.lexists(final):
            raise CheckpointExistsError(
                f"{final} exists but is not a committed checkpoint (no {MANIFEST_FILE}); "
                "ckptstore will not write over something it did not create: move it away"
            )
        token = f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}"
        path = os.path.join(self.root, token)
        try:
            os.makedirs(self.root, exist_ok=True)
            os.mkdir(path)
            lock_fd = _lock(os.path.join(path, LOCK_FILE))
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise storage_error(exc, "create temp directory", path) from exc
        return _LocalPending(self, token, name, lock_fd)

    def attach(self, token: str) -> PendingCheckpoint:
        check_name(token)
        if not token.startswith(TEMP_PREFIX) or not os.path.isdir(os.path.join(self.root, token)):
            raise StorageError(
                errno.ENOENT,
                "the coordinator's temp directory is not visible from this rank; "
                "all ranks must share the checkpoint file system",
                os.path.join(self.root, token),
            )
        return _LocalPending(self, token, None, None)

    def join_part(self, token: str, name: str | None) -> PendingCheckpoint:
        check_name(token)
        path = os.path.join(self.root, token)
        try:
            os.mkdir(path)  # the first rank of this disk creates the part, and locks it
            lock_fd = _lock(os.path.join(path, LOCK_FILE))
        except FileExistsError:
            lock_fd = None
        except OSError as exc:
            raise storage_error(exc, "create temp directory", path) from exc
        return _LocalPending(self, token, name, lock_fd)

    def disk_id(self) -> str:
        if self._disk_id is None:
            path = os.path.join(self.root, DISK_ID_FILE)
            tmp = os.path.join(self.root, f"{POINTER_TEMP_PREFIX}disk-id-{uuid.uuid4().hex[:12]}")
            try:
                if not os.path.exists(path):  # first use: create it, never over another's
                    with open(tmp, "x") as f:
                        f.write(uuid.uuid4().hex)
                        f.flush()
                        os.fsync(f.fileno())
                    with contextlib.suppress(FileExistsError):
                        os.link(tmp, path)
                    os.unlink(tmp)
                    fsync_dir(self.root)
                with open(path) as f:
                    self._disk_id = f.read(64).strip() or "empty"
            except OSError as exc:
                raise storage_error(exc, "create or read", path) from exc
        return self._disk_id

    def put_atomic(self, name: str, data: bytes) -> None:
        path = self._path(name)
        tmp = os.path.join(self.root, f"{POINTER_TEMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}")
        try:
            mode: int | None = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as exc:
            raise storage_error(exc, "stat", path) from exc
        if mode is not None and not stat.S_ISREG(mode):  # a user's symlink or directory
            raise StorageError(  # (one argument: no "[Errno 17] ...: 'path'" around it)
                f"{path} is not a file ckptstore wrote (a symlink, or not a file): not "
                "replacing it. Move it away, or give this run a directory of its own"
            )
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    if n <= 0:  # no progress: an error, not a reason to spin
                        raise OSError(errno.EIO, "write returned 0 bytes", tmp)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            crash_point("local.put_atomic.before_replace")
            os.replace(tmp, path)
            fsync_dir(self.root)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise storage_error(exc, "replace", path) from exc

    def delete(self, name: str) -> None:
        path = self._path(name)
        if not os.path.isdir(path):
            return
        # Rename out of the way first (atomic): a crash mid-delete leaves a temp entry
        # that sweep() removes, never a half-deleted checkpoint under its own name.
        doomed = os.path.join(self.root, f"{TEMP_PREFIX}deleted-{name}-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(path, doomed)
            fsync_dir(self.root)
        except OSError as exc:
            raise storage_error(exc, "delete", path) from exc
        crash_point("local.delete.before_rmtree")
        shutil.rmtree(doomed, ignore_errors=True)

    def foreign_files(self, name: str) -> list[str]:
        path = self._path(name)
        try:
            with os.scandir(path) as entries:
                found = [
                    f"{e.name}/" if e.is_dir(follow_symlinks=False) else e.name
                    for e in entries
                    if e.is_dir(follow_symlinks=False)
                    or not (e.is_file(follow_symlinks=False) and written_by_ckptstore(e.name))
                ]
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            return [name]  # a file of that name: not ckptstore's either
        except OSError as exc:
            raise storage_error(exc, "list", path) from exc
        return sorted(found)

    def swap(self, name: str, other: str) -> bool:
        path, target = self._path(name), self._path(other)
        if not (os.path.isdir(path) and os.path.isdir(target)):
            return False
        try:
            if not renameat2_exchange(path, target):
                return False
            fsync_dir(self.root)
        except OSError as exc:
            raise storage_error(exc, "swap", path) from exc
        return True

    def move_aside(self, name: str, new_name: str) -> None:
        path, target = self._path(name), self._path(new_name)
        if os.path.lexists(target):
            raise StorageError(errno.EEXIST, "cannot move aside: the name is taken", target)
        try:
            os.rename(path, target)
            fsync_dir(self.root)
        except OSError as exc:
            raise storage_error(exc, "rename", path) from exc

    def sweep(self, grace_s: float) -> list[str]:
        removed = []
        now = time.time()
        # Never younger than this, whatever grace_s says: begin() makes the directory,
        # then locks it, and a sweep in between must not take it for a dead one.
        grace_s = max(grace_s, self.min_sweep_age_s)
        for name in self.list_names():
            if not own_temp_name(name):  # (a user's .tmp-build is not ours to remove)
                continue
            if name.startswith(POINTER_TEMP_PREFIX):
                path = os.path.join(self.root, name)
                with contextlib.suppress(OSError):
                    if now - os.lstat(path).st_mtime >= grace_s and os.path.isfile(path):
                        os.unlink(path)  # left by a put_atomic that died before its rename
                        removed.append(name)
                continue
            if not name.startswith(TEMP_PREFIX):
                continue
            path = os.path.join(self.root, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if now - st.st_mtime < grace_s:
                continue
            if not os.path.isdir(path):
                continue
            fd = None
            try:
                fd = _lock(os.path.join(path, LOCK_FILE))
            except BlockingIOError:
                continue  # locked: a live save owns it
            except OSError:
                continue  # cannot tell; leave it
            try:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
            finally:
                if fd is not None:
                    os.close(fd)
        return removed


BACKEND_OPTIONS = frozenset({"direct_io"})  # what open_backend's backend_options may hold


def open_local_backend(
    url: str, *, storage_options: dict[str, Any], backend_options: dict[str, Any], create: bool
) -> StorageBackend:
    """The backend for a plain path or a ``file://`` / ``local://`` URL (``open_backend``'s
    factory); ``storage_options`` do not apply to local disk and are ignored."""
    del storage_options
    path = url.split("://", 1)[1] if "://" in url else url
    return LocalBackend(path, create=create, **backend_options)
