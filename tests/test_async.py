"""Asynchronous saving: staging semantics, backpressure, errors that surface, resources."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
import torch
from helpers import Randn, assert_same, blank_like, build_state, zero_value

import ckptstore
from ckptstore.storage import LocalBackend
from ckptstore.storage.testing import FaultyBackend, fail_once


def state_of(n: int = 100_000) -> dict[str, object]:
    """Drawn from torch's global RNG: a different ``w`` at every call."""
    return build_state(None, w=Randn(n), v=torch.arange(10), count=1, meta={"lr": 0.1})


def test_mutating_after_staged_does_not_change_what_is_saved(root):
    slow = FaultyBackend(LocalBackend(root), delay_s=0.05)  # every write is slow
    state = state_of()
    expected = {"w": state["w"].clone(), "v": state["v"].clone(), "count": 1, "meta": {"lr": 0.1}}
    with ckptstore.Checkpointer(slow, chunk_bytes=64 * 1024) as ckpt:
        pending = ckpt.save_async(state, 1)
        assert pending.staged.done()
        assert not pending.done(), "the write should still be in flight"
        state["w"].add_(1.0)
        state["v"].zero_()
        state["count"] = 2
        state["meta"]["lr"] = 99.0
        pending.wait()
        target = blank_like(state, zero_value)  # w, v zeros; count 0; meta {"lr": 0.0}
        ckpt.load(target)
    assert_same(expected, target)


def test_block_until_staged_false_returns_before_the_copy(root):
    slow = FaultyBackend(LocalBackend(root), delay_s=0.05)
    state = state_of()
    expected = state["w"].clone()
    with ckptstore.Checkpointer(slow, chunk_bytes=64 * 1024) as ckpt:
        first = ckpt.save_async(state, 1)  # occupies the writer thread for a while
        second = ckpt.save_async(state, 2, block_until_staged=False)
        assert not second.staged.done(), "staging of step 2 waits behind step 1's write"
        second.staged.result(timeout=60)
        state["w"].add_(1.0)
        first.wait()
        second.wait()
        target = {**blank_like(state, zero_value), "meta": {}}
        ckpt.load(target, 2)
    assert torch.equal(target["w"], expected)


def test_backpressure_limits_saves_in_flight(root):
    slow = FaultyBackend(LocalBackend(root), delay_s=0.1)
    state = state_of()
    with ckptstore.Checkpointer(slow, max_inflight=1) as ckpt:
        first = ckpt.save_async(state, 1)
        start = time.perf_counter()
        second = ckpt.save_async(state, 2)
        waited = time.perf_counter() - start
        assert first.done(), "with max_inflight=1 the second save waits for the first"
        result = second.wait()
        assert result.backpressure_s > 0.05
        assert waited >= result.backpressure_s * 0.9


def test_two_saves_in_flight_with_max_inflight_2(root):
    slow = FaultyBackend(LocalBackend(root), delay_s=0.1)
    state = state_of()
    with ckptstore.Checkpointer(slow, max_inflight=2) as ckpt:
        first = ckpt.save_async(state, 1)
        second = ckpt.save_async(state, 2)
        assert not first.done(), "two slots: the second save did not wait"
        assert second.wait().backpressure_s < 0.05
        assert ckpt.staging_bytes >= 2 * 100_000 * 4  # one staging buffer per save in flight
        assert ckpt.pinned_bytes == 0  # CPU state: nothing pinned


def test_staging_buffers_are_allocated_once_and_reused(root):
    state = state_of()
    with ckptstore.Checkpointer(root) as ckpt:
        sizes = []
        for step in range(8):
            state["w"].add_(1.0)
            ckpt.save(state, step)
            sizes.append(ckpt.staging_bytes)
        arena = ckpt._staging._free[0]
        ckpt.save(state, 100)
        assert ckpt._staging._free[0] is arena
    assert len(set(sizes)) == 1
    assert sizes[0] >= 100_000 * 4


def test_staging_budget_is_enforced_with_a_clear_error(root):
    with (
        ckptstore.Checkpointer(root, max_staging_bytes=1000) as ckpt,
        pytest.raises(ckptstore.CkptStoreError, match="staging budget"),
    ):
        ckpt.save_async(state_of(), 1)


