"""The storage layer: the contract suite on every backend, then each backend's specifics.

The contract (``ckptstore.storage.testing.BackendContract``, the promises of
``ckptstore/storage/base.py``) runs against ``LocalBackend`` on ``tmp_path``,
``FsspecBackend`` on fsspec's ``memory://`` file system, ``S3Backend`` on a real S3
server process (moto, on 127.0.0.1), and ``FaultyBackend`` wrapping local disk. The
local-only part checks what makes local saves crash-safe: the ``flock``-ed temp
directory, the O_DIRECT sink and its bounce buffer, the no-replace rename, the fsync
order, delete-by-rename, and a sweep that removes only dead saves' leftovers (made by
real processes that really die). Then the registry (``open_backend``,
``register_backend``, ``backend_options``), S3's options and the fault wrapper.

Tests marked ``xfail(strict=True, reason="BUG: ...")`` demonstrate bugs in the package.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import selectors
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any

import fsspec
import numpy as np
import pytest

from ckptstore.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    StorageError,
    StorageFullError,
)
from ckptstore.layout import LOCK_FILE, MANIFEST_FILE, TEMP_PREFIX, check_name
from ckptstore.storage import (
    Capabilities,
    FsspecBackend,
    LocalBackend,
    S3Backend,
    StorageBackend,
    open_backend,
    register_backend,
)
from ckptstore.storage import _direct_io as direct_io_mod
from ckptstore.storage import local as local_mod
from ckptstore.storage.s3 import MIN_PART_BYTES
from ckptstore.storage.testing import (
    MANIFEST,
    BackendContract,
    FaultyBackend,
    as_kind,
    assert_not_a_checkpoint,
    commit_one,
    fail_nth,
    fail_once,
    page_aligned,
    rand_bytes,
    temp_entries,
    write_file,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = 4096
MIB = 1 << 20


# ---- helpers ------------------------------------------------------------------------


def reopen(backend: StorageBackend) -> StorageBackend:
    """A second backend object on the same root, as another rank or process opens it."""
    return open_backend(backend.url)


def age(path: str, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


# ---- fixtures -----------------------------------------------------------------------


@pytest.fixture
def memory_top():
    """A unique top-level prefix on fsspec's (process-global) memory file system."""
    top = f"ckptstore-storage-test-{uuid.uuid4().hex}"
    yield top
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{top}"):
        fs.rm(f"/{top}", recursive=True)


@pytest.fixture
def local(tmp_path) -> LocalBackend:
    return LocalBackend(str(tmp_path / "ckpts"))


# ---- contract: every backend ----------------------------------------------------------


class _OurBackends(BackendContract):
    """The contract, plus what holds for ckptstore's own backends."""

    def test_is_local_exactly_for_local_disk(self, backend):
        assert backend.is_local() is isinstance(backend, LocalBackend)


class TestLocalBackend(_OurBackends):
    @pytest.fixture
    def backend(self, tmp_path):
        b = open_backend(tmp_path / "ckpts")
        assert isinstance(b, LocalBackend)
        return b


class TestMemoryBackend(_OurBackends):
    @pytest.fixture
    def backend(self, memory_top):
        b = open_backend(f"memory://{memory_top}/root")
        assert isinstance(b, FsspecBackend)
        return b


class TestS3Backend(_OurBackends):
    @pytest.fixture
    def backend(self, s3_server):
        bucket = s3_server.new_bucket()
        b = open_backend(
            f"s3://{bucket}/root",
            storage_options=s3_server.options(),
            # so that the larger test files go multipart
            backend_options={"part_bytes": MIN_PART_BYTES},
        )
        assert isinstance(b, S3Backend)
        assert b.part_bytes == MIN_PART_BYTES
        return b


class TestFaultyBackend(BackendContract):
    """The wrapper, injecting nothing, keeps the contract of what it wraps."""

    @pytest.fixture
    def backend(self, tmp_path):
        return FaultyBackend(LocalBackend(str(tmp_path / "ckpts")))


def test_check_name_accepts_plain_names():
    for good in ["step_1", "step_1/__0_0.distcp", "a/b/c", ".metadata", "a..b", ".tmp-x"]:
        assert check_name(good) == good


# ---- open_backend ---------------------------------------------------------------------


def test_open_backend_local_forms(tmp_path):
    for form in [
        str(tmp_path / "a"),
        tmp_path / "b",
        f"file://{tmp_path}/c",
        f"local://{tmp_path}/d",
    ]:
        b = open_backend(form)
        assert isinstance(b, LocalBackend)
        assert os.path.isdir(b.root)
        assert b.root.startswith(str(tmp_path))
    b = open_backend(tmp_path / "lazy", create=False)
    assert isinstance(b, LocalBackend)
    assert not os.path.exists(tmp_path / "lazy")
    assert b.list_names() == []
    b.begin("step_1").abort()  # begin creates the root
    assert os.path.isdir(tmp_path / "lazy")


def test_open_backend_memory(memory_top):
    b = open_backend(f"memory://{memory_top}/root", storage_options={})
    assert isinstance(b, FsspecBackend)
    assert not b.is_local()
    assert b.url == f"memory://{memory_top}/root"


@pytest.mark.parametrize("bad", ["", "nosuchprotocol-xyz://bucket/root", 123, None])
def test_open_backend_refuses(bad):
    with pytest.raises(ValueError, match=r"must be a path or URL|cannot open"):
        open_backend(bad)


# ---- errors are translated --------------------------------------------------------------


