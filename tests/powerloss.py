"""Power loss, simulated: what the disk holds after the machine loses power mid-save.

SIGKILL cannot find a missing fsync: the page cache survives the process. A power cut
keeps only what was made durable. :class:`PowerLossFS` stands in for the ``os`` and
``shutil`` modules and for ``renameat2`` inside ``ckptstore.storage.local`` and
``ckptstore.storage._direct_io`` (its file sink and directory fsync) and
``ckptstore.storage._local_read`` (its reader), nowhere else, and lets every call through to the real disk while it records, per file, its
content at its last ``fsync``/``fdatasync``, and per directory, its entries at its
last ``fsync``. Everything under ``top`` present at construction counts as durable.

At the cut (call number ``cut_at``, 0-based among the calls that change the disk or
make it durable) the power goes: that call and every later one raises
:class:`PowerCut` (a ``BaseException``, as nothing in ckptstore may catch it), while
reads and ``close`` still work so the process winds down. :meth:`power_loss` then
rewrites ``top`` to what a power loss may leave:

``drop_unsynced``: every directory holds the entries it had at its last fsync, every
    file the content it had at its last fsync (empty if never synced). Creations,
    renames and removals since a directory's last fsync are rolled back.
``keep_names``: every creation, rename and removal persisted, but file data did not:
    each file holds its content at its last fsync (empty if never synced). This is the
    classic zero-length file after a rename that came before the data's fsync.

Both are states a POSIX file system may be left in (the journal need not have
committed anything not explicitly synced, and metadata may reach the disk before
data); between them they catch a missing fsync of a file or of a directory.

Objects are identified by our own ids, not inode numbers, since a freed inode is
reused by the next file created.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ckptstore.storage._direct_io as direct_io_mod
import ckptstore.storage._local_read as local_read_mod
import ckptstore.storage.local as local_mod

MODES = ("drop_unsynced", "keep_names")


class PowerCut(BaseException):
    """The power went out: raised by the cut call and every file-system call after it."""


Entries = dict[str, tuple[int, bool]]  # name -> (object id, is a directory)


class PowerLossFS:
    def __init__(
        self,
        top: str,
        *,
        cut_at: int | None = None,
        skip_sync: Callable[[str], bool] | None = None,
    ) -> None:
        """``top``: an existing directory holding everything the test touches.
        ``skip_sync(label)``: True makes that fsync a silent no-op (a missing fsync,
        for the test that shows this simulation catches one)."""
        self.top = os.path.realpath(top)
        self.cut_at = cut_at
        self.skip_sync = skip_sync or (lambda label: False)
        self.calls: list[str] = []  # labels of the counted calls, in order
        self.cut: str | None = None  # label of the call the power went out at
        self._lock = threading.RLock()
        self._ids: dict[int, int] = {}  # inode -> object id
        self._next_id = 0
        self._fds: dict[int, str] = {}  # our fds -> path at open
        self._files: dict[int, bytes] = {}  # object id -> content at its last fsync
        self._dirs: dict[int, Entries] = {}  # object id -> entries at its last fsync
        self._top_id = self._new_id(os.lstat(self.top).st_ino)
        for dirpath, dirnames, filenames in os.walk(self.top):
            self._dirs[self._id_of(dirpath)] = self._entries(dirpath)
            for name in filenames:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    self._files[self._id_of(path)] = f.read()
            del dirnames  # os.walk descends on its own

    # ---- bookkeeping ----------------------------------------------------------------
    def _new_id(self, ino: int) -> int:
        self._next_id += 1
        self._ids[ino] = self._next_id
        return self._next_id

    def _id_of(self, path: str) -> int:
        ino = os.lstat(path).st_ino
        return self._ids[ino] if ino in self._ids else self._new_id(ino)

    def _entries(self, path: str) -> Entries:
        out: Entries = {}
        for entry in os.scandir(path):
            st = entry.stat(follow_symlinks=False)
            ino = st.st_ino
            oid = self._ids[ino] if ino in self._ids else self._new_id(ino)
            out[entry.name] = (oid, stat.S_ISDIR(st.st_mode))
        return out

    def label(self, path: str) -> str:
        """``path`` relative to ``top``, with the random parts of temp names replaced."""
        rel = os.path.relpath(os.path.realpath(path), self.top)
        rel = re.sub(r"\.tmp-deleted-(step_\d+)-[0-9a-f]{12}", r"<doomed \1>", rel)
        rel = re.sub(r"\.tmp-(step_\d+)-[0-9a-f]{12}", r"<tmp \1>", rel)
        return re.sub(r"\.pointer-(\w+)-[0-9a-f]{12}", r"<pointer temp \1>", rel)

    def _count(self, label: str) -> None:
        """Every call that changes the disk or makes it durable passes here first."""
        with self._lock:
            if self.cut is not None:
                raise PowerCut(f"after the cut: {label}")
            if self.cut_at is not None and len(self.calls) == self.cut_at:
                self.cut = label
                raise PowerCut(label)
            self.calls.append(label)

    # ---- the calls ckptstore.storage.local makes ----------------------------------
    def open(self, path: str, flags: int, mode: int = 0o777, **kw: Any) -> int:
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if not writes:
            fd = os.open(path, flags, mode, **kw)
            self._fds[fd] = path
            return fd
        self._count(f"open({self.label(path)})")
        with self._lock:
            existed = os.path.lexists(path)
            fd = os.open(path, flags, mode, **kw)
            if not existed:
                self._new_id(os.fstat(fd).st_ino)
        self._fds[fd] = path
        return fd

    def write(self, fd: int, data: Any) -> int:
        self._count(f"write({self.label(self._fds.get(fd, '?'))})")
        return os.write(fd, data)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        self._count(f"pwrite({self.label(self._fds.get(fd, '?'))})")
        return os.pwrite(fd, data, offset)

    def ftruncate(self, fd: int, length: int) -> None:
        self._count(f"ftruncate({self.label(self._fds.get(fd, '?'))})")
        os.ftruncate(fd, length)

    def fsync(self, fd: int) -> None:
        self._sync("fsync", fd, os.fsync)

    def fdatasync(self, fd: int) -> None:
        self._sync("fdatasync", fd, os.fdatasync)

    def _sync(self, what: str, fd: int, call: Callable[[int], None]) -> None:
        label = f"{what}({self.label(self._fds.get(fd, '?'))})"
        self._count(label)
        call(fd)
        if self.skip_sync(label):
            return
        with self._lock:
            st = os.fstat(fd)
            oid = self._ids[st.st_ino] if st.st_ino in self._ids else self._new_id(st.st_ino)
            if stat.S_ISDIR(st.st_mode):
                self._dirs[oid] = self._entries(f"/proc/self/fd/{fd}")
            else:
                with open(f"/proc/self/fd/{fd}", "rb") as f:
                    self._files[oid] = f.read()

    def close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        self._count(f"rename({self.label(src)} -> {self.label(dst)})")
        os.rename(src, dst)

    def replace(self, src: str, dst: str) -> None:
        self._count(f"replace({self.label(src)} -> {self.label(dst)})")
        os.replace(src, dst)

    def renameat2_noreplace(self, src: str, dst: str) -> bool:
        self._count(f"renameat2({self.label(src)} -> {self.label(dst)})")
        return bool(_REAL_RENAMEAT2(src, dst))

    def link(self, src: str, dst: str) -> None:
        self._count(f"link({self.label(src)} -> {self.label(dst)})")
        os.link(src, dst)  # the same object: its synced content is the source's

    def unlink(self, path: str) -> None:
        self._count(f"unlink({self.label(path)})")
        os.unlink(path)

    remove = unlink

    def rmdir(self, path: str) -> None:
        self._count(f"rmdir({self.label(path)})")
        os.rmdir(path)

    def mkdir(self, path: str, mode: int = 0o777) -> None:
        self._count(f"mkdir({self.label(path)})")
        with self._lock:
            os.mkdir(path, mode)
            self._new_id(os.lstat(path).st_ino)

    def makedirs(self, path: str, mode: int = 0o777, exist_ok: bool = False) -> None:
        parent = os.path.dirname(os.path.abspath(path))
        if parent != path and not os.path.isdir(parent):
            self.makedirs(parent, mode, exist_ok=True)
        try:
            self.mkdir(path, mode)
        except FileExistsError:
            if not (exist_ok and os.path.isdir(path)):
                raise

    def rmtree(self, path: str, ignore_errors: bool = False, **kw: Any) -> None:
        """shutil.rmtree, through the counted calls (so a cut can land inside it)."""
        try:
            if os.path.islink(path) or not os.path.isdir(path):
                raise NotADirectoryError(path)
            for entry in list(os.scandir(path)):
                if entry.is_dir(follow_symlinks=False):
                    self.rmtree(entry.path, ignore_errors)
                else:
                    self.unlink(entry.path)
            self.rmdir(path)
        except OSError:
            if not ignore_errors:
                raise

    # ---- installing, and the power cut ------------------------------------------------
    @contextlib.contextmanager
    def installed(self) -> Iterator[PowerLossFS]:
        """Route ``ckptstore.storage.local``'s OS calls through this object."""
        saved = (
            local_mod.os,
            local_mod.shutil,
            local_mod.renameat2_noreplace,
            direct_io_mod.os,
            local_read_mod.os,
        )
        local_mod.os = _Namespace(os, self)  # type: ignore[assignment]
        local_mod.shutil = _Namespace(shutil, self, names=("rmtree",))  # type: ignore[assignment]
        local_mod.renameat2_noreplace = self.renameat2_noreplace
        direct_io_mod.os = _Namespace(os, self)  # type: ignore[assignment]
        local_read_mod.os = _Namespace(os, self)  # type: ignore[assignment]
        try:
            yield self
        finally:
            (
                local_mod.os,
                local_mod.shutil,
                local_mod.renameat2_noreplace,
                direct_io_mod.os,
                local_read_mod.os,
            ) = saved

    def power_loss(self, mode: str = "drop_unsynced", *, into: str | None = None) -> None:
        """Rewrite ``top`` to what the disk holds after the power went out now; with
        ``into`` (a directory that does not exist yet), write it there instead and
        leave ``top`` as it is (then call again for the other mode)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        with self._lock:
            self.cut = self.cut or "power_loss()"
            if mode == "drop_unsynced":
                tree = self._durable_tree(self._top_id)
            else:
                tree = self._current_tree(self.top)
        if into is not None:
            os.mkdir(into)
            _write_tree(into, tree)
            return
        for name in os.listdir(self.top):
            path = os.path.join(self.top, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        _write_tree(self.top, tree)

    def _durable_tree(self, oid: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, (child, is_dir) in self._dirs.get(oid, {}).items():
            # A directory whose entry is durable but which was never synced itself:
            # empty. A file never synced: empty (its length was never made durable).
            out[name] = self._durable_tree(child) if is_dir else self._files.get(child, b"")
        return out

    def _current_tree(self, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                out[entry.name] = self._current_tree(entry.path)
            else:
                oid = self._ids.get(entry.stat(follow_symlinks=False).st_ino)
                out[entry.name] = self._files.get(oid, b"") if oid is not None else b""
        return out


def _write_tree(path: str, tree: dict[str, Any]) -> None:
    for name, node in tree.items():
        target = os.path.join(path, name)
        if isinstance(node, dict):
            os.mkdir(target)
            _write_tree(target, node)
        else:
            with open(target, "wb") as f:
                f.write(node)


_REAL_RENAMEAT2 = direct_io_mod.renameat2_noreplace
_OS_NAMES = (
    "open",
    "write",
    "pwrite",
    "ftruncate",
    "fsync",
    "fdatasync",
    "close",
    "rename",
    "replace",
    "link",
    "unlink",
    "remove",
    "rmdir",
    "mkdir",
    "makedirs",
)


class _Namespace:
    """A module with some of its functions replaced by the PowerLossFS's."""

    def __init__(self, module: Any, fs: PowerLossFS, names: tuple[str, ...] = _OS_NAMES) -> None:
        self._module = module
        for name in names:
            setattr(self, name, getattr(fs, name))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)
