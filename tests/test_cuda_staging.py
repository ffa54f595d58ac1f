"""The CUDA staging path's ordering, proven on a CPU with a fake copy engine.

A real GPU copies asynchronously: ``submit`` returns before the bytes have landed. The
:class:`DelayedCopyEngine` here does the same on a thread of its own, ``delay_s`` after
submission, reading the sources at that moment as a GPU stream would. With it:

* staging (and so ``pending.staged``) resolves after the copies completed, not after
  they were submitted: were it otherwise, the arena would still hold zeros and the
  checkpoint would not reload bit-exact;
* the caller's marks are taken on the caller's thread, the copies issued on the writer
  thread with ``block_until_staged=False`` (the CUDA engine sets each device there);
* a state changed right after ``staged`` is saved as it was;
* a failing copy gives its arena back.

Host buffers: exact size, page-aligned, pinned with ``cudaHostRegister`` (checked
against a recording stand-in for ``cudart``) and unpinned on close; nothing pinned on a
machine without CUDA. The same paths on real GPUs are in ``test_cuda.py``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
import torch
from helpers import Randn, assert_same, blank_like, build_state

import ckptstore
from ckptstore.engine import host_buffers
from ckptstore.engine.host_buffers import HostBuffer
from ckptstore.engine.stager import StagingPool

DELAY_S = 0.3


class DelayedCopyEngine:
    """A copy engine whose copies land ``delay_s`` after ``submit``, on another thread."""

    def __init__(self, delay_s: float = DELAY_S, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.log: list[tuple[str, str]] = []  # (call, thread name)
        self.completed_at: list[float] = []

    def mark(self, devices: list[torch.device]) -> list[torch.device]:
        self.log.append(("mark", threading.current_thread().name))
        return list(devices)

    def submit(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor], marks: Any) -> Any:
        self.log.append(("submit", threading.current_thread().name))
        if self.fail:
            raise RuntimeError("injected copy failure")

        def land() -> None:
            time.sleep(self.delay_s)
            for dst, src in zip(dsts, srcs, strict=True):
                dst.copy_(src)
            self.completed_at.append(time.monotonic())

        worker = threading.Thread(target=land, name="fake-copy")
        worker.start()
        return worker

    def complete(self, ticket: threading.Thread) -> None:
        self.log.append(("complete", threading.current_thread().name))
        ticket.join()


def make_state(seed: int) -> dict[str, Any]:
    return build_state(seed, w=Randn(300_000), b=Randn(1001, torch.half), nested={"m": Randn(64)})


def test_stage_returns_after_the_copies_landed_not_after_submission():
    engine = DelayedCopyEngine()
    pool = StagingPool(copy_engine=engine)
    state = make_state(1)
    start = time.monotonic()
    staged = pool.stage(state)
    returned = time.monotonic()
    assert returned - start >= DELAY_S
    assert engine.completed_at and engine.completed_at[0] <= returned
    for fqn, want in (("w", state["w"]), ("b", state["b"]), ("nested.m", state["nested"]["m"])):
        assert torch.equal(staged.flat[fqn], want), fqn  # zeros had it returned early
    assert [c for c, _ in engine.log] == ["mark", "submit", "complete"]
    pool.release(staged)
    pool.close()


def test_staged_resolves_after_completion_and_a_change_right_after_is_not_saved(root):
    engine = DelayedCopyEngine()
    state = make_state(2)
    want = {
        "w": state["w"].clone(),
        "b": state["b"].clone(),
        "nested": {"m": state["nested"]["m"].clone()},
    }
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt._staging.copy_engine = engine
        resolved: list[float] = []
        pending = ckpt.save_async(state, 2, block_until_staged=False)
        pending.staged.add_done_callback(lambda _: resolved.append(time.monotonic()))
        pending.staged.result(timeout=60)
        # Right after staged: the training loop changes its tensors in place.
        for t in (state["w"], state["b"], state["nested"]["m"]):
            t.add_(1)
        pending.wait(timeout=60)
        assert engine.completed_at and resolved and engine.completed_at[0] <= resolved[0]
        calls = dict(engine.log)
        assert calls["mark"] == threading.current_thread().name  # the caller's streams
        assert calls["submit"] == calls["complete"] != calls["mark"]  # the writer thread
        target = blank_like(want)
        ckpt.load(target, 2)
        assert_same(want, target)
        assert ckpt.verify(2) == []


def test_a_copy_that_fails_gives_its_arena_back(root):
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt._staging.copy_engine = DelayedCopyEngine(fail=True)
        with pytest.raises(RuntimeError, match="injected copy failure"):
            ckpt.save(make_state(3), 3)
        ckpt._staging.copy_engine = None  # the CPU path again, same arena reused
        ckpt.save(make_state(4), 4)
        target = blank_like(make_state(4))
        ckpt.load(target, 4)
        assert_same(make_state(4), target)
        assert [i.step for i in ckpt.list()] == [4]


# ---- host buffers -------------------------------------------------------------------


class RecordingCudart:
    """Stands in for ``torch.cuda.cudart()``: records (un)registrations, may refuse."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.registered: dict[int, int] = {}
        self.calls: list[tuple[Any, ...]] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        self.calls.append(("register", ptr, size, flags))
        if self.refuse:
            return 2  # cudaErrorMemoryAllocation
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        self.calls.append(("unregister", ptr))
        return 0 if self.registered.pop(ptr, None) is not None else 712


@pytest.fixture
def cudart(monkeypatch):
    fake = RecordingCudart()
    monkeypatch.setattr(host_buffers.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_buffers.torch.cuda, "cudart", lambda: fake)
    return fake