def test_local_root_under_a_file(tmp_path):
    (tmp_path / "afile").write_bytes(b"not a directory")
    bad_root = tmp_path / "afile" / "root"
    with pytest.raises(StorageError, match="a checkpoint root must be a directory") as info:
        open_backend(bad_root)
    assert info.value.errno == errno.ENOTDIR
    assert info.value.filename == str(tmp_path / "afile")  # the file in the way
    with pytest.raises(StorageError, match="a checkpoint root must be a directory") as info:
        open_backend(tmp_path / "afile")  # (was "create directory failed: File exists")
    b = LocalBackend(str(bad_root), create=False)
    with pytest.raises(StorageError):
        b.begin("step_1")
    with pytest.raises(StorageError):
        b.list_names()
    with pytest.raises(StorageError):
        b.read_bytes(f"step_1/{MANIFEST_FILE}")


def test_fsspec_root_under_a_file(memory_top):
    fsspec.filesystem("memory").pipe_file(f"/{memory_top}/afile", b"not a directory")
    b = open_backend(f"memory://{memory_top}/afile/root")
    pending = b.begin("step_1")
    sink = pending.create_file("a.bin")
    sink.write(b"abc")
    with pytest.raises(StorageError):
        sink.close()
    with pytest.raises(StorageError):
        pending.commit(MANIFEST)
    pending.abort()


def test_local_read_of_a_directory_is_corrupt(local):
    """A directory where a file is read is not something ckptstore wrote (until
    2026-12-07 a StorageError: a directory in a shard's place then stopped a resume)."""
    commit_one(local, "step_1", {"a": b"a"})
    for read in (local.read_bytes, local.open_reader):
        with pytest.raises(CorruptCheckpointError, match="a directory, not a regular file"):
            read("step_1")


# ---- local disk: temp directory, lock, commit -------------------------------------------


def is_locked(path: str) -> bool:
    """Whether the temp directory ``path`` is held by a live writer (its .lock file)."""
    lock = os.path.join(path, LOCK_FILE)
    if not os.path.exists(lock):
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_local_temp_dir_is_named_and_locked(local):
    pending = local.begin("step_00000042")
    assert re.fullmatch(r"\.tmp-step_00000042-[0-9a-f]{12}", pending.token)
    tmp = os.path.join(local.root, pending.token)
    assert os.path.isdir(tmp)
    assert local.list_names() == [pending.token]
    assert is_locked(tmp)
    write_file(pending, "a.bin", b"a")
    assert os.path.exists(os.path.join(tmp, "a.bin"))
    assert not os.path.exists(os.path.join(local.root, "step_00000042"))
    pending.commit(MANIFEST)
    assert not os.path.exists(tmp)
    final = os.path.join(local.root, "step_00000042")
    assert LOCK_FILE not in os.listdir(final)  # the lock is not part of it
    assert sorted(os.listdir(final)) == ["a.bin", MANIFEST_FILE]
    assert not is_locked(final)  # the lock went with the commit


def test_local_abort_releases_lock_and_dir(local):
    pending = local.begin("step_1")
    tmp = os.path.join(local.root, pending.token)
    assert is_locked(tmp)
    pending.abort()
    assert not os.path.exists(tmp)


def test_local_attach_needs_an_existing_temp_dir(local):
    with pytest.raises(StorageError) as info:
        local.attach(".tmp-step_1-000000000000")
    assert info.value.errno == errno.ENOENT
    commit_one(local, "step_1", {"a": b"a"})
    with pytest.raises(StorageError):
        local.attach("step_1")  # a committed checkpoint is not a pending one
    pending = local.begin("step_2")
    pending.abort()
    with pytest.raises(StorageError):
        local.attach(pending.token)


