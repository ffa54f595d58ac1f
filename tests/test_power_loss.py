"""Power loss at every call of a save, of retention and of a first save into a new root.

``tests/powerloss.py`` records what each fsync made durable; the power is cut at call
0, 1, ..., N of the operation (N: after it returned), the disk is rewritten to what a
power loss may leave (``drop_unsynced``: un-synced directory changes rolled back, files
cut to their synced content; ``keep_names``: names persisted, un-synced data lost), and
a fresh process checks the invariants (``tests/invariants.py``) on every such disk.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from typing import Any

import pytest
from crashrig import expected_digests, make_state
from invariants import InvariantError, assert_surfaced, raise_on_problems
from powerloss import MODES, PowerCut, PowerLossFS

import ckptstore
import ckptstore.storage.local as local_mod
from ckptstore.manager import retention
from ckptstore.storage import LocalBackend

NUMEL = 20_000  # ~80 KB: two 64 KiB chunks
CONFIG: dict[str, Any] = {"codec": "none", "chunk_bytes": 64 << 10, "threads": 2}
OP_TIMEOUT_S = 60.0


def _save_baseline(root: str, steps: range) -> None:
    with ckptstore.Checkpointer(root, **CONFIG) as ckpt:
        for step in steps:
            ckpt.save(make_state(step, NUMEL), step)


# Each scenario: (prepare the baseline under top, the operation(top) -> the newest step
# that must survive if it returns, the newest before it, the steps it may write).
def _prep_save(top: str) -> None:
    _save_baseline(os.path.join(top, "root"), range(1, 2))


def _op_save(top: str, run: Callable[[Callable[[], object]], None]) -> None:
    ckpt = ckptstore.Checkpointer(os.path.join(top, "root"), **CONFIG)
    try:
        run(lambda: ckpt.save(make_state(2, NUMEL), 2))
    finally:
        with _quiet():
            ckpt.close()


def _prep_manager(top: str) -> None:
    _save_baseline(os.path.join(top, "root"), range(1, 3))


def _op_manager(top: str, run: Callable[[Callable[[], object]], None]) -> None:
    mgr = ckptstore.CheckpointManager(
        os.path.join(top, "root"), keep=ckptstore.KeepLast(2), **CONFIG
    )

    def save_and_housekeep() -> None:
        pending = mgr.save(2, make_state(3, NUMEL))  # 3 steps done: step_00000003
        assert pending is not None
        pending.wait()
        mgr.wait()  # the latest pointer, and retention deleting step 1

    try:
        run(save_and_housekeep)
    finally:
        with _quiet():
            mgr.close()


def _prep_prune(top: str) -> None:
    root = os.path.join(top, "root")
    _save_baseline(root, range(1, 4))
    LocalBackend(root).put_atomic(retention.LATEST_FILE, b"step_00000003\n")


def _op_prune(top: str, run: Callable[[Callable[[], object]], None]) -> None:
    backend = LocalBackend(os.path.join(top, "root"))
    run(lambda: retention.prune(backend, ckptstore.KeepLast(1)))


def _op_incremental(top: str, run: Callable[[Callable[[], object]], None]) -> None:
    """Two saves of one incremental checkpointer: the second links the first's file
    (issue 19); the power is cut at every call of both."""
    ckpt = ckptstore.Checkpointer(os.path.join(top, "root"), incremental=True, **CONFIG)

    def two_saves() -> None:
        ckpt.save(make_state(2, NUMEL), 2)
        ckpt.save(make_state(3, NUMEL), 3)
        info = ckpt.latest()
        assert info is not None and info.manifest.linked, "the second save linked nothing"

    try:
        run(two_saves)
    finally:
        with _quiet():
            ckpt.close()


def _prep_new_root(top: str) -> None:
    pass  # nothing: the save creates root's parents and root itself


def _op_new_root(top: str, run: Callable[[Callable[[], object]], None]) -> None:
    def create_and_save() -> None:
        with ckptstore.Checkpointer(os.path.join(top, "a", "b", "root"), **CONFIG) as ckpt:
            ckpt.save(make_state(1, NUMEL), 1)

    run(create_and_save)


SCENARIOS: dict[str, tuple[Any, Any, str, int | None, int | None, int]] = {
    # name: (prepare, operation, root under top, newest after, newest before, last step)
    "save": (_prep_save, _op_save, "root", 2, 1, 2),
    "manager_save_pointer_retention": (_prep_manager, _op_manager, "root", 3, 2, 3),
    "retention_deletes_two": (_prep_prune, _op_prune, "root", 3, 3, 3),
    "first_save_into_new_root": (_prep_new_root, _op_new_root, "a/b/root", 1, None, 1),
    "incremental_saves": (_prep_save, _op_incremental, "root", 3, 1, 3),
}


class _quiet:
    """Swallow whatever closing after a power cut raises (it is a dead machine)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _runner(outcome: dict[str, Any]) -> Callable[[Callable[[], object]], None]:
    """Run the operation on a thread with a timeout: the power cut must not hang it."""

    def run(fn: Callable[[], object]) -> None:
        def target() -> None:
            try:
                fn()
                outcome["result"] = "returned"
            except BaseException as exc:  # PowerCut is a BaseException on purpose
                outcome["result"] = exc

        t = threading.Thread(target=target, name="powerloss-op")
        t.start()
        t.join(OP_TIMEOUT_S)
        if t.is_alive():
            outcome["result"] = "hung"
            raise AssertionError(f"the operation hung after the power cut for {OP_TIMEOUT_S} s")

    return run