@pytest.mark.parametrize(
    ("op", "code", "exc_type"),
    [
        ("write", errno.EIO, ckptstore.StorageError),
        ("close", errno.EIO, ckptstore.StorageError),  # the fsync
        ("write", errno.ENOSPC, ckptstore.StorageFullError),
        ("commit", errno.EIO, ckptstore.StorageError),
    ],
)
def test_io_error_fails_that_save_only(root, op, code, exc_type):
    backend = FaultyBackend(LocalBackend(root))
    state = state_of()
    with ckptstore.Checkpointer(backend) as ckpt:
        ckpt.save(state, 1)
        backend.fault = fail_once(op, code)
        with pytest.raises(exc_type) as info:
            ckpt.save_async(state, 2).wait()
        assert info.value.errno == code
        assert isinstance(info.value, OSError)
        assert [i.step for i in ckpt.list()] == [1]
        assert not [n for n in os.listdir(root) if n.startswith(".tmp-")], (
            "temp directory left behind"
        )
        ckpt.save(state, 3)  # the next save succeeds
        assert [i.step for i in ckpt.list()] == [1, 3]
        target = state_of()
        ckpt.load(target, 1)
        assert torch.equal(target["w"], state["w"])


def test_unseen_error_surfaces_on_next_save_with_step_and_cause(root):
    backend = FaultyBackend(LocalBackend(root), fault=fail_once("close"))
    with ckptstore.Checkpointer(backend) as ckpt:
        pending = ckpt.save_async(state_of(), 7)
        while not pending.done():
            time.sleep(0.01)
        with pytest.raises(ckptstore.BackgroundSaveError, match="step 7") as info:
            ckpt.save_async(state_of(), 8)
        assert info.value.step == 7
        assert isinstance(info.value.__cause__, ckptstore.StorageError)
        # The save asked for was still started (every rank must enter every save).
        started = info.value.pending
        assert isinstance(started, ckptstore.PendingSave)
        assert started.step == 8
        assert started.wait().step == 8
        # Reported once: the next save goes through without an error.
        ckpt.save_async(state_of(), 9).wait()
        assert [i.step for i in ckpt.list()] == [8, 9]


def test_unseen_error_surfaces_on_close(root):
    backend = FaultyBackend(LocalBackend(root), fault=fail_once("write"))
    ckpt = ckptstore.Checkpointer(backend)
    ckpt.save_async(state_of(), 1)
    with pytest.raises(ckptstore.BackgroundSaveError) as info:
        ckpt.close()
    assert info.value.step == 1
    ckpt.close()  # closing twice is fine


def test_error_seen_through_wait_is_not_raised_again(root):
    backend = FaultyBackend(LocalBackend(root), fault=fail_once("write"))
    with ckptstore.Checkpointer(backend) as ckpt:
        with pytest.raises(ckptstore.StorageError):
            ckpt.save_async(state_of(), 1).wait()
        ckpt.save(state_of(), 2)  # no BackgroundSaveError: the caller already saw it


def test_staging_error_raises_in_the_caller_and_frees_the_slot(root):
    import numpy as np

    with ckptstore.Checkpointer(root, max_inflight=1) as ckpt:
        with pytest.raises(ckptstore.UnsupportedStateError, match="numpy"):
            ckpt.save_async({"bad": np.zeros(3)}, 1)
        ckpt.save(state_of(), 2)  # the slot was released


def test_same_step_twice(root):
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save(state_of(), 1)
        with pytest.raises(ckptstore.CheckpointExistsError, match="never overwrites"):
            ckpt.save_async(state_of(), 1).wait()
        slow = ckptstore.Checkpointer(FaultyBackend(LocalBackend(root), delay_s=0.05))
        try:
            slow.save_async(state_of(), 5)
            with pytest.raises(ValueError, match="already being saved"):
                slow.save_async(state_of(), 5)
        finally:
            slow.close()


