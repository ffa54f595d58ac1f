"""Disk-full scenarios on real, size-limited tmpfs mounts (run by test_disk_full.py).

Run as ``unshare -rm python tests/disk_full_child.py BASE SCENARIO...``: inside a user
and mount namespace of its own, each scenario mounts a tmpfs under BASE, sizes it with
``mount -o remount,size=`` so that the next save runs out of space at a chosen place,
and records what happened. Then one fresh interpreter (in the same namespace, so it
sees the mounts) checks every root with ``invariants.check_here``. The last line of
output is a JSON report: ``{scenario: {...facts...}, "invariants": {root: problems}}``.
Mounts die with the namespace; they are unmounted on the way out as well.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from helpers import Randn, build_state  # noqa: E402
from invariants import digest_state  # noqa: E402
from osfaults import OsFaults  # noqa: E402

import ckptstore  # noqa: E402

PAGE = 4096
ROOM = 64 << 20  # "space freed": the mount grown back to this


def make_state(seed: int) -> dict[str, Any]:
    return build_state(seed, w=Randn(1_000_000), b=Randn(333), step=seed)  # w: 4 MB


def mount(path: str, size: int) -> None:
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)


def resize(path: str, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", path], check=True)


def used(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def file_bytes(path: str) -> dict[str, int]:
    """Space each file of a checkpoint takes (allocated pages, not length)."""
    return {n: os.stat(os.path.join(path, n)).st_blocks * 512 for n in sorted(os.listdir(path))}


def temps(root: str) -> list[str]:
    return [n for n in os.listdir(root) if n.startswith((".tmp-", ".pointer-"))]


def full_error(save: Callable[[], Any]) -> dict[str, Any]:
    """Run a save that must run out of space; describe the error."""
    try:
        save()
    except ckptstore.StorageFullError as exc:
        return {
            "type": type(exc).__name__,
            "errno": exc.errno,
            "file": os.path.basename(exc.filename or ""),
            "message": str(exc),
            "is_oserror": isinstance(exc, OSError),
        }
    raise AssertionError("the save did not run out of space")


def facts_after_error(
    root: str, ckpt: ckptstore.Checkpointer, sizes: dict[str, int], err: dict[str, Any]
) -> dict[str, Any]:
    """What a failed save of step 2 left: listed steps, temps, and whether step 1 verifies."""
    return {
        "sizes": sizes,
        "error": err,
        "listed_after_error": [i.step for i in ckpt.list()],
        "temps_after_error": temps(root),
        "verify_1": ckpt.verify(1),
    }


def sized_to_fail(root: str, ckpt: ckptstore.Checkpointer, fit: list[str]) -> dict[str, Any]:
    """Resize so that the files in ``fit`` of the next checkpoint fit and the next does
    not; save step 2; then grow the mount back and save step 2 again."""
    ckpt.save(make_state(1), 1)
    sizes = file_bytes(os.path.join(root, "step_00000001"))
    resize(root, used(root) + sum(sizes[n] for n in fit))
    err = full_error(lambda: ckpt.save(make_state(2), 2))
    out = facts_after_error(root, ckpt, sizes, err)
    resize(root, ROOM)  # space freed
    ckpt.save(make_state(2), 2)
    out["listed_at_end"] = [i.step for i in ckpt.list()]
    out["expected"] = {1: digest_state(make_state(1)), 2: digest_state(make_state(2))}
    return out


def scenario_shard(root: str) -> dict[str, Any]:
    """Full inside the shard: half of it fits. The fix the message suggests (keep
    fewer checkpoints) is what makes the next save succeed."""
    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        ckpt.save(make_state(1), 1)
        sizes = file_bytes(os.path.join(root, "step_00000001"))
        resize(root, used(root) + sizes["__0_0.distcp"] // 2)
        err = full_error(lambda: ckpt.save(make_state(2), 2))
        out = facts_after_error(root, ckpt, sizes, err)
        ckpt.backend.delete("step_00000001")  # keep fewer checkpoints ...
        ckpt.save(make_state(3), 3)  # ... and the next save fits
        out["listed_at_end"] = [i.step for i in ckpt.list()]
    out["expected"] = {s: digest_state(make_state(s)) for s in (1, 2, 3)}
    return out


def scenario_metadata(root: str) -> dict[str, Any]:
    """The shard fits, DCP's ``.metadata`` does not."""
    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        return sized_to_fail(root, ckpt, ["__0_0.distcp"])


def scenario_manifest(root: str) -> dict[str, Any]:
    """Everything but the manifest fits: the last file written before the rename."""
    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        return sized_to_fail(root, ckpt, ["__0_0.distcp", ".metadata"])


