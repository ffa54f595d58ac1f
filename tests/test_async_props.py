"""Asynchronous saving under load: property-based schedules of save / mutate / wait /
close with slow I/O and injected errors, and host memory over 50 saves.

Hypothesis draws a schedule; it runs against a real Checkpointer on local disk behind
:class:`faults.FaultyBackend` (every write sleeps; some saves get a real I/O error).
A model of what the API promises follows the schedule:

* what is saved is the state at ``save_async()`` time: every committed step loads
  bit-exact to a digest taken at the call, whatever was mutated after ``staged``;
* exactly the saves that were not faulted are listed; no temp directory is left;
* a failed save's error keeps its type (``StorageError``/``StorageFullError`` with the
  injected errno) from ``pending.wait()``; a failure nobody waited on comes out of the
  next ``save_async`` (if it had finished before that call), ``wait`` or ``close`` as
  ``BackgroundSaveError`` naming the step, and never twice;
* no call hangs (bounded waits); no thread or file descriptor outlives ``close()``.

The default run is derandomized and small; ``--run-slow`` runs many more schedules.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import psutil
import pytest
import torch
from helpers import Randn, blank_like, build_state
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from invariants import digest_state

import ckptstore
from ckptstore.errors import storage_error
from ckptstore.layout import checkpoint_name
from ckptstore.storage import LocalBackend
from ckptstore.storage.testing import FaultyBackend

TIMEOUT_S = 60
FAULTS = [("write", errno.EIO), ("close", errno.EIO), ("commit", errno.EIO)]
FAULTS += [("write", errno.ENOSPC), ("begin", errno.EIO)]

save_op = st.tuples(
    st.just("save"),
    st.booleans(),  # block_until_staged
    st.one_of(st.none(), st.none(), st.sampled_from(FAULTS)),
)
schedule = st.lists(
    st.one_of(
        save_op,
        save_op,
        save_op,
        st.tuples(st.just("mutate"), st.integers(0, 2**16)),
        st.tuples(st.just("wait_one"), st.integers(0, 50)),
        st.tuples(st.just("wait"), st.just(None)),
        st.tuples(st.just("settle"), st.just(None)),
        st.tuples(st.just("slow"), st.sampled_from([0.0, 0.002, 0.01])),
    ),
    min_size=8,
    max_size=24,
)


def new_state() -> dict[str, Any]:
    return build_state(
        0,
        w=Randn(96_000),
        h=Randn(333, torch.half),
        n=torch.zeros(5, dtype=torch.int64),
        count=0,
        meta={"lr": 0.1},
    )


def mutate(state: dict[str, Any], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    state["w"].add_(torch.randn(state["w"].shape, generator=g))
    state["h"][seed % 333] = float(seed)
    state["n"] += 1
    state["count"] += 1
    state["meta"]["lr"] = seed / 7


def blank() -> dict[str, Any]:
    return blank_like(new_state(), lambda v: type(v)(-1))  # count -1, lr -1.0


def reported_steps(exc: ckptstore.BackgroundSaveError) -> set[int]:
    """The failed steps one BackgroundSaveError reports (the oldest, and the others)."""
    found = re.search(r"failed saves: steps ([\d, ]+)\)", str(exc))
    steps = {int(s) for s in found.group(1).split(",")} if found else set()
    assert exc.step is not None
    return steps | {exc.step}


class Model:
    """What the API promises, followed along a schedule."""

    def __init__(self) -> None:
        self.digest: dict[int, str] = {}  # step -> digest of the state at save time
        self.fault: dict[int, tuple[str, int]] = {}  # step -> injected (op, errno)
        self.pending: dict[int, ckptstore.PendingSave] = {}
        self.seen: set[int] = set()  # failed steps whose error the caller has seen

    def failed_unseen_done(self) -> set[int]:
        return {
            s
            for s, p in self.pending.items()
            if p.done() and s in self.fault and s not in self.seen
        }

    def failed_unseen(self) -> set[int]:
        return {s for s in self.fault if s not in self.seen}

    def surfaced(self, exc: BaseException, must: set[int], may: set[int]) -> None:
        """``exc`` came out of a call that had to report ``must`` and may report ``may``."""
        assert isinstance(exc, ckptstore.BackgroundSaveError), f"untyped: {exc!r}"
        steps = reported_steps(exc)
        assert must <= steps <= must | may, (steps, must, may)
        assert exc.step == min(steps), "the oldest failure is the one named"
        assert isinstance(exc.__cause__, ckptstore.StorageError), repr(exc.__cause__)
        assert exc.__cause__.errno == self.fault[exc.step][1]
        self.seen |= steps

    def check_own_error(self, step: int, exc: BaseException) -> None:
        assert step in self.fault, f"step {step} was not faulted but failed: {exc!r}"
        code = self.fault[step][1]
        want = ckptstore.StorageFullError if code == errno.ENOSPC else ckptstore.StorageError
        assert isinstance(exc, want), repr(exc)
        assert exc.errno == code


def run_schedule(ops: list[tuple[Any, ...]], max_inflight: int) -> None:
    root = tempfile.mkdtemp(prefix="ckptstore-props-")
    model = Model()
    current: list[int | None] = [None]  # the step the writer thread is on
    fired: set[int] = set()

    def fault(op: str, name: str) -> BaseException | None:
        # One writer thread writes one save at a time: begin() names the one it is on.
        if op == "begin":
            current[0] = int(name.split("_")[1])
        s = current[0]
        spec = model.fault.get(s) if s is not None else None
        if s is not None and spec is not None and spec[0] == op and s not in fired:
            fired.add(s)
            return storage_error(OSError(spec[1], f"injected {op}"), op, name)
        return None

    fds = len(os.listdir("/proc/self/fd"))
    threads = {t.ident for t in threading.enumerate()}
    backend = FaultyBackend(LocalBackend(root), fault=fault, delay_s=0.002)
    ckpt = ckptstore.Checkpointer(backend, chunk_bytes=64 * 1024, max_inflight=max_inflight)
    state = new_state()
    step = 0
    try:
        for op, arg, *rest in ops:
            if op == "save":
                step += 1
                block, spec = arg, rest[0]
                model.digest[step] = digest_state(state)
                if spec is not None:
                    model.fault[step] = spec
                must = model.failed_unseen_done()
                may = model.failed_unseen()
                pending, error = bounded(
                    lambda block=block, step=step: ckpt.save_async(
                        state, step, block_until_staged=block
                    ),
                    "save_async()",
                )
                if error is not None:
                    model.surfaced(error, must, may)
                    event("save_async raised BackgroundSaveError")
                    pending = error.pending  # type: ignore[attr-defined]  # still started
                else:
                    assert not must, f"failed steps {must} were not reported by the next save"
                    event("save_async returned")
                assert isinstance(pending, ckptstore.PendingSave)
                assert pending.step == step
                model.pending[step] = pending
            elif op == "mutate":
                # The contract: change tensors only once every save has staged them.
                for p in model.pending.values():
                    p.staged.result(timeout=TIMEOUT_S)
                mutate(state, arg)
            elif op == "wait_one" and model.pending:
                s = sorted(model.pending)[arg % len(model.pending)]
                try:
                    result = model.pending[s].wait(timeout=TIMEOUT_S)
                except TimeoutError:
                    pytest.fail(f"step {s} hung")
                except Exception as exc:
                    model.check_own_error(s, exc)
                    model.seen.add(s)
                    event("pending.wait raised its own error")
                else:
                    assert s not in model.fault, f"step {s} was faulted but committed"
                    assert result.step == s
            elif op == "wait":
                may = model.failed_unseen()
                _, error = bounded(ckpt.wait, "wait()")
                if error is not None:
                    model.surfaced(error, may, may)  # wait() drains first: all of them
                    event("wait raised BackgroundSaveError")
                else:
                    assert not may, f"wait() did not report failed steps {may}"
            elif op == "settle":
                # Let every save finish without asking about it: a failure among them
                # must then come out of the very next call.
                for p in model.pending.values():
                    futures.wait([p.committed], timeout=TIMEOUT_S)
                    assert p.done(), f"step {p.step} hung"
            elif op == "slow":
                backend.delay_s = arg
        may = model.failed_unseen()
        _, error = bounded(ckpt.close, "close()")
        if error is not None:
            model.surfaced(error, may, may)
            event("close raised BackgroundSaveError")
        else:
            assert not may, f"close() did not report failed steps {may}"
        assert model.seen == set(model.fault), "every failure surfaced exactly once"
        event(f"saves: {len(model.digest)}, faulted: {len(model.fault)}")
        assert fired == set(model.fault), "an injected fault did not fire"

        # What was saved is what the state was at save time; failed saves left nothing.
        ok = sorted(set(model.digest) - set(model.fault))
        leftovers = [n for n in os.listdir(root) if n.startswith(".tmp-")]
        assert not leftovers, leftovers
        with ckptstore.Checkpointer(root) as reader:
            assert [i.step for i in reader.list()] == ok
            for s in ok:
                target = blank()
                reader.load(target, s)
                assert digest_state(target) == model.digest[s], f"step {s} differs"
        for t in threading.enumerate():
            if t.ident not in threads:
                t.join(timeout=5)
        extra = [t.name for t in threading.enumerate() if t.ident not in threads]
        assert not extra, f"threads left running: {extra}"
        assert len(os.listdir("/proc/self/fd")) == fds, "file descriptors leaked"
    finally:
        with contextlib.suppress(Exception):
            ckpt.close()
        shutil.rmtree(root, ignore_errors=True)


def bounded(fn: Callable[[], Any], what: str) -> tuple[Any, BaseException | None]:
    """Call ``fn`` on a helper thread; fail the test if it does not return in time."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append((fn(), None))
        except BaseException as exc:
            out.append((None, exc))

    t = threading.Thread(target=run, name=f"bounded-{what}", daemon=True)
    t.start()
    t.join(TIMEOUT_S)
    if t.is_alive():
        pytest.fail(f"{what} hung for {TIMEOUT_S} s")
    result: tuple[Any, BaseException | None] = out[0]
    return result