def test_local_commit_fsync_order(local, monkeypatch):
    events: list[tuple[str, ...]] = []
    real_fdatasync = os.fdatasync
    real_fsync_dir = local_mod.fsync_dir
    real_rename = local_mod.renameat2_noreplace

    def fdatasync(fd: int) -> None:
        events.append(("fdatasync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fdatasync(fd)

    def fsync_dir(path: str) -> None:
        events.append(("fsync_dir", path))
        real_fsync_dir(path)

    def rename(src: str, dst: str) -> bool:
        events.append(("rename", src, dst))
        return real_rename(src, dst)

    monkeypatch.setattr(direct_io_mod.os, "fdatasync", fdatasync)
    monkeypatch.setattr(local_mod, "fsync_dir", fsync_dir)
    monkeypatch.setattr(local_mod, "renameat2_noreplace", rename)

    pending = local.begin("step_1")
    tmp = os.path.join(local.root, pending.token)
    final = os.path.join(local.root, "step_1")
    write_file(pending, "a.bin", b"a" * 10000)
    pending.write_file("b.bin", b"b")  # small files are durable too
    assert events == [("fdatasync", f"{tmp}/a.bin"), ("fdatasync", f"{tmp}/b.bin")]
    events.clear()
    pending.commit(MANIFEST)
    assert events == [
        ("fdatasync", f"{tmp}/{MANIFEST_FILE}"),
        ("fsync_dir", tmp),
        ("rename", tmp, final),
        ("fsync_dir", local.root),
    ]


def test_local_commit_without_renameat2(local, monkeypatch):
    """The fallback when the kernel has no renameat2 still never replaces a checkpoint."""
    monkeypatch.setattr(local_mod, "renameat2_noreplace", lambda src, dst: False)
    p1 = local.begin("step_1")
    p2 = local.begin("step_1")
    write_file(p1, "a", b"one")
    write_file(p2, "a", b"two")
    p1.commit(b"1")
    with pytest.raises(CheckpointExistsError):
        p2.commit(b"2")
    assert local.read_bytes("step_1/a") == b"one"
    assert local.read_bytes(f"step_1/{MANIFEST_FILE}") == b"1"
    assert temp_entries(local) == []


def test_local_losing_commit_cleans_up_after_itself(local):
    p1 = local.begin("step_1")
    p2 = local.begin("step_1")
    write_file(p2, "big", b"x" * 100_000)
    p1.commit(MANIFEST)
    with pytest.raises(CheckpointExistsError):
        p2.commit(MANIFEST)
    assert local.list_names() == ["step_1"]  # the loser's temp dir is gone


def test_local_delete_renames_first(local, monkeypatch):
    commit_one(local, "step_1", {"a": b"a" * 5000})
    final = os.path.join(local.root, "step_1")
    # Crash right after the rename: the rmtree never happens.
    with monkeypatch.context() as m:
        m.setattr(local_mod.shutil, "rmtree", lambda *a, **k: None)
        local.delete("step_1")
    assert not os.path.exists(final)
    (doomed,) = temp_entries(local)
    assert doomed.startswith(f"{TEMP_PREFIX}deleted-step_1-")
    assert os.path.exists(os.path.join(local.root, doomed, MANIFEST_FILE))
    assert_not_a_checkpoint(local, "step_1")
    old = time.time() - 3600
    os.utime(os.path.join(local.root, doomed), (old, old))
    assert local.sweep(0) == [doomed]  # a dead delete's leftover
    assert local.list_names() == []


# ---- local disk: the O_DIRECT sink ----------------------------------------------------------


@pytest.mark.parametrize(
    ("direct_io", "expect"),
    [(True, None), (True, PAGE), (False, None)],
    ids=["direct", "expected-small-grows-past-two-pages", "buffered"],
)
def test_local_sink_mixed_aligned_and_unaligned(tmp_path, monkeypatch, direct_io, expect):
    """``expect``: a file expected small starts buffered, and turns O_DIRECT on at the
    first block boundary past BUFFERED_BYTES (here 3 pages + 50 B: the 100-byte write
    crosses it short of a boundary, the padding after it reaches one) once it grows
    past them."""
    buffered_bytes = 3 * PAGE + 50 if expect else direct_io_mod.BUFFERED_BYTES
    monkeypatch.setattr(direct_io_mod, "BUFFERED_BYTES", buffered_bytes)
    backend = LocalBackend(str(tmp_path / "ckpts"), direct_io=direct_io)
    pending = backend.begin("step_1")
    sink = pending.create_file("__0_0.distcp", size_hint=expect)
    if direct_io and not sink.wants_alignment:
        sink.abort()
        pending.abort()
        pytest.skip("this file system has no O_DIRECT")
    assert sink.wants_alignment is direct_io
    assert sink._direct is (direct_io and not expect)

    # Record which buffer addresses reach os.write for this file.
    addresses: list[int] = []
    real_write = os.write

    def spy_write(fd: int, data: Any) -> int:
        if fd == sink._fd and len(data):
            addresses.append(int(np.frombuffer(data, dtype=np.uint8).ctypes.data))
        return real_write(fd, data)

    monkeypatch.setattr(direct_io_mod.os, "write", spy_write)

    expected = bytearray()

    def put(obj: Any) -> None:
        sink.write(obj)
        expected.extend(memoryview(obj).tobytes())
        assert sink.tell() == len(expected)

    def align(boundary: int) -> None:
        sink.align(boundary)
        if sink.wants_alignment:
            expected.extend(bytes(-len(expected) % boundary))
        assert sink.tell() == len(expected)

    first = page_aligned(rand_bytes(3 * PAGE + 5, 1))
    put(first)  # three pages straight from the buffer, 5 bytes to the bounce buffer
    put(b"x" * 100)
    assert sink._direct is (direct_io and not expect)
    align(PAGE)
    put(bytearray(rand_bytes(5000, 2)))
    # The first write at a block boundary past BUFFERED_BYTES turns O_DIRECT on
    assert sink._direct is direct_io
    align(512)
    put(memoryview(as_kind(rand_bytes(7000, 3), "numpy_unaligned")))
    put(b"")
    align(PAGE)
    align(PAGE)  # already aligned: no padding
    if direct_io:
        # Fill the bounce buffer exactly: it is flushed and the next aligned buffer goes
        # straight to disk again.
        put(rand_bytes(direct_io_mod.BOUNCE_BYTES - sink._fill, 4))
        assert sink._fill == 0
    second = page_aligned(rand_bytes(2 * PAGE, 5))
    put(second)
    put(rand_bytes(3, 6))
    align(8)
    put(rand_bytes(8 * MIB + 3, 7))  # more than one bounce buffer, unaligned length
    put(np.frombuffer(rand_bytes(4097, 8), dtype=np.uint8)[::-1])  # not contiguous

    size = sink.close()
    assert size == len(expected) == sink.tell()
    path = sink.path
    assert os.path.getsize(path) == size  # truncated to the exact length
    with open(path, "rb") as f:
        assert f.read() == bytes(expected)
    if direct_io:
        assert first.ctypes.data in addresses  # zero-copy from the staging buffer
        assert second.ctypes.data in addresses
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_1/__0_0.distcp") == bytes(expected)


@pytest.mark.parametrize("codec_like", [False, True], ids=["aligned", "never-aligned"])
def test_local_sink_expected_small_turns_direct_inside_one_large_write(
    tmp_path, monkeypatch, codec_like
):
    """One write that crosses BUFFERED_BYTES (a large item, or compressed chunks that
    never call align()) goes buffered to the next block boundary and direct after."""
    monkeypatch.setattr(direct_io_mod, "BUFFERED_BYTES", 2 * PAGE)
    backend = LocalBackend(str(tmp_path / "ckpts"))
    pending = backend.begin("step_1")
    sink = pending.create_file("f.bin", size_hint=100)
    if not sink.wants_alignment:
        sink.abort()
        pending.abort()
        pytest.skip("this file system has no O_DIRECT")
    want = rand_bytes(101 if codec_like else PAGE, 1) + rand_bytes(5 * MIB + 7, 2)
    sink.write(want[: len(want) - 5 * MIB - 7])
    assert not sink._direct
    sink.write(want[len(want) - 5 * MIB - 7 :])
    assert sink._direct  # the rest of that one write went direct
    assert sink.close() == len(want)
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_1/f.bin") == want


@pytest.mark.parametrize("refused", [False, True], ids=["kicked", "fadvise-refused"])
def test_local_sink_expected_small_starts_writeback_as_it_goes(tmp_path, monkeypatch, refused):
    """A file written through the page cache has its writeback started every
    KICK_BYTES (POSIX_FADV_DONTNEED over what came since the last kick), so the
    fdatasync at close waits for the tail only, and once durable its pages are let go
    (DONTNEED over the whole file); a refused hint changes nothing. A file too small
    for a kick keeps its pages (with BUFFERED_BYTES set: 0 by default)."""
    monkeypatch.setattr(direct_io_mod, "KICK_BYTES", MIB)
    monkeypatch.setattr(direct_io_mod, "BUFFERED_BYTES", 128 * MIB)
    kicks: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_DONTNEED:
            kicks.append((offset, length))
        if refused:
            raise OSError(errno.ESPIPE, os.strerror(errno.ESPIPE))
        real(fd, offset, length, advice)

    monkeypatch.setattr(direct_io_mod.os, "posix_fadvise", fadvise)
    backend = LocalBackend(str(tmp_path / "ckpts"))
    pending = backend.begin("step_1")
    sink = pending.create_file("f.bin", size_hint=4 * MIB)
    want = rand_bytes(3 * MIB + 11, 3)
    for k in range(0, len(want), 700_000):
        sink.write(want[k : k + 700_000])
    assert not sink._direct
    # 700 KB pieces: a kick after the 2nd, 4th (past 1 MiB since the last) ...
    assert kicks == [(0, 1_400_000), (1_400_000, 1_400_000)], kicks
    assert sink.close() == len(want)
    assert kicks[2:] == [(0, 0)], kicks
    small = pending.create_file("g.bin", size_hint=4 * MIB)
    small.write(want[:700_000])
    assert small.close() == 700_000
    assert kicks[3:] == [], kicks
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_1/f.bin") == want


def test_local_sink_expected_small_that_grows_past_it_is_still_dropped_once_durable(
    tmp_path, monkeypatch
):
    """A file expected small that turns O_DIRECT on past BUFFERED_BYTES had its first part
    written through the page cache: once durable, that is let go too."""
    monkeypatch.setattr(direct_io_mod, "KICK_BYTES", MIB)
    monkeypatch.setattr(direct_io_mod, "BUFFERED_BYTES", 2 * MIB)
    advised: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_DONTNEED:
            advised.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(direct_io_mod.os, "posix_fadvise", fadvise)
    backend = LocalBackend(str(tmp_path / "ckpts"))
    pending = backend.begin("step_1")
    sink = pending.create_file("f.bin", size_hint=MIB)
    if not sink.wants_alignment:
        sink.abort()
        pending.abort()
        pytest.skip("this file system has no O_DIRECT")
    want = rand_bytes(5 * MIB + 7, 4)
    for k in range(0, len(want), 700_000):
        sink.write(want[k : k + 700_000])
    assert sink._direct  # past BUFFERED_BYTES
    assert sink.close() == len(want)
    assert advised and advised[-1] == (0, 0) and advised.count((0, 0)) == 1, advised
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_1/f.bin") == want


def test_local_sink_expected_small_stays_buffered_without_memory_for_its_bounce_buffer(
    tmp_path, monkeypatch
):
    """The switch to O_DIRECT needs an 8 MiB bounce buffer; without one (ENOMEM) the file
    is written buffered to its end: the same bytes, its exact length."""
    import mmap as mmap_mod
    import types

    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(direct_io_mod, "BUFFERED_BYTES", 2 * PAGE)
    monkeypatch.setattr(direct_io_mod, "_spare", [])  # none kept from earlier files
    backend = LocalBackend(str(tmp_path / "ckpts"))
    pending = backend.begin("step_1")
    sink = pending.create_file("f.bin", size_hint=100)
    monkeypatch.setattr(direct_io_mod, "mmap", types.SimpleNamespace(mmap=no_memory))
    want = rand_bytes(PAGE + 10, 1) + rand_bytes(3 * PAGE + 7, 2)
    sink.write(want[: PAGE + 10])
    sink.write(want[PAGE + 10 :])
    assert not sink._direct
    monkeypatch.setattr(direct_io_mod, "mmap", mmap_mod)
    assert sink.close() == len(want)
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_1/f.bin") == want


def test_local_sink_reuses_the_bounce_buffer_of_a_file_closed_cleanly(tmp_path, monkeypatch):
    """A file closed cleanly leaves its bounce buffer for the next (at most
    SPARE_BOUNCES kept); one whose write failed does not (a view of it may live on in
    the error's traceback). What a reused buffer held before is not written again: the
    tail's block is padded with zeros (and cut off)."""
    monkeypatch.setattr(direct_io_mod, "_spare", [])
    backend = LocalBackend(str(tmp_path / "ckpts"))
    pending = backend.begin("step_1")
    first = pending.create_file("a.bin")
    if not first._direct:
        first.abort()
        pytest.skip("no O_DIRECT on this file system: no bounce buffer")
    bounce = first._bounce
    first.write(b"\xff" * (3 * PAGE + 5))  # unaligned: through the bounce buffer
    first.close()
    assert direct_io_mod._spare == [bounce]
    second = pending.create_file("b.bin")
    assert second._bounce is bounce and direct_io_mod._spare == []
    second.write(b"\x01" * 7)  # the tail is padded with zeros, then cut off
    written: list[bytes] = []
    real_write = direct_io_mod.os.write
    monkeypatch.setattr(
        direct_io_mod.os,
        "write",
        lambda fd, data: written.append(bytes(data)) or real_write(fd, data),
    )
    second.close()
    monkeypatch.setattr(direct_io_mod.os, "write", real_write)
    assert written == [b"\x01" * 7 + bytes(PAGE - 7)]
    for r in range(direct_io_mod.SPARE_BOUNCES + 1):  # several open at once: a few kept
        sinks = [pending.create_file(f"c{r}-{i}.bin") for i in range(3)]
        for s in sinks:
            s.close()
    assert len(direct_io_mod._spare) == direct_io_mod.SPARE_BOUNCES
    kept = list(direct_io_mod._spare)
    failing = pending.create_file("d.bin")
    assert failing._bounce is kept[-1]
    failing._failed = True  # as after a write that failed
    failing.abort()
    assert direct_io_mod._spare == kept[:-1] and kept[-1].closed  # closed, not kept
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_1/a.bin") == b"\xff" * (3 * PAGE + 5)
    assert backend.read_bytes("step_1/b.bin") == b"\x01" * 7


def _reject_direct_writes(monkeypatch: pytest.MonkeyPatch, sink: Any) -> None:
    """Simulate a file system that opens with O_DIRECT but refuses O_DIRECT writes."""
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        if fd == sink._fd and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_write(fd, data)

    monkeypatch.setattr(direct_io_mod.os, "write", write)


def _direct_sink(local: LocalBackend) -> tuple[Any, Any]:
    pending = local.begin("step_1")
    sink = pending.create_file("f.bin")
    if not sink.wants_alignment:
        sink.abort()
        pending.abort()
        pytest.skip("this file system has no O_DIRECT")
    return pending, sink


def test_local_sink_falls_back_when_direct_write_refused_small(local, monkeypatch):
    """EINVAL at close (the only O_DIRECT write) falls back to buffered writes correctly."""
    pending, sink = _direct_sink(local)
    _reject_direct_writes(monkeypatch, sink)
    data = rand_bytes(10_000, 1)
    sink.write(data)
    assert sink.close() == len(data)
    assert not sink.wants_alignment
    pending.commit(MANIFEST)
    assert local.read_bytes("step_1/f.bin") == data


def test_local_sink_fallback_during_bounce_flush_keeps_content(local, monkeypatch):
    pending, sink = _direct_sink(local)
    _reject_direct_writes(monkeypatch, sink)
    raw = rand_bytes(8 * MIB + 4, 2)
    data = memoryview(raw)[1:]  # unaligned: everything goes through the bounce buffer
    sink.write(data)
    size = sink.close()
    pending.commit(MANIFEST)
    got = local.read_bytes("step_1/f.bin")
    assert size == len(data)
    assert len(got) == len(data)
    assert got == bytes(data)


def test_local_sink_fallback_on_aligned_write_keeps_order(local, monkeypatch):
    pending, sink = _direct_sink(local)
    _reject_direct_writes(monkeypatch, sink)
    head = page_aligned(rand_bytes(PAGE + 5, 3))
    sink.write(head)
    sink.write(b"tail")
    size = sink.close()
    pending.commit(MANIFEST)
    want = head.tobytes() + b"tail"
    assert size == len(want)
    assert local.read_bytes("step_1/f.bin") == want


# ---- local disk: sweep ---------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


DEAD_SAVE = textwrap.dedent(
    """
    import os, sys
    from ckptstore.storage.local import LocalBackend
    backend = LocalBackend(sys.argv[1])
    pending = backend.begin(sys.argv[2])
    sink = pending.create_file("__0_0.distcp")
    sink.write(b"x" * 10000)
    sink.close()
    print(pending.token, flush=True)
    os._exit(0)  # dies mid-save: no commit, no abort
    """
)

LIVE_SAVE = textwrap.dedent(
    """
    import sys, time
    from ckptstore.storage.local import LocalBackend
    backend = LocalBackend(sys.argv[1])
    pending = backend.begin(sys.argv[2])
    pending.write_file("__0_0.distcp", b"x" * 10000)
    print(pending.token, flush=True)
    time.sleep(120)
    """
)


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"child printed nothing in {timeout} s")
    return proc.stdout.readline().strip()


def test_local_sweep_removes_a_dead_process_save_after_grace(local):
    out = subprocess.run(
        [sys.executable, "-c", DEAD_SAVE, local.root, "step_1"],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    token = out.stdout.strip()
    tmp = os.path.join(local.root, token)
    assert token.startswith(f"{TEMP_PREFIX}step_1-")
    assert os.path.isfile(os.path.join(tmp, "__0_0.distcp"))
    assert not is_locked(tmp)  # the lock died with the process
    assert_not_a_checkpoint(local, "step_1")

    assert local.sweep(3600) == []  # younger than the grace period
    assert os.path.isdir(tmp)
    age(tmp, 600)
    assert local.sweep(3600) == []  # still younger
    assert os.path.isdir(tmp)
    age(tmp, 7200)
    assert local.sweep(3600) == [token]
    assert not os.path.exists(tmp)
    assert local.list_names() == []
    commit_one(local, "step_1", {"a": b"a"})  # the name is free


def test_local_sweep_spares_a_live_process_save(local):
    with subprocess.Popen(
        [sys.executable, "-c", LIVE_SAVE, local.root, "step_1"],
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            token = _readline(proc, timeout=120)
            tmp = os.path.join(local.root, token)
            assert token.startswith(f"{TEMP_PREFIX}step_1-")
            assert is_locked(tmp)
            assert local.sweep(0) == []
            age(tmp, 30 * 86400)  # however old it looks
            assert local.sweep(0) == []
            assert os.path.isfile(os.path.join(tmp, "__0_0.distcp"))
            assert proc.poll() is None
        finally:
            proc.kill()
            proc.wait(timeout=30)
    # Once that process is dead, its leftovers go.
    assert local.sweep(0) == [token]
    assert not os.path.exists(tmp)


def test_local_sweep_spares_a_save_in_progress_in_this_process(local):
    pending = local.begin("step_1")
    write_file(pending, "a", b"a")
    tmp = os.path.join(local.root, pending.token)
    age(tmp, 30 * 86400)
    assert local.sweep(0) == []
    assert reopen(local).sweep(0) == []  # another backend object, same process
    pending.commit(MANIFEST)
    assert local.read_bytes("step_1/a") == b"a"


def test_local_sweep_never_touches_other_entries(local):
    commit_one(local, "step_1", {"a": b"committed"})
    stray = os.path.join(local.root, "step_x")  # a directory without manifest.json
    os.makedirs(os.path.join(stray, "sub"))
    with open(os.path.join(stray, "sub", "f"), "wb") as f:
        f.write(b"stray")
    os.makedirs(os.path.join(local.root, "logs"))
    with open(os.path.join(local.root, "notes.txt"), "wb") as f:
        f.write(b"notes")
    with open(os.path.join(local.root, f"{TEMP_PREFIX}not-a-dir"), "wb") as f:
        f.write(b"a file that only looks like a temp entry")
    # Named like ckptstore's temp entries, but not made by it: `ckptstore gc` removed
    # them until 2026-12-07 (a user's build directory with its sources, a config file)
    os.makedirs(os.path.join(local.root, f"{TEMP_PREFIX}build"))
    with open(os.path.join(local.root, f"{TEMP_PREFIX}build", "main.c"), "wb") as f:
        f.write(b"int main;")
    with open(os.path.join(local.root, ".pointer-config"), "wb") as f:
        f.write(b"mine")
    probe = ".pointer-probe-" + "0123456789abcdef" * 2  # (an older version's, left)
    with open(os.path.join(local.root, probe), "wb"):
        pass
    # A dead save's temp dir: unlocked, old.
    dead = os.path.join(local.root, f"{TEMP_PREFIX}step_2-0123456789ab")
    os.mkdir(dead)
    with open(os.path.join(dead, "x"), "wb") as f:
        f.write(b"x")
    before = sorted(local.list_names())
    for name in before:
        age(os.path.join(local.root, name), 30 * 86400)

    assert local.sweep(0) == [probe, os.path.basename(dead)]
    assert sorted(local.list_names()) == sorted(set(before) - {probe, os.path.basename(dead)})
    assert local.read_bytes("step_1/a") == b"committed"
    assert local.read_bytes("step_x/sub/f") == b"stray"
    assert local.read_bytes("notes.txt") == b"notes"
    assert os.path.isdir(os.path.join(local.root, "logs"))
    assert local.exists(f"{TEMP_PREFIX}not-a-dir")
    assert local.read_bytes(f"{TEMP_PREFIX}build/main.c") == b"int main;"
    assert local.read_bytes(".pointer-config") == b"mine"
    assert local.sweep(0) == []


# ---- fsspec: sweep by age --------------------------------------------------------------------


def test_fsspec_sweep_removes_abandoned_prefix(memory_top):
    backend = open_backend(f"memory://{memory_top}/root")
    commit_one(backend, "step_1", {"a": b"a"})
    abandoned = backend.begin("step_2")  # a writer that died: neither commit nor abort
    write_file(abandoned, "__0_0.distcp", b"half")
    del abandoned
    assert backend.sweep(3600) == []  # younger than the grace period
    assert backend.exists("step_2/__0_0.distcp")
    assert backend.sweep(0) == ["step_2"]
    assert not backend.exists("step_2/__0_0.distcp")
    assert backend.list_names() == ["step_1"]
    assert backend.read_bytes("step_1/a") == b"a"


def test_latest_and_finals_never_replace_a_users_file_or_symlink(local, tmp_path):
    """A root given by mistake may hold the user's own `latest`: a symlink to their
    newest run directory, or notes. Both were replaced (import, sync, pull, train)."""
    from ckptstore.manager import pointer

    commit_one(local, "step_1", {"a": b"a"})
    (tmp_path / "run7").mkdir()
    os.symlink(tmp_path / "run7", os.path.join(local.root, "latest"))
    with pytest.raises(StorageError, match="latest is not a file ckptstore wrote"):
        pointer.write_latest(local, "step_1")
    assert os.path.islink(os.path.join(local.root, "latest"))
    with open(os.path.join(local.root, "finals"), "w") as f:
        f.write("my notes, not names\n")
    pointer.record_final(local, "step_1")  # (a failure there is only logged)
    with pytest.raises(StorageError, match="finals does not hold checkpoint names"):
        pointer.forget_finals(local, {"my notes, not names"})
    assert local.read_bytes("finals") == b"my notes, not names\n"
    os.unlink(os.path.join(local.root, "latest"))
    pointer.write_latest(local, "step_1")  # its own, as before
    pointer.write_latest(local, "step_1")
    assert pointer.read_latest(local) == "step_1"


def test_fsspec_sweep_never_removes_a_prefix_of_other_files(memory_top):
    """`ckptstore gc s3://bucket` removed every prefix without a manifest: a dataset
    beside the checkpoints, too. Only one holding nothing but a save's files goes."""
    backend = open_backend(f"memory://{memory_top}/root")
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"/{memory_top}/root/datasets/train/part-0.csv", b"a,b")
    fs.pipe_file(f"/{memory_top}/root/notes/__0_0.distcp", b"x")  # one of ours
    fs.pipe_file(f"/{memory_top}/root/notes/todo.txt", b"y")  # and one not
    assert backend.foreign_files("datasets") == ["train/"]
    assert backend.foreign_files("notes") == ["todo.txt"]
    assert backend.sweep(0) == []
    assert fs.cat_file(f"/{memory_top}/root/datasets/train/part-0.csv") == b"a,b"


def test_close_after_a_failed_write_never_reports_success(local):
    pending = local.begin("step_9")
    sink = pending.create_file("f.bin")
    sink.write(b"x" * 10_000)  # buffered (bounce buffer or page cache): no error yet
    os.close(sink._fd)  # the device goes away under the sink
    with pytest.raises(StorageError):
        sink.close()  # the flush and fsync fail
    with pytest.raises(StorageError, match="not durable"):
        sink.close()  # and a second close never turns that into success
    pending.abort()


# ---- capabilities ----------------------------------------------------------------------


def test_capabilities_declared_by_each_backend(tmp_path, memory_top):
    local = LocalBackend(str(tmp_path / "a"))
    caps = local.capabilities
    assert (caps.local, caps.atomic_rename, caps.save_locks) == (True, True, True)
    assert not caps.conditional_put and not caps.multipart_uploads
    assert caps.direct_io is bool(direct_io_mod.O_DIRECT)
    assert caps.alignment_bytes == (PAGE if caps.direct_io else 1)
    buffered = LocalBackend(str(tmp_path / "b"), direct_io=False).capabilities
    assert not buffered.direct_io and buffered.alignment_bytes == 1
    assert open_backend(f"memory://{memory_top}/root").capabilities == Capabilities()


def test_capabilities_are_frozen_and_checked():
    caps = Capabilities(local=True)
    with pytest.raises(AttributeError):
        caps.local = False  # type: ignore[misc]
    for bad in (0, 3, 4097, True):
        with pytest.raises(ValueError, match="power of two"):
            Capabilities(alignment_bytes=bad)
    with pytest.raises(ValueError, match="direct_io needs"):
        Capabilities(direct_io=True)
    assert Capabilities(direct_io=True, alignment_bytes=512).direct_io


# ---- the registry: open_backend, register_backend, backend_options -------------------------


def test_open_backend_passes_backend_options_to_the_local_backend(tmp_path):
    b = open_backend(tmp_path / "x", backend_options={"direct_io": False})
    assert isinstance(b, LocalBackend)
    assert b.direct_io is False
    assert not b.capabilities.direct_io
    b = open_backend(f"file://{tmp_path}/y", backend_options={"direct_io": False})
    assert isinstance(b, LocalBackend) and b.direct_io is False


@pytest.mark.parametrize(
    ("url", "accepted"),
    [("{tmp}/x", "direct_io"), ("memory://{top}/r", "none"), ("s3://bucket/r", "part_bytes")],
)
def test_open_backend_refuses_unknown_backend_options(tmp_path, memory_top, url, accepted):
    url = url.format(tmp=tmp_path, top=memory_top)
    with pytest.raises(ValueError, match=rf"unknown backend option\(s\) \['nope'\].*{accepted}"):
        open_backend(url, backend_options={"nope": 1})


def test_open_backend_refuses_backend_options_for_a_backend_instance(local):
    assert open_backend(local, backend_options={}) is local
    with pytest.raises(ValueError, match="cannot apply"):
        open_backend(local, backend_options={"direct_io": False})


def test_register_backend_opens_a_new_scheme(tmp_path):
    """A new backend is one registration: open_backend (and so every caller) finds it."""
    scheme = f"ckpttest{uuid.uuid4().hex[:8]}"
    seen: list[dict[str, Any]] = []

    def factory(url, *, storage_options, backend_options, create):
        seen.append({"url": url, "so": storage_options, "bo": backend_options, "create": create})
        return FaultyBackend(LocalBackend(str(tmp_path / "reg"), create=create))

    register_backend(scheme, factory, options={"speed"})
    b = open_backend(f"{scheme}://anything", storage_options={"k": 1}, backend_options={"speed": 2})
    assert isinstance(b, FaultyBackend)
    assert seen == [
        {"url": f"{scheme}://anything", "so": {"k": 1}, "bo": {"speed": 2}, "create": True}
    ]
    with pytest.raises(ValueError, match="unknown backend option"):
        open_backend(f"{scheme}://x", backend_options={"other": 1})
    with pytest.raises(ValueError, match="already have a backend"):
        register_backend(scheme, factory)
    register_backend([scheme], lambda url, **kw: LocalBackend(str(tmp_path / "r2")), replace=True)
    assert isinstance(open_backend(f"{scheme}://x"), LocalBackend)


@pytest.mark.parametrize("bad", ["", "1abc", "a b", "s3://", None])
def test_register_backend_refuses_bad_schemes(bad):
    with pytest.raises(ValueError, match="URL scheme"):
        register_backend(bad, lambda url, **kw: None)  # type: ignore[arg-type,return-value]


def test_builtin_schemes_cannot_be_registered_twice_by_accident():
    with pytest.raises(ValueError, match="already have a backend"):
        register_backend("s3", lambda url, **kw: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="already have a backend"):
        register_backend("file", lambda url, **kw: None)  # type: ignore[arg-type,return-value]


# ---- S3Backend's options ---------------------------------------------------------------------


def test_s3_backend_options_have_todays_defaults(s3_server, s3_bucket):
    b = open_backend(f"s3://{s3_bucket}/r", storage_options=s3_server.options())
    assert isinstance(b, S3Backend)
    assert (b.part_bytes, b.parts_in_flight, b.call_timeout_s) == (16 * MIB, 4, 600.0)
    # The file system's own client settings are left as they are.
    assert "connect_timeout" not in b.fs.config_kwargs
    assert "retries" not in b.fs.config_kwargs
    assert b.capabilities.conditional_put and b.capabilities.multipart_uploads


def test_s3_backend_options_through_open_backend(s3_server, s3_bucket):
    options = {
        "part_bytes": 6 * MIB,
        "parts_in_flight": 2,
        "call_timeout_s": 30,
        "connect_timeout_s": 2.5,
        "read_timeout_s": 7,
        "request_retries": 1,
    }
    storage = s3_server.options(config_kwargs={"retries": {"mode": "standard"}})
    b = open_backend(f"s3://{s3_bucket}/r", storage_options=storage, backend_options=options)
    assert isinstance(b, S3Backend)
    assert (b.part_bytes, b.parts_in_flight, b.call_timeout_s) == (6 * MIB, 2, 30.0)
    assert b.fs.config_kwargs["connect_timeout"] == 2.5
    assert b.fs.config_kwargs["read_timeout"] == 7
    assert b.fs.config_kwargs["retries"] == {"mode": "standard", "max_attempts": 1}
    assert storage["config_kwargs"] == {"retries": {"mode": "standard"}}  # not modified
    # The same options again: the same (cached) file system, not a private copy.
    again = open_backend(f"s3://{s3_bucket}/r", storage_options=storage, backend_options=options)
    assert again.fs is b.fs
    commit_one(b, "step_1", {"a.bin": b"x" * (7 * MIB)})  # multipart, 6 MiB parts
    assert again.read_bytes("step_1/a.bin") == b"x" * (7 * MIB)


def test_s3_backend_constructor_applies_client_settings_to_a_private_copy(s3_server, s3_bucket):
    shared = open_backend(f"s3://{s3_bucket}/r", storage_options=s3_server.options())
    assert isinstance(shared, S3Backend)
    b = S3Backend(shared.fs, shared.root, shared.url, connect_timeout_s=3, request_retries=0)
    assert b.fs is not shared.fs
    assert b.fs.config_kwargs["connect_timeout"] == 3
    assert b.fs.config_kwargs["retries"] == {"max_attempts": 0}
    assert "connect_timeout" not in shared.fs.config_kwargs  # the shared one is untouched
    same = S3Backend(b.fs, b.root, b.url, connect_timeout_s=3)
    assert same.fs is b.fs  # already has it: no copy
    assert S3Backend(shared.fs, shared.root, shared.url).fs is shared.fs
    commit_one(b, "step_1", {"a": b"a"})
    assert shared.read_bytes("step_1/a") == b"a"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("part_bytes", MIN_PART_BYTES - 1, "at least"),
        ("part_bytes", 8.5 * MIB, "must be an int"),
        ("parts_in_flight", 0, "at least 1"),
        ("parts_in_flight", True, "must be an int"),
        ("call_timeout_s", 0, "seconds > 0"),
        ("connect_timeout_s", -1, "seconds > 0"),
        ("read_timeout_s", "15", "seconds > 0"),
        ("request_retries", -1, ">= 0"),
        ("request_retries", 1.5, "must be an int"),
    ],
)
def test_s3_backend_options_are_validated(s3_server, s3_bucket, option, value, message):
    with pytest.raises(ValueError, match=message):
        open_backend(
            f"s3://{s3_bucket}/r",
            storage_options=s3_server.options(),
            backend_options={option: value},
        )


