"""The backend contract (``ckptstore/storage/base.py``) as tests every backend runs.

Subclass :class:`BackendContract` in a test module (its name must start with ``Test``
for pytest to collect it) and override the ``backend`` fixture to return a fresh,
empty root of the backend under test::

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def backend(self, tmp_path):
            return MyBackend(tmp_path / "root")

Override :meth:`BackendContract.reopen` if ``open_backend(backend.url)`` does not give
a second object on the same root (credentials that are not in the environment).
"""

from __future__ import annotations

import errno
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from ckptstore.errors import CheckpointExistsError, StorageError
from ckptstore.layout import MANIFEST_FILE, TEMP_PREFIX, check_name
from ckptstore.storage.base import Capabilities, PendingCheckpoint, StorageBackend
from ckptstore.storage.registry import open_backend
from ckptstore.storage.testing.buffers import BUFFER_KINDS, as_kind, rand_bytes

MANIFEST = b'{"m":1}'
MIB = 1 << 20
SIZES = [0, 1, 4095, 4096, 4097, 8 * MIB + 3]
BAD_NAME = r"must be a non-empty string|refusing unsafe"
UNSAFE_NAMES = ["..", "/etc/passwd", "a/../b", "a\x00b", "a\\b", "", ".", "./a", "a/", "a//b"]


def write_file(pending: PendingCheckpoint, fname: str, data: bytes) -> None:
    """Write ``fname`` through a sink and check the size ``close`` reports."""
    sink = pending.create_file(fname)
    sink.write(data)
    assert sink.close() == len(data)


def commit_one(backend: StorageBackend, name: str, files: dict[str, bytes]) -> None:
    """Commit checkpoint ``name`` holding ``files`` (manifest: :data:`MANIFEST`)."""
    pending = backend.begin(name)
    for fname, data in files.items():
        write_file(pending, fname, data)
    pending.commit(MANIFEST)


def temp_entries(backend: StorageBackend) -> list[str]:
    return [n for n in backend.list_names() if n.startswith(TEMP_PREFIX)]


def assert_not_a_checkpoint(backend: StorageBackend, name: str) -> None:
    assert not backend.exists(f"{name}/{MANIFEST_FILE}")
    with pytest.raises(FileNotFoundError):
        backend.read_bytes(f"{name}/{MANIFEST_FILE}")


