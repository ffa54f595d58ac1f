"""I/O errors at the OS level: every file-system call of a local save failing in turn.

A save is run once with :class:`osfaults.OsFaults` counting the OS calls the local
backend makes (open, write, ftruncate, fdatasync, close, mkdir, flock, unlink, fsync of
the directories, renameat2 / rename); then, for n = 1..N, call n fails once with a
real ``OSError`` and the test checks what a user relies on:

* the save fails with a typed ckptstore error carrying the errno (``StorageFullError``
  for ENOSPC), raised by ``wait()`` or by the next call as ``BackgroundSaveError``;
  the only calls allowed to fail without failing the save are the ``O_DIRECT`` probe
  (it falls back to buffered writes) and closing the lock file after the commit;
* nothing hangs (every wait has a timeout);
* older checkpoints stay listed, verify and load bit-exact; nothing sits under a final
  name without its manifest; no temp directory is left; no fd or thread leaks;
* a failed fsync is never followed by another fsync of the same file (after one,
  Linux may report success for pages it dropped);
* the same step saves fine right after, and a fresh process sees exactly the
  checkpoints that were reported committed.

Plus: short writes (the writer must loop), writes that return 0 (an error, not a
spin), and a rename that took effect but raised. For that last one ckptstore checks
what the rename did: if its temp directory is gone and the final name holds this very
manifest, the checkpoint is committed, and the save goes on to fsync the root and
reports success (one rule: a save reports success exactly when its checkpoint is
listed and durable). The one case where a failed save stays listed is a root fsync
error whose undo (renaming back) fails too: the error then says so in words.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from helpers import Randint, Randn, assert_same, blank_like, build_state, zero_value
from invariants import check_invariants, digest_state
from osfaults import Call, OsFaults

import ckptstore
from ckptstore.layout import POINTER_TEMP_PREFIX, TEMP_PREFIX, checkpoint_name
from ckptstore.storage import LocalBackend

TIMEOUT_S = 60
FSYNCS = ("fsync", "fdatasync")
# Calls whose failure must not fail the save: the O_DIRECT probe (buffered writes
# then, same bytes) and closing the lock file once the checkpoint is committed.
TOLERATED = ("fcntl(", "close(<step>/.lock)")
# Calls that can return ENOSPC on Linux (allocating blocks or directory entries).
CAN_BE_FULL = ("open(", "write(", "ftruncate(", "fdatasync(", "fsync(", "mkdir(", "makedirs(")
CAN_BE_FULL += ("rename(", "renameat2(", "flock(")


def make_state(seed: int, extra: int = 0) -> dict[str, Any]:
    """The state saved as ``step_{seed}``; ``extra`` floats more make it large."""
    return build_state(
        seed,
        w=Randn(300_000),  # 1.2 MB: page-aligned, O_DIRECT
        odd=Randn(1001, torch.half),  # unaligned tail
        i=Randint(0, 1 << 40, 77),
        meta={"seed": seed, "name": "run-" + str(seed)},
        **({"big": Randn(extra)} if extra else {}),
    )


def blank(extra: int = 0) -> dict[str, Any]:
    return blank_like(make_state(0, extra), zero_value)


@pytest.fixture
def faults(root: str) -> Iterator[OsFaults]:
    os.makedirs(root, exist_ok=True)
    f = OsFaults(root)
    yield f
    f.uninstall()


def other_threads() -> list[str]:
    """Threads besides the checkpointer's pools (whose size varies with load; the
    autouse fixture checks that none of those outlives its test)."""
    return sorted(t.name for t in threading.enumerate() if not t.name.startswith("ckptstore-"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def check_root(root: str, committed: list[int], ckpt: ckptstore.Checkpointer) -> None:
    """Only the committed steps are listed; no temp and nothing half-made under a final name."""
    names = sorted(os.listdir(root))
    temps = [n for n in names if n.startswith((TEMP_PREFIX, POINTER_TEMP_PREFIX))]
    assert not temps, f"temp entries left behind: {temps}"
    for n in names:
        assert os.path.isfile(os.path.join(root, n, "manifest.json")), (
            f"{n} sits under a final name without a manifest"
        )
    assert [i.step for i in ckpt.list()] == committed


def load_step(ckpt: ckptstore.Checkpointer, step: int, extra: int = 0) -> None:
    target = blank(extra)
    ckpt.load(target, step)
    assert_same(make_state(step, extra), target, f"step {step}")


def check_in_fresh_process(root: str, steps: list[int], extra: int = 0) -> None:
    """A new interpreter lists exactly ``steps``; each verifies and restores bit-exact."""
    expected = {s: digest_state(make_state(s, extra)) for s in steps}
    check_invariants(root, expected=expected, newest=max(steps))


def save_and_surface(
    ckpt: ckptstore.Checkpointer, step: int, *, via_next_call: bool, extra: int = 0
) -> BaseException | None:
    """Save ``step``; return its error as the caller sees it, by wait() or the next call."""
    pending = ckpt.save_async(make_state(step, extra), step)
    if not via_next_call:
        try:
            pending.wait(timeout=TIMEOUT_S)
        except TimeoutError:
            pytest.fail(f"step {step}: the save hung")
        except Exception as exc:
            return exc
        return None
    # Nobody waits on this one: the error must come out of the next call on the
    # checkpointer, as BackgroundSaveError with the original as its cause.
    try:
        pending.committed.exception(timeout=TIMEOUT_S)
    except TimeoutError:
        pytest.fail(f"step {step}: the save hung")
    surfaced: ckptstore.BackgroundSaveError | None = None
    try:
        ckpt.wait()
    except ckptstore.BackgroundSaveError as exc:
        surfaced = exc
    if surfaced is None:
        return None
    assert surfaced.step == step
    assert surfaced.__cause__ is not None
    return surfaced.__cause__


CONFIGS = {
    # O_DIRECT writes from the staging arena, renameat2(RENAME_NOREPLACE).
    "direct-raw-renameat2": {"direct_io": True, "codec": "none", "renameat2": True},
    # Buffered writes of compressed chunks; a kernel without renameat2 (os.rename).
    "buffered-zstd-rename": {"direct_io": False, "codec": "zstd", "renameat2": False},
}
SLOW_CONFIGS = {
    # Compressed chunks through the O_DIRECT bounce buffer, more than it holds (8 MiB).
    "direct-zstd-big": {"direct_io": True, "codec": "zstd", "renameat2": True, "extra": 3 << 20},
    # Buffered raw writes, renameat2.
    "buffered-raw-renameat2": {"direct_io": False, "codec": "none", "renameat2": True},
}


def sweep(
    root: str,
    faults: OsFaults,
    config: dict[str, Any],
    code: int,
    which: Callable[[Call], bool],
) -> list[str]:
    """Fail each OS call of a save in turn (those ``which`` picks); return their labels."""
    faults.install(renameat2=config["renameat2"])
    backend = LocalBackend(root, direct_io=config["direct_io"])
    ckpt = ckptstore.Checkpointer(backend, codec=config["codec"], chunk_bytes=256 * 1024)
    swept: list[str] = []
    extra = config.get("extra", 0)
    try:
        ckpt.save(make_state(1, extra), 1)
        faults.reset()
        ckpt.save(make_state(2, extra), 2)
        trace = list(faults.calls)
        faults.reset()
        ckpt.save(make_state(3, extra), 3)
        assert faults.labels() == [c.label for c in trace], "two saves made different calls"
        names = {c.name for c in trace}
        rename = "renameat2" if config["renameat2"] else "rename"
        assert {"open", "write", "fdatasync", "fsync", "close", "mkdir", rename} <= names, names
        committed = [1, 2, 3]
        fds = open_fds()
        threads = other_threads()
        for call in trace:
            if not which(call):
                continue
            step = 100 + call.n
            faults.reset()
            faults.fail_at = call.n
            faults.code = code
            err = save_and_surface(ckpt, step, via_next_call=call.n % 2 == 0, extra=extra)
            assert [c.label for c in faults.fired] == [call.label], (
                f"call {call.n} ({call.label}) was to fail; failed: {faults.fired}"
            )
            after = faults.calls[call.n :]
            faults.reset()  # nothing fails from here on
            swept.append(call.label)
            if call.label.startswith(TOLERATED):
                assert err is None, f"{call.label} failing failed the save: {err!r}"
                committed.append(step)
                check_root(root, committed, ckpt)
                assert ckpt.verify(step) == []
                ckpt.backend.delete(checkpoint_name(step))
                committed.pop()
                continue
            assert err is not None, f"{call.label} failed with {code} but the save succeeded"
            assert isinstance(err, ckptstore.StorageError), f"{call.label}: untyped {err!r}"
            assert err.errno == code, f"{call.label}: errno {err.errno}, not {code}: {err}"
            if code == errno.ENOSPC:
                assert isinstance(err, ckptstore.StorageFullError), repr(err)
                assert "free space" in str(err), str(err)
            if call.name in FSYNCS:
                again = [c for c in after if c.name in FSYNCS and c.path == call.path]
                assert not again, f"{call.label} failed and was retried: {again}"
            check_root(root, committed, ckpt)
            # The same step, right after: nothing of the failed attempt stands in the way.
            ckpt.save(make_state(step, extra), step)
            load_step(ckpt, step, extra)
            ckpt.backend.delete(checkpoint_name(step))
            check_root(root, committed, ckpt)
        load_step(ckpt, 1, extra)
        assert open_fds() == fds, "file descriptors leaked by failed saves"
        assert other_threads() == threads, "failed saves started threads of their own"
        ckpt.save(make_state(4, extra), 4)
        committed.append(4)
    finally:
        faults.uninstall()
        ckpt.close()
    with ckptstore.Checkpointer(root) as fresh:
        check_root(root, committed, fresh)
    check_in_fresh_process(root, committed, extra)
    return swept


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_os_call_failing_once_with_eio(root, faults, config):
    swept = sweep(root, faults, CONFIGS[config], errno.EIO, lambda call: True)
    assert len(swept) >= 30, swept
    print(f"{config}: {len(swept)} OS calls failed in turn with EIO")


@pytest.mark.slow
@pytest.mark.parametrize("config", list(SLOW_CONFIGS))
@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
def test_every_os_call_failing_once_more_configurations(root, faults, config, code):
    cfg = SLOW_CONFIGS[config]
    which = (lambda c: True) if code == errno.EIO else (lambda c: c.label.startswith(CAN_BE_FULL))
    swept = sweep(root, faults, cfg, code, which)
    print(f"{config}: {len(swept)} OS calls failed in turn with {errno.errorcode[code]}")


def test_every_os_call_that_can_run_out_of_space_failing_with_enospc(root, faults):
    config = CONFIGS["direct-raw-renameat2"]
    swept = sweep(root, faults, config, errno.ENOSPC, lambda c: c.label.startswith(CAN_BE_FULL))
    assert {"write(<tmp>/__0_0.distcp)", "fdatasync(<tmp>/manifest.json)"} <= set(swept)
    assert len(swept) >= 15, swept
    print(f"direct-raw-renameat2: {len(swept)} OS calls failed in turn with ENOSPC")


# ---- short writes ---------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_short_writes_are_completed_and_the_data_is_intact(root, faults, config):
    """Every write() writes only part of its buffer: the writer loops, nothing is lost."""
    cfg = CONFIGS[config]
    faults.install(renameat2=cfg["renameat2"])
    backend = LocalBackend(root, direct_io=cfg["direct_io"])
    with ckptstore.Checkpointer(backend, codec=cfg["codec"], chunk_bytes=256 * 1024) as ckpt:
        faults.short_writes = True
        ckpt.save(make_state(1), 1)
        short = [(c.path, asked, wrote) for c, asked, wrote in faults.short if wrote < asked]
        assert len(short) >= 3, faults.short
        if cfg["direct_io"]:
            # O_DIRECT writes are cut at a block boundary (a one-block manifest cannot be).
            assert any(asked >= 8192 and wrote % 4096 == 0 for _, asked, wrote in short)
            assert {p for p, _, _ in short} >= {"<tmp>/__0_0.distcp"}
        else:
            assert {p for p, _, _ in short} >= {"<tmp>/__0_0.distcp", "<tmp>/manifest.json"}
        faults.short_writes = False
        assert ckpt.verify(1) == []
        load_step(ckpt, 1)


def test_put_atomic_completes_short_writes(root, faults):
    faults.install()
    backend = LocalBackend(root)
    faults.short_writes = True
    data = bytes(range(256)) * 40
    backend.put_atomic("latest", data)
    assert [c.path for c, asked, wrote in faults.short if wrote < asked]
    assert backend.read_bytes("latest") == data


@pytest.mark.parametrize("where", ["save", "put_atomic"])
def test_a_write_that_returns_zero_fails_instead_of_spinning(root, faults, where):
    """write() returning 0 for a non-empty buffer would loop forever if taken as progress."""
    faults.install()
    backend = LocalBackend(root)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            if where == "save":
                with ckptstore.Checkpointer(backend) as ckpt:
                    ckpt.save_async(make_state(1), 1).wait(timeout=TIMEOUT_S)
            else:
                backend.put_atomic("latest", b"step_00000001\n")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    faults.zero_writes = True
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(TIMEOUT_S)
    faults.zero_writes = False
    assert not t.is_alive(), f"{where}: a write that returns 0 made it spin"
    assert len([c for c in faults.calls if c.name == "write"]) >= 1
    err = outcome[0]
    assert isinstance(err, ckptstore.StorageError), repr(err)
    assert err.errno == errno.EIO
    assert not [n for n in os.listdir(root) if n != "latest" and not n.startswith("step_")]
    assert os.listdir(root) == [], os.listdir(root)


# ---- fsync errors ---------------------------------------------------------------------

FSYNC_SITES = [
    "fdatasync(<tmp>/__0_0.distcp)",
    "fdatasync(<tmp>/.metadata)",
    "fdatasync(<tmp>/manifest.json)",
    "fsync(<tmp>)",
    "fsync(<root>)",
]


def test_an_fsync_error_fails_the_save_and_is_never_retried(root, faults):
    """After a failed fsync Linux may drop the dirty pages and report success to the
    next fsync ("fsyncgate"): here every later fsync would succeed, so a retry would
    turn the failure into a false success. At each fsync of the commit protocol: the
    save fails, that file is not synced again, and the checkpoint is not listed."""
    faults.install()
    with ckptstore.Checkpointer(LocalBackend(root)) as ckpt:
        ckpt.save(make_state(1), 1)
        for step, label in enumerate(FSYNC_SITES, start=2):
            faults.reset()
            faults.fail_if = lambda call, label=label: call.label == label
            with pytest.raises(ckptstore.StorageError) as info:
                ckpt.save_async(make_state(step), step).wait(timeout=TIMEOUT_S)
            assert info.value.errno == errno.EIO
            assert [c.label for c in faults.fired] == [label]
            failed = faults.fired[0]
            again = [
                c for c in faults.calls[failed.n :] if c.name in FSYNCS and c.path == failed.path
            ]
            assert not again, f"{label} was retried: {again}"
            check_root(root, [1], ckpt)
    check_in_fresh_process(root, [1])


# ---- a rename that took effect but raised ---------------------------------------------


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "rename"])
def test_a_rename_that_took_effect_but_raised_is_reported_committed(root, faults, renameat2):
    """The rename happened, then reported an error (an NFS reply lost and retransmitted
    gets ENOENT). The checkpoint is visible under its final name with this save's
    manifest, so the save checks that and carries on: it fsyncs the root and reports
    success. Reporting a failure for a checkpoint that stays listed would leave the
    caller believing step 2 is not saved while every reader loads it."""
    faults.install(renameat2=renameat2)
    rename = "renameat2(<tmp>)" if renameat2 else "rename(<tmp>)"
    with ckptstore.Checkpointer(LocalBackend(root)) as ckpt:
        ckpt.save(make_state(1), 1)
        faults.reset()
        faults.fail_if = lambda call: call.label == rename
        faults.after = True
        faults.code = errno.ENOENT
        result = ckptstore.PendingSave.wait(ckpt.save_async(make_state(2), 2), timeout=TIMEOUT_S)
        assert result.step == 2
        assert [c.label for c in faults.fired] == [rename]
        later = [c.label for c in faults.calls[faults.fired[0].n :]]
        assert "fsync(<root>)" in later, f"the root was not fsynced after the rename: {later}"
        check_root(root, [1, 2], ckpt)
        load_step(ckpt, 2)
    if renameat2:
        check_in_fresh_process(root, [1, 2])


def test_a_rename_that_took_effect_but_raised_then_a_root_fsync_error_is_undone(root, faults):
    """Same, but the root's fsync then fails: the rename is undone and the save fails,
    as when the rename had reported success."""
    faults.install()
    with ckptstore.Checkpointer(LocalBackend(root)) as ckpt:
        ckpt.save(make_state(1), 1)
        faults.reset()
        faults.fail_if = lambda call: call.label in ("renameat2(<tmp>)", "fsync(<root>)")
        faults.times = 2
        faults.after = True
        with pytest.raises(ckptstore.StorageError, match="fsync of the root") as info:
            ckpt.save_async(make_state(2), 2).wait(timeout=TIMEOUT_S)
        assert info.value.errno == errno.EIO
        assert [c.label for c in faults.fired] == ["renameat2(<tmp>)", "fsync(<root>)"]
        check_root(root, [1], ckpt)
        faults.reset()
        ckpt.save(make_state(2), 2)
        load_step(ckpt, 2)
        check_root(root, [1, 2], ckpt)


def test_a_rename_that_raised_without_taking_effect_fails_the_save(root, faults):
    faults.install()
    with ckptstore.Checkpointer(LocalBackend(root)) as ckpt:
        ckpt.save(make_state(1), 1)
        faults.reset()
        faults.fail_if = lambda call: call.label == "renameat2(<tmp>)"
        faults.code = errno.ENOENT
        with pytest.raises(ckptstore.StorageError, match="rename") as info:
            ckpt.save_async(make_state(2), 2).wait(timeout=TIMEOUT_S)
        assert info.value.errno == errno.ENOENT
        assert [c.label for c in faults.fired] == ["renameat2(<tmp>)"]
        check_root(root, [1], ckpt)


# ---- with CheckpointManager: the pointer and retention ----------------------------------


def test_every_os_call_of_a_managed_save_failing_once(root, faults):
    """With CheckpointManager a save also moves ``latest`` and prunes (KeepLast(2)),
    on the housekeeping thread after the commit. A failure there must not fail the
    committed save (it is logged) nor leave ``latest`` naming a missing checkpoint; the
    next save catches up. A failure before the commit fails the save as above."""
    faults.install()
    with ckptstore.CheckpointManager(root, keep=ckptstore.KeepLast(2), codec="none") as mgr:
        ckpt = mgr.checkpointer
        assert ckpt is not None
        for s in (1, 2):
            mgr.save(s - 1, make_state(s))
        mgr.wait()
        faults.reset()
        mgr.save(2, make_state(3))  # commits step 3, points latest at it, deletes step 1
        mgr.wait()
        trace = list(faults.calls)
        labels = [c.label for c in trace]
        housekeeping = [c for c in trace if c.thread.startswith("ckptstore-housekeeping")]
        assert {"replace(<pointer-tmp latest>)", "rename(<step>)"} <= {
            c.label for c in housekeeping
        }, labels
        kept = [2, 3]
        check_managed(root, kept, ckpt)
        for call in trace:
            step = 100 + 2 * call.n  # then step + 1: steps grow, as retention expects
            faults.reset()
            faults.fail_at = call.n
            pending = mgr.save(step - 1, make_state(step))
            assert pending is not None
            try:
                pending.wait(timeout=TIMEOUT_S)
                err = None
            except Exception as exc:
                err = exc
            mgr.wait()  # housekeeping done; its failures are only logged
            assert [c.label for c in faults.fired] == [call.label], (call, faults.fired)
            faults.reset()
            if call in housekeeping or call.label.startswith(TOLERATED):
                assert err is None, f"{call.label} failing failed the save: {err!r}"
                kept = [*kept, step]
            else:
                assert isinstance(err, ckptstore.StorageError), f"{call.label}: {err!r}"
                assert err.errno == errno.EIO
            listed = [i.step for i in ckpt.list()]
            assert set(listed) >= set(kept[-2:]), (call.label, listed, kept)
            latest = read_latest(root)
            assert latest is None or latest in [checkpoint_name(s) for s in listed], latest
            # The next save succeeds and retention catches up.
            nxt = step + 1
            mgr.save(nxt - 1, make_state(nxt))
            mgr.wait()
            kept = [*kept, nxt][-2:]
            check_managed(root, kept, ckpt)
        final = kept
    check_in_fresh_process(root, final)
    print(
        f"managed save: {len(trace)} OS calls failed in turn, {len(housekeeping)} in housekeeping"
    )


def read_latest(root: str) -> str | None:
    try:
        with open(os.path.join(root, "latest")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def check_managed(root: str, kept: list[int], ckpt: ckptstore.Checkpointer) -> None:
    """Exactly ``kept`` listed, ``latest`` names the newest; temps only from a delete
    whose root fsync failed (removed by the next sweep)."""
    assert [i.step for i in ckpt.list()] == kept
    assert read_latest(root) == checkpoint_name(kept[-1])
    temps = [n for n in os.listdir(root) if n.startswith((TEMP_PREFIX, POINTER_TEMP_PREFIX))]
    assert all(n.startswith(f"{TEMP_PREFIX}deleted-") for n in temps), temps


def test_root_fsync_error_whose_undo_also_fails_says_the_checkpoint_is_listed(root, faults):
    """The root's fsync fails after the rename, and renaming back fails too: the
    checkpoint is complete and listed but its name may not survive a power loss. The
    save fails, and its message says exactly that (listed, not durable, save again
    under a new step); what is listed verifies and loads bit-exact."""
    faults.install()
    with ckptstore.Checkpointer(LocalBackend(root)) as ckpt:
        ckpt.save(make_state(1), 1)
        faults.reset()
        faults.fail_if = lambda call: call.label in ("fsync(<root>)", "rename(<step>)")
        faults.times = 2
        with pytest.raises(ckptstore.StorageError, match="listed but may not survive") as info:
            ckpt.save_async(make_state(2), 2).wait(timeout=TIMEOUT_S)
        assert info.value.errno == errno.EIO
        assert "save again under a new step" in str(info.value)
        assert [c.label for c in faults.fired] == ["fsync(<root>)", "rename(<step>)"]
        faults.reset()
        check_root(root, [1, 2], ckpt)
        assert ckpt.verify(2) == []
        load_step(ckpt, 2)
        ckpt.save(make_state(3), 3)
        check_root(root, [1, 2, 3], ckpt)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EFAULT], ids=["EINVAL", "EFAULT"])
@pytest.mark.parametrize("which", [0, -1], ids=["first", "last"])
def test_o_direct_refused_mid_file_falls_back_to_buffered_writes(root, faults, which, code):
    """A file system may refuse an O_DIRECT write with EINVAL (alignment rules it has
    and we did not expect), and the kernel with EFAULT when it cannot pin the source
    memory for DMA (cudaHostAlloc'd pinned memory): the same bytes are written
    buffered, the save succeeds and loads bit-exact."""
    faults.install()
    with ckptstore.Checkpointer(LocalBackend(root), codec="none") as ckpt:
        faults.reset()
        ckpt.save(make_state(1), 1)
        writes = [c for c in faults.calls if c.label == "write(<tmp>/__0_0.distcp)"]
        assert len(writes) >= 2, faults.labels()
        faults.reset()
        faults.fail_at = writes[which].n
        faults.code = code
        ckpt.save(make_state(2), 2)
        assert [c.label for c in faults.fired] == ["write(<tmp>/__0_0.distcp)"]
        # Retried without O_DIRECT: the same write call again, right after the flag change.
        after = [c.label for c in faults.calls[faults.fired[0].n :]][:3]
        assert after[:2] == ["fcntl(<tmp>/__0_0.distcp)"] * 2, after
        assert after[2] == "write(<tmp>/__0_0.distcp)", after
        assert ckpt.verify(2) == []
        load_step(ckpt, 2)