def scenario_commit(root: str) -> dict[str, Any]:
    """The rename and the root's fsync. On tmpfs they need no space: a save that fits
    to the last page commits. Real file systems can need a block to grow the root's
    directory there, so ENOSPC is injected at each of them (OS level) as well."""
    out: dict[str, Any] = {}
    faults = OsFaults(root).install()
    try:
        with ckptstore.Checkpointer(root, codec="none") as ckpt:
            ckpt.save(make_state(1), 1)
            sizes = file_bytes(os.path.join(root, "step_00000001"))
            resize(root, used(root) + sum(sizes.values()))
            ckpt.save(make_state(2), 2)  # fits exactly
            st = os.statvfs(root)
            out["free_after_exact_fit"] = st.f_bfree * st.f_frsize
            ckpt.backend.delete("step_00000002")
            for label in ("renameat2(<tmp>)", "fsync(<root>)"):
                faults.reset()
                faults.fail_if = lambda call, label=label: call.label == label
                faults.code = errno.ENOSPC
                err = full_error(lambda: ckpt.save(make_state(2), 2))
                err["fired"] = [c.label for c in faults.fired]
                err["listed"] = [i.step for i in ckpt.list()]
                err["temps"] = temps(root)
                out[label] = err
            faults.reset()
            ckpt.save(make_state(2), 2)
            out["listed_at_end"] = [i.step for i in ckpt.list()]
    finally:
        faults.uninstall()
    out["expected"] = {s: digest_state(make_state(s)) for s in (1, 2)}
    return out


def scenario_manager(root: str) -> dict[str, Any]:
    """CheckpointManager keeping the last 2 on a disk that holds 2.5 checkpoints:
    pruning runs after a commit, so the third save runs out of space. The error says
    to keep fewer checkpoints (ckptstore prune); after that the next save fits."""
    out: dict[str, Any] = {}
    state_of = {s: make_state(s) for s in (1, 2, 3, 4)}
    with ckptstore.CheckpointManager(
        root, save=ckptstore.SaveEvery(steps=1), keep=ckptstore.KeepLast(2), codec="none"
    ) as mgr:
        mgr.save(0, state_of[1])
        mgr.wait()
        one = sum(file_bytes(os.path.join(root, "step_00000001")).values())
        resize(root, used(root) + one + one // 2)  # 2.5 checkpoints in all
        mgr.save(1, state_of[2])
        mgr.wait()
        pending = mgr.save(2, state_of[3])
        assert pending is not None
        try:
            mgr.wait()
        except ckptstore.BackgroundSaveError as exc:
            cause = exc.__cause__
            out["error"] = {
                "type": type(cause).__name__,
                "errno": getattr(cause, "errno", None),
                "message": str(cause),
                "outer": str(exc),
            }
        out["listed_after_error"] = [i.step for i in mgr.checkpointer.list()]  # type: ignore[union-attr]
        out["temps_after_error"] = temps(root)
    # What the error says to do: keep fewer, now. (A manager deletes nothing before its
    # run has committed a save of its own, so it cannot make the room itself.)
    from ckptstore.cli import main as ckptstore_cli

    out["prune_status"] = ckptstore_cli(["prune", root, "--keep-last", "1", "--yes"])
    with ckptstore.CheckpointManager(
        root, save=ckptstore.SaveEvery(steps=1), keep=ckptstore.KeepLast(1), codec="none"
    ) as mgr:
        # The same run goes on (retention only ever deletes its own run's checkpoints).
        mgr.restore(copy.deepcopy(state_of[2]))
        mgr.save(3, state_of[4])
        mgr.wait()
        out["listed_at_end"] = [i.step for i in mgr.checkpointer.list()]  # type: ignore[union-attr]
    out["expected"] = {s: digest_state(state_of[s]) for s in state_of}
    return out


SCENARIOS: dict[str, Callable[[str], dict[str, Any]]] = {
    "shard": scenario_shard,
    "metadata": scenario_metadata,
    "manifest": scenario_manifest,
    "commit": scenario_commit,
    "manager": scenario_manager,
}

CHECK = """
import json, sys
sys.path.insert(0, sys.argv[1])
from invariants import check_here
out = {}
for root, (expected, newest) in json.loads(sys.stdin.read()).items():
    try:
        out[root] = check_here(root, expected=expected, newest=newest)["problems"]
    except Exception as exc:
        out[root] = [f"check raised {type(exc).__name__}: {exc}"]
print(json.dumps(out))
"""


def main() -> None:
    base, names = sys.argv[1], sys.argv[2:]
    report: dict[str, Any] = {}
    roots: dict[str, Any] = {}
    mounted = []
    try:
        for name in names:
            root = os.path.join(base, name)
            mount(root, ROOM)
            mounted.append(root)
            try:
                facts = SCENARIOS[name](root)
            except Exception:
                report[name] = {"crashed": traceback.format_exc()}
                continue
            resize(root, ROOM)  # room for gc to work in
            expected = facts.pop("expected")
            roots[root] = (expected, max(facts["listed_at_end"]))
            facts["root"] = root
            report[name] = facts
        # One fresh interpreter checks every root (it shares this mount namespace).
        proc = subprocess.run(
            [sys.executable, "-c", CHECK, HERE],
            input=json.dumps(roots),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        lines = proc.stdout.strip().splitlines()
        report["invariants"] = (
            json.loads(lines[-1]) if lines else {"?": [proc.stderr[-2000:] or "no report"]}
        )
    finally:
        for root in reversed(mounted):
            subprocess.run(["umount", root], check=False)
    print(json.dumps(report, default=str), flush=True)


if __name__ == "__main__":
    main()