class BackendContract:
    """What every :class:`StorageBackend` promises, as pytest tests."""

    @pytest.fixture
    def backend(self) -> StorageBackend:
        """A fresh, empty root of the backend under test: override it."""
        raise NotImplementedError("override the `backend` fixture in your subclass")

    def reopen(self, backend: StorageBackend) -> StorageBackend:
        """A second backend object on the same root, as another rank or process opens it."""
        return open_backend(backend.url)

    def test_fresh_root_lists_nothing(self, backend: StorageBackend) -> None:
        assert backend.list_names() == []
        assert not backend.exists(f"step_1/{MANIFEST_FILE}")

    def test_write_every_buffer_kind_and_size_then_read_back(self, backend: StorageBackend) -> None:
        name = "step_00000001"
        pending = backend.begin(name)
        sink = pending.create_file("__0_0.distcp")
        expected = bytearray()
        assert sink.tell() == 0
        seed = 0
        for size in SIZES:
            kinds = BUFFER_KINDS if size < MIB else ["bytes", "numpy_aligned"]
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
                    assert big[:5] == b"\xee" * 5
                    assert big[5 + n :] == b"\xee" * 5
                    assert bytes(big[5 : 5 + n]) == want
            for off, n in [(size - 1, 2), (size, 1), (0, size + 1), (-1, 1), (size + 100, 0)]:
                with pytest.raises(StorageError, match="past the end"):
                    reader.read(off, n)
            with pytest.raises(StorageError, match="past the end"):
                reader.read_into(size - 10, memoryview(bytearray(11)))

    def test_several_files_and_write_file(self, backend: StorageBackend) -> None:
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

    def test_invisible_until_commit(self, backend: StorageBackend) -> None:
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
        assert_not_a_checkpoint(self.reopen(backend), name)
        pending.commit(MANIFEST)
        assert backend.exists(f"{name}/{MANIFEST_FILE}")
        assert self.reopen(backend).read_bytes(f"{name}/data.bin") == b"x" * 5000

    def test_begin_on_committed_name_raises(self, backend: StorageBackend) -> None:
        commit_one(backend, "step_4", {"d": b"first"})
        with pytest.raises(CheckpointExistsError) as info:
            backend.begin("step_4")
        assert isinstance(info.value, FileExistsError)
        assert backend.read_bytes("step_4/d") == b"first"

    def test_two_pendings_first_commit_wins(self, backend: StorageBackend) -> None:
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

    def test_losing_writer_leaves_winner_untouched(self, backend: StorageBackend) -> None:
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

    def test_losing_commit_discards_its_own_files(self, backend: StorageBackend) -> None:
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

    def test_abort_removes_everything_and_never_raises(self, backend: StorageBackend) -> None:
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

    def test_abort_without_writing_anything(self, backend: StorageBackend) -> None:
        pending = backend.begin("step_9")
        pending.abort()
        pending.abort()
        assert backend.list_names() == []

    def test_delete(self, backend: StorageBackend) -> None:
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

    def test_swap_exchanges_two_checkpoints_or_changes_nothing(
        self, backend: StorageBackend
    ) -> None:
        commit_one(backend, "a", {"f.bin": b"a"})
        commit_one(backend, "b", {"f.bin": b"b"})
        swapped = backend.swap("a", "b")
        assert backend.read_bytes("a/f.bin") == (b"b" if swapped else b"a")
        assert backend.read_bytes("b/f.bin") == (b"a" if swapped else b"b")
        assert backend.list_names() == ["a", "b"]
        assert backend.swap("a", "never_was") is False  # nothing to exchange with
        assert backend.read_bytes("a/f.bin") == (b"b" if swapped else b"a")

    @pytest.mark.parametrize("bad", UNSAFE_NAMES, ids=repr)
    def test_unsafe_names_refused(self, backend: StorageBackend, bad: str) -> None:
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
    def test_non_string_names_refused(self, backend: StorageBackend, bad: Any) -> None:
        with pytest.raises(ValueError, match=BAD_NAME):
            backend.begin(bad)
        with pytest.raises(ValueError, match=BAD_NAME):
            backend.read_bytes(bad)

    def test_attach_writes_into_the_same_checkpoint(self, backend: StorageBackend) -> None:
        pending = backend.begin("step_13")
        other = self.reopen(backend).attach(pending.token)  # another rank, its own object
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

    def test_threads_write_and_read_in_parallel(self, backend: StorageBackend) -> None:
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

    def test_sink_close_twice_keeps_the_file(self, backend: StorageBackend) -> None:
        pending = backend.begin("step_15")
        sink = pending.create_file("f.bin")
        sink.write(b"payload")
        assert sink.close() == 7
        assert sink.close() == 7
        pending.commit(MANIFEST)
        assert backend.read_bytes("step_15/f.bin") == b"payload"

    def test_create_file_never_replaces(self, backend: StorageBackend) -> None:
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

    def test_align_pads_only_when_the_sink_wants_it(self, backend: StorageBackend) -> None:
        pending = backend.begin("step_17")
        sink = pending.create_file("f.bin")
        if not backend.capabilities.direct_io:
            assert not sink.wants_alignment  # only a backend that declares direct I/O pads
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

    def test_file_names_with_a_directory_part(self, backend: StorageBackend) -> None:
        pending = backend.begin("step_2")
        pending.write_file("nested/inner.bin", b"inner")
        pending.commit(MANIFEST)
        assert backend.read_bytes("step_2/nested/inner.bin") == b"inner"

    def test_write_zero_size_multidimensional_buffer(self, backend: StorageBackend) -> None:
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

    def test_missing_files(self, backend: StorageBackend) -> None:
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

    def test_sweep_never_removes_committed_checkpoints(self, backend: StorageBackend) -> None:
        commit_one(backend, "step_19", {"a.bin": b"a" * 100})
        assert backend.sweep(0) == []
        assert backend.read_bytes("step_19/a.bin") == b"a" * 100

    def test_sweep_spares_a_save_in_progress_in_this_process(self, backend: StorageBackend) -> None:
        pending = backend.begin("step_20")
        write_file(pending, "__0_0.distcp", b"in progress")
        assert backend.sweep(0) == []
        pending.commit(MANIFEST)
        assert backend.read_bytes("step_20/__0_0.distcp") == b"in progress"

    def test_sweep_spares_a_committed_checkpoint_named_like_a_temp_dir(
        self, backend: StorageBackend
    ) -> None:
        name = f"{TEMP_PREFIX}mine"
        try:
            pending = backend.begin(name)
        except ValueError:
            return  # refusing such a name up front is a fine answer too
        pending.write_file("a", b"a")
        pending.commit(MANIFEST)
        assert backend.sweep(0) == []
        assert backend.read_bytes(f"{name}/a") == b"a"

    def test_capabilities_is_local_join_repr(self, backend: StorageBackend) -> None:
        caps = backend.capabilities
        assert isinstance(caps, Capabilities)
        assert backend.capabilities == caps  # asking again gives the same answer
        assert backend.is_local() is caps.local
        assert backend.join("step_1", MANIFEST_FILE) == f"step_1/{MANIFEST_FILE}"
        assert type(backend).__name__ in repr(backend)

    def test_open_backend_passes_a_backend_through(self, backend: StorageBackend) -> None:
        assert open_backend(backend) is backend