@settings(
    max_examples=int(os.environ.get("CKPTSTORE_ASYNC_EXAMPLES", "30")),
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=schedule, max_inflight=st.sampled_from([1, 2]))
def test_async_schedules(ops, max_inflight):
    run_schedule(ops, max_inflight)


@pytest.mark.slow
@settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=schedule, max_inflight=st.sampled_from([1, 2, 3]))
def test_async_schedules_stress(ops, max_inflight):
    run_schedule(ops, max_inflight)


def test_host_memory_is_flat_over_50_saves(tmp_path):
    """50 saves of a 24 MB state, mutated between saves, every 7th failing with an I/O
    error: after a warm-up, resident memory grows by less than half of one state (a
    staging buffer or a copy kept per save would add 24 MB each) and the number of
    open file descriptors does not grow."""
    state = {"w": torch.randn(6 << 20), "b": torch.randn(1000), "step": 0}
    nbytes = state["w"].nbytes
    proc = psutil.Process()
    root = str(tmp_path / "ckpts")
    current: list[int] = [0]

    def fault(op: str, name: str) -> BaseException | None:
        if op == "begin":
            current[0] = int(name.split("_")[1])
        if op == "write" and current[0] % 7 == 0:
            return storage_error(OSError(errno.EIO, "injected"), op, name)
        return None

    backend = FaultyBackend(LocalBackend(root), fault=fault)
    rss: list[int] = []
    fds: list[int] = []
    failed: set[int | None] = set()
    with ckptstore.Checkpointer(backend, codec="none", max_inflight=2) as ckpt:
        pendings: list[ckptstore.PendingSave] = []
        for step in range(1, 51):
            state["w"].add_(1.0)
            state["step"] = step
            started: object = None
            try:
                started = ckpt.save_async(state, step)
            except ckptstore.BackgroundSaveError as exc:  # a failure nobody waited on yet
                failed.add(exc.step)
                started = exc.pending
            assert isinstance(started, ckptstore.PendingSave)
            pendings.append(started)
            # Every 5 saves let all of them finish, then measure (a save in flight has
            # files open); otherwise keep two in flight.
            while len(pendings) > (0 if step % 5 == 0 else 2):
                done = pendings.pop(0)
                try:
                    done.wait(timeout=TIMEOUT_S)
                except ckptstore.StorageError:
                    failed.add(done.step)
                else:
                    if done.step != 50:
                        backend.delete(checkpoint_name(done.step))  # keep the disk small
            if step % 5 == 0:
                gc.collect()
                rss.append(proc.memory_info().rss)
                fds.append(len(os.listdir("/proc/self/fd")))
        assert not pendings
        assert failed == {7, 14, 21, 28, 35, 42, 49}, failed
        assert ckpt.staging_bytes <= 2 * (nbytes + (1 << 20)), "one arena per save in flight"
        target = blank_like(state, -1)
        ckpt.load(target, 50)
        assert torch.equal(target["w"], state["w"]) and target["step"] == 50
    warm = rss[1]  # after 10 saves: both arenas and the codec threads exist
    growth = max(rss[2:]) - warm
    assert growth < nbytes // 2, (
        f"resident memory grew by {growth / 2**20:.1f} MiB from save 10 to 50 "
        f"(samples, MiB: {[round(r / 2**20) for r in rss]})"
    )
    assert max(fds[1:]) == fds[1], f"open file descriptors grew: {fds}"