# ---- FaultyBackend ---------------------------------------------------------------------------


def test_faulty_backend_fails_the_nth_call_of_an_operation(local):
    boom = OSError(errno.EIO, "boom")
    faulty = FaultyBackend(local, fail_nth("write", boom, nth=3, name_part="__0"))
    pending = faulty.begin("step_1")
    write_file(pending, "other.bin", b"1")  # not a matching name: not counted
    sink = pending.create_file("__0_0.distcp")
    sink.write(b"a")
    sink.write(b"b")
    with pytest.raises(OSError, match="boom") as info:
        sink.write(b"c")
    assert info.value is boom
    sink.write(b"d")  # once only
    assert sink.close() == 3
    pending.commit(MANIFEST)
    assert local.read_bytes("step_1/__0_0.distcp") == b"abd"
    ops = [op for op, _ in faulty.calls]
    assert ops[:4] == ["begin", "create_file", "write", "close"]
    assert ops[-1] == "commit"
    assert faulty.is_local() and faulty.capabilities == local.capabilities


def test_faulty_backend_fail_once_is_a_translated_storage_error(local):
    faulty = FaultyBackend(local, fail_once("close", errno.ENOSPC))
    pending = faulty.begin("step_1")
    with pytest.raises(StorageError) as info:
        pending.write_file("a.bin", b"a")
    assert info.value.errno == errno.ENOSPC
    assert isinstance(info.value, StorageFullError)
    assert "injected ENOSPC" in str(info.value)
    pending.write_file("b.bin", b"b")  # once only
    pending.commit(MANIFEST)
    assert local.read_bytes("step_1/b.bin") == b"b"