def test_host_buffer_without_cuda_is_exact_aligned_and_unpinned():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")
    n = (1 << 20) + 12_345  # not a power of two, not a page multiple
    buf = HostBuffer(n, pin=True)
    assert buf.tensor.numel() == n and buf.tensor.data_ptr() % 4096 == 0
    assert not buf.pinned
    buf.close()
    assert buf.tensor.numel() == 0


def test_host_buffer_is_registered_at_its_exact_size_and_unregistered_on_close(cudart):
    n = (2 << 20) + 4096 + 7
    buf = HostBuffer(n, pin=True)
    ptr = buf.tensor.data_ptr()
    assert buf.pinned and cudart.registered == {ptr: n}
    assert cudart.calls[0] == ("register", ptr, n, 1)  # portable: any device's context
    buf.tensor[-1] = 7  # the memory is usable
    buf.close()
    assert not buf.pinned and cudart.registered == {}
    buf.close()  # twice: unregistered once
    assert [c[0] for c in cudart.calls] == ["register", "unregister"]


def test_host_buffer_dropped_without_close_is_unregistered(cudart):
    buf = HostBuffer(1 << 16, pin=True)
    assert cudart.registered
    del buf
    assert cudart.registered == {}


def test_pinning_refused_falls_back_to_pageable_memory_and_says_so(cudart, caplog):
    cudart.refuse = True
    buf = HostBuffer(1 << 16, pin=True)
    assert not buf.pinned
    assert "could not pin" in caplog.text
    buf.close()
    assert [c[0] for c in cudart.calls] == ["register"]


def test_pool_reports_pinned_bytes_truthfully_and_gives_them_back(cudart):
    pool = StagingPool(pin_memory=True, slots=2)
    state = make_state(5)
    staged = pool.stage(state)
    total = pool.allocated_bytes
    assert total == staged.tensor_bytes == pool.pinned_bytes
    assert sum(cudart.registered.values()) == total  # exact, no power-of-two rounding
    pool.release(staged)
    pool.close()
    assert cudart.registered == {}
    unpinned = StagingPool(pin_memory=False)
    unpinned.release(unpinned.stage(state))
    assert unpinned.pinned_bytes == 0 and unpinned.allocated_bytes == total
    unpinned.close()


# ---- CUDA generator states across device counts ---------------------------------------


@pytest.mark.parametrize(
    ("saved", "have", "restored", "says"),
    [
        (2, 2, 2, None),
        (8, 2, 2, "restored device(s) 0-1; the saved states of device(s) 2-7 are not used"),
        (1, 4, 1, "restored device(s) 0-0; device(s) 1-3 keep their current state"),
        (4, 0, 0, "has no GPU: not restored"),
    ],
)
def test_cuda_generators_restore_what_matches_and_say_what_does_not(saved, have, restored, says):
    from ckptstore.integrations.trainstate import cuda_rng_plan

    n, problem = cuda_rng_plan(saved, have)
    assert n == restored
    if says is None:
        assert problem is None
    else:
        assert problem is not None and says in problem and f"{saved} device(s)" in problem


def test_a_cpu_state_is_not_pinned_unless_asked_even_where_cuda_is(cudart):
    """Pinning a CPU state's arena buys nothing and would create a CUDA context on the
    thread's current device (cuda:0, on every rank): the default pins GPU states only."""
    pool = StagingPool()  # pin_memory=None: the default
    pool.release(pool.stage(make_state(3)))
    assert pool.pinned_bytes == 0 and cudart.calls == []
    pool.close()
    asked = StagingPool(pin_memory=True)
    asked.release(asked.stage(make_state(3)))
    assert asked.pinned_bytes == asked.allocated_bytes > 0
    asked.close()


def test_a_refused_registration_clears_the_error_it_left(cudart, monkeypatch):
    """cudaHostRegister's error stays as the thread's last CUDA error, which torch would
    report as the failure of the next kernel: it is read (and so reset) at once."""
    cleared = []
    monkeypatch.setattr(host_buffers, "_clear_last_cuda_error", lambda: cleared.append(1))
    cudart.refuse = True
    HostBuffer(1 << 16, pin=True).close()
    assert cleared == [1]
    cudart.refuse = False
    HostBuffer(1 << 16, pin=True).close()
    assert cleared == [1]  # only after a failure


def test_host_buffers_are_private_mappings_kept_from_forked_children():
    """A shared mapping ignores MADV_HUGEPAGE; MADV_DONTFORK keeps the pages out of a
    forked DataLoader worker. The child sees no mapping at that address."""
    buf = HostBuffer(1 << 20)
    start = buf.tensor.data_ptr()
    with open("/proc/self/maps") as f:
        line = next(x for x in f if int(x.split("-")[0], 16) == start)
    assert line.split()[1][3] == "p", line  # private
    pid = os.fork()
    if pid == 0:  # the child: is the buffer's address mapped here?
        with open("/proc/self/maps") as f:
            mapped = any(int(x.split("-")[0], 16) == start for x in f)
        os._exit(1 if mapped else 0)
    _, status = os.waitpid(pid, 0)
    buf.close()
    assert os.waitstatus_to_exitcode(status) == 0, "the buffer was inherited by the child"


def test_a_buffer_in_use_when_the_pool_closes_is_unpinned_when_released(cudart):
    pool = StagingPool(pin_memory=True)
    staged = pool.stage(make_state(6))
    pool.close()
    assert cudart.registered, "still in use by a save: not unpinned under it"
    pool.release(staged)
    assert cudart.registered == {}