def test_racing_writers_for_one_step_exactly_one_wins(root):
    results: list[object] = []

    def save(ckpt, value):
        try:
            results.append(ckpt.save({"w": torch.full((1000,), value)}, 9))
        except ckptstore.CheckpointExistsError as exc:
            results.append(exc)

    a = ckptstore.Checkpointer(FaultyBackend(LocalBackend(root), delay_s=0.02))
    b = ckptstore.Checkpointer(FaultyBackend(LocalBackend(root), delay_s=0.02))
    try:
        threads = [threading.Thread(target=save, args=(c, float(v))) for c, v in ((a, 1), (b, 2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        a.close()
        b.close()
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(results) == 2
    assert len(errors) == 1
    with ckptstore.Checkpointer(root) as ckpt:
        assert [i.step for i in ckpt.list()] == [9]
        got = {"w": torch.zeros(1000)}
        ckpt.load(got)
        assert got["w"][0].item() in (1.0, 2.0)
        assert bool((got["w"] == got["w"][0]).all())
        assert ckpt.verify(9) == []


def test_closed_checkpointer_refuses_work(root):
    ckpt = ckptstore.Checkpointer(root)
    ckpt.close()
    with pytest.raises(ckptstore.CheckpointerClosedError):
        ckpt.save_async(state_of(), 1)
    with pytest.raises(ckptstore.CheckpointerClosedError):
        ckpt.load(state_of())


def test_metadata_must_be_json(root):
    with ckptstore.Checkpointer(root) as ckpt:
        with pytest.raises(ckptstore.UnsupportedStateError, match="JSON"):
            ckpt.save_async(state_of(), 1, metadata={"x": object()})
        with pytest.raises(ckptstore.UnsupportedStateError, match="NaN"):
            ckpt.save_async(state_of(), 1, metadata={"x": float("nan")})


def test_bad_config_is_refused_early(root):
    with pytest.raises(ValueError, match="unknown codec 'lz5'"):
        ckptstore.Checkpointer(root, codec="lz5")
    with pytest.raises(ValueError, match="max_inflight"):
        ckptstore.Checkpointer(root, max_inflight=0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        ckptstore.Checkpointer(root, chunk_bytes=1000)
    with pytest.raises(TypeError):
        ckptstore.Checkpointer(root, no_such_option=1)


def test_background_staging_with_a_tight_budget_does_not_deadlock(root):
    """A save staged on the writer thread must never wait for a buffer that a later save,
    queued behind it, holds (the buffer is reserved on the caller's thread instead)."""
    state = {"w": torch.randn(262_144)}  # 1 MiB: the budget holds one staging buffer
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with ckptstore.Checkpointer(
                root, max_inflight=2, max_staging_bytes=(1 << 20) + 4096
            ) as ckpt:
                first = ckpt.save_async(state, 1, block_until_staged=False)
                second = ckpt.save_async(state, 2)  # waits, on this thread, for the buffer
                first.wait()
                second.wait()
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert done.wait(60), "deadlock: the saves never finished"
    assert not errors, errors
    with ckptstore.Checkpointer(root) as ckpt:
        assert [i.step for i in ckpt.list()] == [1, 2]


def test_root_fsync_failure_after_the_rename_leaves_nothing_listed(root, monkeypatch):
    """The rename happened but could not be made durable: undone, typed error, retry works."""
    import ckptstore.storage.local as local_mod

    real = local_mod.fsync_dir
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.save(state_of(), 1)

        def failing(path: str) -> None:
            if os.path.abspath(path) == os.path.abspath(root):
                raise OSError(errno.EIO, "injected EIO")
            real(path)

        monkeypatch.setattr(local_mod, "fsync_dir", failing)
        with pytest.raises(ckptstore.StorageError, match="fsync of the root") as info:
            ckpt.save(state_of(), 2)
        assert info.value.errno == errno.EIO
        monkeypatch.setattr(local_mod, "fsync_dir", real)
        assert [i.step for i in ckpt.list()] == [1]
        assert not [n for n in os.listdir(root) if n != "step_00000001"]
        ckpt.save(state_of(), 2)  # the same step again: nothing stands in the way
        assert [i.step for i in ckpt.list()] == [1, 2]


def test_a_save_in_flight_when_the_script_ends_is_written(tmp_path):
    """A script that ends right after save_async, without close(): the interpreter's
    exit used to stop the codec pool under the save, which was lost (an error line,
    exit status 0). It is written, and verifies."""
    from helpers import script_ends_cleanly

    script = (
        "import sys, torch, ckptstore\n"
        "c = ckptstore.Checkpointer(sys.argv[1], codec='none')\n"
        "c.save_async({'w': torch.arange(1 << 20, dtype=torch.float32)}, step=1)\n"
    )
    script_ends_cleanly(script, str(tmp_path))
    with ckptstore.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.verify(1) == []
        got = {"w": torch.zeros(1 << 20)}
        ckpt.load(got, 1)
    assert torch.equal(got["w"], torch.arange(1 << 20, dtype=torch.float32))
