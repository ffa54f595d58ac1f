"""The storage layer: one contract suite for every backend, then local-disk specifics.

The contract (``ckptstore/storage/base.py``) runs against ``LocalBackend`` on ``tmp_path``
and ``FsspecBackend`` on fsspec's ``memory://`` file system. The local-only part checks
what makes local saves crash-safe: the ``flock``-ed temp directory, the O_DIRECT sink and
its bounce buffer, the no-replace rename, the fsync order, delete-by-rename, and a sweep
that removes only dead saves' leftovers (made by real processes that really die).

Tests marked ``xfail(strict=True, reason="BUG: ...")`` demonstrate bugs in the package.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import selectors
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import pytest

from ckptstore.errors import CheckpointExistsError, StorageError
from ckptstore.layout import LOCK_FILE, MANIFEST_FILE, TEMP_PREFIX, check_name
from ckptstore.storage import FsspecBackend, LocalBackend, S3Backend, StorageBackend, open_backend
from ckptstore.storage import _direct_io as direct_io_mod
from ckptstore.storage import local as local_mod
from ckptstore.storage.s3 import MIN_PART_BYTES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = b'{"m":1}'
PAGE = 4096
MIB = 1 << 20
SIZES = [0, 1, 4095, 4096, 4097, 8 * MIB + 3]
BAD_NAME = r"must be a non-empty string|refusing unsafe"
UNSAFE_NAMES = ["..", "/etc/passwd", "a/../b", "a\x00b", "a\\b", "", ".", "./a", "a/", "a//b"]


# ---- helpers ------------------------------------------------------------------------


def rand_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def page_aligned(data: bytes) -> np.ndarray:
    """A writable uint8 array over anonymous mmap memory: its address is page-aligned."""
    m = mmap.mmap(-1, max(len(data), 1))
    arr = np.frombuffer(m, dtype=np.uint8)[: len(data)]
    arr[:] = np.frombuffer(data, dtype=np.uint8)
    assert arr.ctypes.data % PAGE == 0
    return arr


def as_kind(data: bytes, kind: str) -> Any:
    """``data`` as one of the bytes-like objects a sink must accept."""
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "numpy":
        return np.frombuffer(data, dtype=np.uint8).copy()
    if kind == "numpy_unaligned":  # a view that starts one byte into its buffer
        buf = np.zeros(len(data) + 1, dtype=np.uint8)
        buf[1:] = np.frombuffer(data, dtype=np.uint8)
        return buf[1:]
    if kind == "numpy_aligned":
        return page_aligned(data)
    if kind == "numpy_2d":  # multi-dimensional, C-contiguous (zero-size: see its own test)
        if len(data) % 2 or not data:
            return np.frombuffer(data, dtype=np.uint8).copy()
        return np.frombuffer(data, dtype=np.uint8).reshape(2, -1).copy()
    raise AssertionError(kind)


KINDS = [
    "bytes",
    "bytearray",
    "memoryview",
    "numpy",
    "numpy_unaligned",
    "numpy_aligned",
    "numpy_2d",
]


def write_file(pending: Any, fname: str, data: bytes) -> None:
    sink = pending.create_file(fname)
    sink.write(data)
    assert sink.close() == len(data)


def commit_one(backend: StorageBackend, name: str, files: dict[str, bytes]) -> None:
    pending = backend.begin(name)
    for fname, data in files.items():
        write_file(pending, fname, data)
    pending.commit(MANIFEST)


def reopen(backend: StorageBackend) -> StorageBackend:
    """A second backend object on the same root, as another rank or process opens it."""
    return open_backend(backend.url)


def temp_entries(backend: StorageBackend) -> list[str]:
    return [n for n in backend.list_names() if n.startswith(TEMP_PREFIX)]


def assert_not_a_checkpoint(backend: StorageBackend, name: str) -> None:
    assert not backend.exists(f"{name}/{MANIFEST_FILE}")
    with pytest.raises(FileNotFoundError):
        backend.read_bytes(f"{name}/{MANIFEST_FILE}")


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


@pytest.fixture(params=["local", "fsspec", "s3"])
def backend(request, tmp_path, memory_top):
    """The same contract on local disk, fsspec's memory file system and a real S3 server."""
    if request.param == "local":
        b = open_backend(tmp_path / "ckpts")
        assert isinstance(b, LocalBackend)
    elif request.param == "fsspec":
        b = open_backend(f"memory://{memory_top}/root")
        assert isinstance(b, FsspecBackend)
    else:
        server = request.getfixturevalue("s3_server")
        bucket = server.new_bucket()
        b = open_backend(f"s3://{bucket}/root", storage_options=server.options())
        assert isinstance(b, S3Backend)
        b.part_bytes = MIN_PART_BYTES  # so that the larger test files go multipart
    return b