def test_faulty_backend_faults_reads_and_adds_latency(local):
    commit_one(local, "step_1", {"a.bin": b"0123456789"})
    faulty = FaultyBackend(
        local, fail_nth("read", lambda op, name: StorageError(f"{op} {name}")), delay_s=0.3
    )
    with faulty.open_reader("step_1/a.bin") as reader:
        with pytest.raises(StorageError, match=r"read step_1/a\.bin"):
            reader.read(0, 2)
        assert bytes(reader.read(2, 3)) == b"234"
    start = time.monotonic()
    faulty.begin("step_2").abort()  # begin is on the write path: slowed
    assert time.monotonic() - start >= 0.3
    start = time.monotonic()
    faulty.list_names()
    assert time.monotonic() - start < 0.3  # reads are not slowed by default
    slow_reads = FaultyBackend(local, delay_s=0.05, delay_ops={"read_bytes"})
    start = time.monotonic()
    assert slow_reads.read_bytes("step_1/a.bin") == b"0123456789"
    assert time.monotonic() - start >= 0.05
    with pytest.raises(ValueError, match="counts from 1"):
        fail_nth("write", OSError(errno.EIO, "boom"), nth=0)


def test_faulty_backend_passes_through_what_it_does_not_wrap(s3_server, s3_bucket):
    b = open_backend(f"s3://{s3_bucket}/r", storage_options=s3_server.options())
    faulty = FaultyBackend(b)
    assert faulty.open_uploads() == []  # S3's own extras are the inner backend's
    assert faulty.part_bytes == b.part_bytes
    commit_one(b, "step_1", {"a": b"abc"})
    with faulty.open_reader("step_1/a") as reader:
        assert b"".join(reader.stream(2)) == b"abc"  # type: ignore[attr-defined]