def sweep_power_cuts(
    name: str, tmp: str, skip_sync: Callable[[str], bool] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Cut the power at every call of scenario ``name``; return the check requests and
    what each cut was (label, outcome, mode)."""
    prepare, operation, root_rel, newest_after, newest_before, last = SCENARIOS[name]
    base = os.path.join(tmp, "base")
    os.mkdir(base)
    prepare(base)
    # Count the calls of an uncut run.
    dry = os.path.join(tmp, "dry")
    shutil.copytree(base, dry)
    counter = PowerLossFS(dry)
    outcome: dict[str, Any] = {}
    with counter.installed():
        operation(dry, _runner(outcome))
    assert outcome["result"] == "returned", outcome
    n_calls = len(counter.calls)
    expected = expected_digests(last, NUMEL)
    requests, cuts = [], []
    for k in range(n_calls + 1):  # k == n_calls: the power goes after it returned
        top = os.path.join(tmp, f"cut{k}")
        shutil.copytree(base, top)
        fs = PowerLossFS(top, cut_at=k if k < n_calls else None, skip_sync=skip_sync)
        outcome = {}
        with fs.installed():
            operation(top, _runner(outcome))
        result = outcome.get("result")
        returned = result == "returned"
        if not returned and not isinstance(result, PowerCut):
            # DCP's collectives report a rank's failure as an error of their own, which
            # ckptstore raises as a CkptStoreError: typed, so it counts as surfaced.
            assert_surfaced(result)
        for mode in MODES:
            into = f"{top}-{mode}"
            fs.power_loss(mode, into=into)
            requests.append(
                {
                    "root_url": os.path.join(into, root_rel),
                    "expected": expected,
                    "newest": newest_after if returned else newest_before,
                }
            )
            cuts.append({"cut": k, "at": fs.cut, "returned": returned, "mode": mode})
        shutil.rmtree(top)
    return requests, cuts


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_power_cut_at_every_call(name, tmp_path, forkserver):
    requests, cuts = sweep_power_cuts(name, str(tmp_path))
    assert len(cuts) >= 2 * 8, f"only {len(cuts)} cuts: the wrapper saw too few calls"
    reports = forkserver.check_many(requests, workdir=str(tmp_path))
    failures = [
        f"cut {c['cut']} at {c['at']} ({c['mode']}, returned={c['returned']}): {r['problems']}"
        for c, r in zip(cuts, reports, strict=True)
        if r["problems"]
    ]
    assert not failures, f"{len(failures)} of {len(cuts)} power cuts broke an invariant:\n" + (
        "\n".join(failures[:8])
    )


def test_power_loss_catches_a_missing_directory_fsync(tmp_path, forkserver, monkeypatch):
    """Without the root's fsync after the rename, a save that returned is lost."""
    real = local_mod.fsync_dir
    monkeypatch.setattr(
        local_mod,
        "fsync_dir",
        lambda path: None if os.path.basename(path) == "root" else real(path),
    )
    requests, cuts = sweep_power_cuts("save", str(tmp_path))
    reports = forkserver.check_many(requests, workdir=str(tmp_path))
    broken = [c for c, r in zip(cuts, reports, strict=True) if r["problems"]]
    # The save returned, the power went, step 2 was gone with its unsynced name.
    assert {(c["returned"], c["mode"]) for c in broken} == {(True, "drop_unsynced")}
    problems = next(r for r in reports if r["problems"])["problems"]
    with pytest.raises(InvariantError, match=r"step 2, the newest checkpoint .* is gone"):
        raise_on_problems({"root": "x", "problems": problems})


def test_power_loss_catches_a_missing_data_fsync(tmp_path, forkserver):
    """Without the shard's fdatasync, the renamed checkpoint's data is lost: detected."""
    requests, cuts = sweep_power_cuts(
        "save",
        str(tmp_path),
        skip_sync=lambda label: label.startswith("fdatasync(") and "distcp" in label,
    )
    reports = forkserver.check_many(requests, workdir=str(tmp_path))
    broken = [(c, r) for c, r in zip(cuts, reports, strict=True) if r["problems"]]
    assert broken, "a checkpoint without its data fsync survived every power cut"
    assert any(c["mode"] == "keep_names" and c["returned"] for c, _ in broken)
    assert any("verify" in p or "is gone" in p for _, r in broken for p in r["problems"])