@pytest.fixture
def local(tmp_path) -> LocalBackend:
    return LocalBackend(str(tmp_path / "ckpts"))


# ---- contract: every backend ----------------------------------------------------------


def test_fresh_root_lists_nothing(backend):
    assert backend.list_names() == []
    assert not backend.exists(f"step_1/{MANIFEST_FILE}")


def test_write_every_buffer_kind_and_size_then_read_back(backend):
    name = "step_00000001"
    pending = backend.begin(name)
    sink = pending.create_file("__0_0.distcp")
    expected = bytearray()
    assert sink.tell() == 0
    seed = 0
    for size in SIZES:
        kinds = KINDS if size < MIB else ["bytes", "numpy_aligned"]
        for kind in kinds:
            seed += 1
            data = rand_bytes(size, seed)
            sink.write(as_kind(data, kind))
            expected += data
            assert sink.tell() == len(expected), (size, kind)
    # A wider dtype is written as its raw bytes.
    floats = np.arange(1001, dtype=np.float32)
    sink.write(floats)
    expected += floats.tobytes()
    assert sink.tell() == len(expected)
    assert sink.close() == len(expected)

    assert not backend.exists(f"{name}/{MANIFEST_FILE}")
    pending.commit(MANIFEST)

    assert name in backend.list_names()
    assert temp_entries(backend) == []
    assert backend.read_bytes(f"{name}/{MANIFEST_FILE}") == MANIFEST
    assert backend.read_bytes(f"{name}/__0_0.distcp") == bytes(expected)

    size = len(expected)
    rng = np.random.default_rng(99)
    offsets = [0, 1, 4095, 4096, 4097, size // 2 + 7, size - 4097, size - 1, size]
    offsets += [int(x) for x in rng.integers(0, size, 8)]
    with backend.open_reader(f"{name}/__0_0.distcp") as reader:
        assert reader.size == size
        for off in offsets:
            for n in (0, 1, 4097, 65539):
                n = min(n, size - off)
                want = bytes(expected[off : off + n])
                assert bytes(reader.read(off, n)) == want, (off, n)
                out = bytearray(n)
                reader.read_into(off, memoryview(out))
                assert bytes(out) == want, (off, n)
                arr = np.full(n, 0xAB, dtype=np.uint8)
                reader.read_into(off, arr.data)
                assert arr.tobytes() == want, (off, n)
                big = bytearray(b"\xee" * (n + 10))  # into the middle of a larger buffer
                reader.read_into(off, memoryview(big)[5 : 5 + n])
                assert big[:5] == b"\xee" * 5 and big[5 + n :] == b"\xee" * 5
                assert bytes(big[5 : 5 + n]) == want
        for off, n in [(size - 1, 2), (size, 1), (0, size + 1), (-1, 1), (size + 100, 0)]:
            with pytest.raises(StorageError, match="past the end"):
                reader.read(off, n)
        with pytest.raises(StorageError, match="past the end"):
            reader.read_into(size - 10, memoryview(bytearray(11)))


def test_several_files_and_write_file(backend):
    pending = backend.begin("step_2")
    write_file(pending, "a.bin", b"alpha")
    write_file(pending, "empty.bin", b"")
    pending.write_file(".metadata", b"small metadata")
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_2/a.bin") == b"alpha"
    assert backend.read_bytes("step_2/empty.bin") == b""
    assert backend.read_bytes("step_2/.metadata") == b"small metadata"
    assert backend.exists("step_2/.metadata")
    with backend.open_reader("step_2/empty.bin") as r:
        assert r.size == 0
        assert bytes(r.read(0, 0)) == b""


def test_invisible_until_commit(backend):
    name = "step_3"
    pending = backend.begin(name)
    assert_not_a_checkpoint(backend, name)
    write_file(pending, "data.bin", b"x" * 5000)
    open_sink = pending.create_file("more.bin")
    open_sink.write(b"y" * 10)
    assert_not_a_checkpoint(backend, name)
    assert open_sink.close() == 10
    pending.write_file(".metadata", b"meta")
    assert_not_a_checkpoint(backend, name)
    # A second backend object (another process) does not see it either.
    assert_not_a_checkpoint(reopen(backend), name)
    pending.commit(MANIFEST)
    assert backend.exists(f"{name}/{MANIFEST_FILE}")
    assert reopen(backend).read_bytes(f"{name}/data.bin") == b"x" * 5000


def test_begin_on_committed_name_raises(backend):
    commit_one(backend, "step_4", {"d": b"first"})
    with pytest.raises(CheckpointExistsError) as info:
        backend.begin("step_4")
    assert isinstance(info.value, FileExistsError)
    assert backend.read_bytes("step_4/d") == b"first"


def test_two_pendings_first_commit_wins(backend):
    p1 = backend.begin("step_5")
    p2 = backend.begin("step_5")
    write_file(p1, "rank0.bin", b"from p1")
    write_file(p2, "other.bin", b"from p2")
    p1.commit(b'{"who":"p1"}')
    with pytest.raises(CheckpointExistsError) as info:
        p2.commit(b'{"who":"p2"}')
    assert isinstance(info.value, FileExistsError)
    p2.abort()  # what the DCP writer does after a failed commit
    p2.abort()
    assert backend.read_bytes(f"step_5/{MANIFEST_FILE}") == b'{"who":"p1"}'
    assert backend.read_bytes("step_5/rank0.bin") == b"from p1"
    assert not backend.exists("step_5/other.bin")
    assert temp_entries(backend) == []


@pytest.mark.parametrize(
    "backend",
    ["local", "fsspec", "s3"],
    indirect=True,
)
def test_losing_writer_leaves_winner_untouched(backend):
    p1 = backend.begin("step_6")
    p2 = backend.begin("step_6")
    write_file(p1, "__0_0.distcp", b"winner data")
    p1.commit(b'{"who":"p1"}')
    refused: StorageError | None = None
    try:
        # p2 began before p1 committed. Object stores write under the final prefix:
        # there the loser is stopped when it tries to create a file that exists.
        write_file(p2, "__0_0.distcp", b"loser data!")
    except StorageError as exc:
        refused = exc
    if refused is None:
        with pytest.raises(CheckpointExistsError):
            p2.commit(b'{"who":"p2"}')
    else:
        assert refused.errno == errno.EEXIST
    p2.abort()
    assert backend.read_bytes(f"step_6/{MANIFEST_FILE}") == b'{"who":"p1"}'
    assert backend.read_bytes("step_6/__0_0.distcp") == b"winner data"


def test_losing_commit_discards_its_own_files(backend):
    p1 = backend.begin("step_7")
    p2 = backend.begin("step_7")
    write_file(p1, "a.bin", b"a")
    write_file(p2, "stray.bin", b"b")
    # Object stores find out what is the winner's from its manifest's file list.
    winner = b'{"files": {"a.bin": {"size_bytes": 1}}}'
    p1.commit(winner)
    with pytest.raises(CheckpointExistsError):
        p2.commit(winner)
    assert not backend.exists("step_7/stray.bin")
    assert backend.read_bytes("step_7/a.bin") == b"a"


def test_abort_removes_everything_and_never_raises(backend):
    name = "step_8"
    pending = backend.begin(name)
    write_file(pending, "done.bin", b"d" * 10000)
    pending.write_file(".metadata", b"m")
    half = pending.create_file("half.bin")
    half.write(b"h" * 100)
    half.abort()
    half.abort()
    pending.abort()
    pending.abort()
    assert_not_a_checkpoint(backend, name)
    for fname in ("done.bin", ".metadata", "half.bin"):
        assert not backend.exists(f"{name}/{fname}")
    assert name not in backend.list_names()
    assert temp_entries(backend) == []
    # The name is free again.
    commit_one(backend, name, {"x": b"again"})
    assert backend.read_bytes(f"{name}/x") == b"again"


def test_abort_without_writing_anything(backend):
    pending = backend.begin("step_9")
    pending.abort()
    pending.abort()
    assert backend.list_names() == []


def test_delete(backend):
    commit_one(backend, "step_10", {"a.bin": b"a" * 3000, "b.bin": b"b"})
    commit_one(backend, "step_11", {"a.bin": b"keep"})
    backend.delete("step_10")
    assert_not_a_checkpoint(backend, "step_10")
    assert not backend.exists("step_10/a.bin")
    assert "step_10" not in backend.list_names()
    assert backend.list_names() == ["step_11"]
    assert backend.read_bytes("step_11/a.bin") == b"keep"
    backend.delete("step_10")  # already gone
    backend.delete("never_was")
    # Saving under a deleted name works.
    commit_one(backend, "step_10", {"a.bin": b"new"})
    assert backend.read_bytes("step_10/a.bin") == b"new"


@pytest.mark.parametrize("bad", UNSAFE_NAMES, ids=repr)
def test_unsafe_names_refused(backend, bad):
    with pytest.raises(ValueError, match=BAD_NAME):
        check_name(bad)
    with pytest.raises(ValueError, match=BAD_NAME):
        backend.begin(bad)
    with pytest.raises(ValueError, match=BAD_NAME):
        backend.read_bytes(bad)
    with pytest.raises(ValueError, match=BAD_NAME):
        backend.open_reader(bad)
    with pytest.raises(ValueError, match=BAD_NAME):
        backend.exists(bad)
    with pytest.raises(ValueError, match=BAD_NAME):
        backend.attach(bad)
    with pytest.raises(ValueError, match=BAD_NAME):
        backend.delete(bad)
    pending = backend.begin("step_12")
    try:
        with pytest.raises(ValueError, match=BAD_NAME):
            pending.create_file(bad)
        with pytest.raises(ValueError, match=BAD_NAME):
            pending.write_file(bad, b"x")
    finally:
        pending.abort()
    assert backend.list_names() == []


@pytest.mark.parametrize("bad", [None, b"step_1", 7])
def test_non_string_names_refused(backend, bad):
    with pytest.raises(ValueError, match=BAD_NAME):
        backend.begin(bad)
    with pytest.raises(ValueError, match=BAD_NAME):
        backend.read_bytes(bad)


def test_check_name_accepts_plain_names():
    for good in ["step_1", "step_1/__0_0.distcp", "a/b/c", ".metadata", "a..b", ".tmp-x"]:
        assert check_name(good) == good


def test_attach_writes_into_the_same_checkpoint(backend):
    pending = backend.begin("step_13")
    other = reopen(backend).attach(pending.token)  # another rank, its own backend object
    same = backend.attach(pending.token)
    write_file(pending, "__0_0.distcp", b"rank0")
    write_file(other, "__1_0.distcp", b"rank1")
    same.write_file("__2_0.distcp", b"rank2")
    assert_not_a_checkpoint(backend, "step_13")
    with pytest.raises(RuntimeError):
        other.commit(MANIFEST)  # only the coordinator commits
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_13/__0_0.distcp") == b"rank0"
    assert backend.read_bytes("step_13/__1_0.distcp") == b"rank1"
    assert backend.read_bytes("step_13/__2_0.distcp") == b"rank2"
    assert backend.read_bytes(f"step_13/{MANIFEST_FILE}") == MANIFEST


def test_threads_write_and_read_in_parallel(backend):
    pending = backend.begin("step_14")
    blobs = {f"__{i}_0.distcp": rand_bytes(300_000 + i, seed=i) for i in range(6)}

    def put(item: tuple[str, bytes]) -> None:
        fname, data = item
        sink = pending.create_file(fname)
        for k in range(0, len(data), 70_001):
            sink.write(data[k : k + 70_001])
        assert sink.close() == len(data)

    with ThreadPoolExecutor(4, thread_name_prefix="test-storage") as pool:
        list(pool.map(put, blobs.items()))
    pending.commit(MANIFEST)

    data = blobs["__5_0.distcp"]
    ranges = [(o, 20_011) for o in range(0, len(data) - 20_011, 9_973)]
    with backend.open_reader("step_14/__5_0.distcp") as reader:

        def get(r: tuple[int, int]) -> bytes:
            return bytes(reader.read(*r))

        with ThreadPoolExecutor(8, thread_name_prefix="test-storage") as pool:
            got = list(pool.map(get, ranges))
    assert got == [data[o : o + n] for o, n in ranges]


@pytest.mark.parametrize(
    "backend",
    ["local", "fsspec", "s3"],
    indirect=True,
)
def test_sink_close_twice_keeps_the_file(backend):
    pending = backend.begin("step_15")
    sink = pending.create_file("f.bin")
    sink.write(b"payload")
    assert sink.close() == 7
    assert sink.close() == 7
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_15/f.bin") == b"payload"


@pytest.mark.parametrize(
    "backend",
    ["local", "fsspec", "s3"],
    indirect=True,
)
def test_create_file_never_replaces(backend):
    pending = backend.begin("step_16")
    pending.write_file("f.bin", b"original")

    def replace() -> None:
        sink = pending.create_file("f.bin")
        try:
            sink.write(b"replacement")
            sink.close()
        except BaseException:
            sink.abort()
            raise

    with pytest.raises((StorageError, FileExistsError)):  # at create_file, or at close
        replace()
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_16/f.bin") == b"original"


def test_align_pads_only_when_the_sink_wants_it(backend):
    pending = backend.begin("step_17")
    sink = pending.create_file("f.bin")
    expected = bytearray()
    for piece, boundary in [(b"abc", 4096), (b"d" * 5000, 512), (b"", 4096), (b"e", 8)]:
        sink.write(piece)
        expected += piece
        sink.align(boundary)
        if sink.wants_alignment:
            expected += bytes(-len(expected) % boundary)
        assert sink.tell() == len(expected)
    assert sink.close() == len(expected)
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_17/f.bin") == bytes(expected)


@pytest.mark.parametrize(
    "backend",
    ["local", "fsspec", "s3"],
    indirect=True,
)
def test_file_names_with_a_directory_part(backend):
    pending = backend.begin("step_2")
    pending.write_file("nested/inner.bin", b"inner")
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_2/nested/inner.bin") == b"inner"


def test_write_zero_size_multidimensional_buffer(backend):
    pending = backend.begin("step_3")
    sink = pending.create_file("f.bin")
    try:
        sink.write(b"a")
        sink.write(np.empty((2, 0), dtype=np.uint8))
        sink.write(np.empty((0, 3), dtype=np.float32))
        sink.write(b"b")
        assert sink.close() == 2
    except BaseException:
        sink.abort()
        pending.abort()
        raise
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_3/f.bin") == b"ab"


def test_missing_files(backend):
    with pytest.raises(FileNotFoundError):
        backend.read_bytes(f"nope/{MANIFEST_FILE}")
    commit_one(backend, "step_18", {"a": b"a"})
    with pytest.raises(FileNotFoundError):
        backend.read_bytes("step_18/missing.bin")
    with pytest.raises(FileNotFoundError):
        backend.open_reader("step_18/missing.bin")
    with pytest.raises(FileNotFoundError):
        backend.open_reader(f"nope/{MANIFEST_FILE}")
    assert not backend.exists("step_18/missing.bin")


def test_sweep_never_removes_committed_checkpoints(backend):
    commit_one(backend, "step_19", {"a.bin": b"a" * 100})
    assert backend.sweep(0) == []
    assert backend.read_bytes("step_19/a.bin") == b"a" * 100


@pytest.mark.parametrize(
    "backend",
    ["local", "fsspec", "s3"],
    indirect=True,
)
def test_sweep_spares_a_save_in_progress_in_this_process(backend):
    pending = backend.begin("step_20")
    write_file(pending, "__0_0.distcp", b"in progress")
    assert backend.sweep(0) == []
    pending.commit(MANIFEST)
    assert backend.read_bytes("step_20/__0_0.distcp") == b"in progress"


@pytest.mark.parametrize(
    "backend",
    ["local", "fsspec", "s3"],
    indirect=True,
)
def test_sweep_spares_a_committed_checkpoint_named_like_a_temp_dir(backend):
    name = f"{TEMP_PREFIX}mine"
    try:
        pending = backend.begin(name)
    except ValueError:
        return  # refusing such a name up front is a fine answer too
    pending.write_file("a", b"a")
    pending.commit(MANIFEST)
    assert backend.sweep(0) == []
    assert backend.read_bytes(f"{name}/a") == b"a"


def test_is_local_join_repr(backend):
    assert backend.is_local() is isinstance(backend, LocalBackend)
    assert backend.join("step_1", MANIFEST_FILE) == f"step_1/{MANIFEST_FILE}"
    assert type(backend).__name__ in repr(backend)


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


def test_open_backend_passes_a_backend_through(backend):
    assert open_backend(backend) is backend


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
    with pytest.raises(StorageError) as info:
        open_backend(bad_root)
    assert info.value.errno == errno.ENOTDIR
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


def test_local_read_of_a_directory_is_storage_error(local):
    commit_one(local, "step_1", {"a": b"a"})
    with pytest.raises(StorageError):
        local.read_bytes("step_1")  # a directory, not a file


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


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "buffered"])
def test_local_sink_mixed_aligned_and_unaligned(tmp_path, monkeypatch, direct_io):
    backend = LocalBackend(str(tmp_path / "ckpts"), direct_io=direct_io)
    pending = backend.begin("step_1")
    sink = pending.create_file("__0_0.distcp")
    if direct_io and not sink.wants_alignment:
        sink.abort()
        pending.abort()
        pytest.skip("this file system has no O_DIRECT")
    assert sink.wants_alignment is direct_io

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
    align(PAGE)
    put(bytearray(rand_bytes(5000, 2)))
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
    # A dead save's temp dir: unlocked, old.
    dead = os.path.join(local.root, f"{TEMP_PREFIX}step_2-0123456789ab")
    os.mkdir(dead)
    with open(os.path.join(dead, "x"), "wb") as f:
        f.write(b"x")
    before = sorted(local.list_names())
    for name in before:
        age(os.path.join(local.root, name), 30 * 86400)

    assert local.sweep(0) == [os.path.basename(dead)]
    assert sorted(local.list_names()) == sorted(set(before) - {os.path.basename(dead)})
    assert local.read_bytes("step_1/a") == b"committed"
    assert local.read_bytes("step_x/sub/f") == b"stray"
    assert local.read_bytes("notes.txt") == b"notes"
    assert os.path.isdir(os.path.join(local.root, "logs"))
    assert local.exists(f"{TEMP_PREFIX}not-a-dir")
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
