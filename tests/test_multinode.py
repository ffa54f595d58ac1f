"""Two nodes on one machine: two ``torchrun --nnodes=2 --node_rank={0,1}`` launchers of
the reference loop, each with its own ``--ckpt-dir`` standing for its node-local disk.

Saves land in parts (each node's ranks' shards on its own disk); SIGKILL of one node's
processes in a save (its part's files written, not yet renamed); a restart of both resumes from the newest step complete on
both disks and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from helpers import REPO, free_port
from test_train import TINY, env

STEPS = ["--steps", "24", "--save-every", "4", "--log-every", "4"]


def launch(
    node: int,
    port: int,
    ckpt_dir,
    report,
    crash_at: str | None = None,
    extra: list[str] | None = None,
) -> subprocess.Popen[str]:
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=2",
        "--rdzv_backend=static", f"--rdzv_endpoint=127.0.0.1:{port}", "--max_restarts=0",
        "-m", "ckptstore.train", *TINY, *STEPS, "--ckpt-dir", str(ckpt_dir),
        "--report", str(report), *(extra or []),
    ]  # fmt: skip
    environ = env()
    if crash_at:
        environ["CKPTSTORE_CRASH_AT"] = crash_at
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environ,
        cwd=REPO,
    )


def run_two_nodes(tmp, name: str, timeout: float = 300) -> tuple[str, str]:
    port = free_port()
    nodes = [launch(n, port, tmp / f"{name}{n}", tmp / f"{name}.json") for n in (0, 1)]
    outs = [finish(p, timeout) for p in nodes]
    for p, out in zip(nodes, outs, strict=True):
        assert p.returncode == 0, out[-5000:]
    assert "ckptstore train: node 1, ranks 2-3 of 4, checkpoints in" in outs[1], outs[1][-3000:]
    return outs[0], outs[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own,
    so a kill of the launcher's process group misses them)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        found += kids
        frontier = kids
    return found


def kill_node(p: subprocess.Popen[str]) -> None:
    """SIGKILL a launcher and all its workers: a node that dies."""
    for pid in [*descendants(p.pid), p.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def finish(p: subprocess.Popen[str], timeout: float) -> str:
    """``p``'s output once it exits; after ``timeout`` it is killed, workers and all."""
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_node(p)
        out, _ = p.communicate()
    finally:
        if p.poll() is None:
            kill_node(p)
            p.wait()
    return out


def committed(root) -> list[int]:
    return sorted(
        int(n[5:])
        for n in os.listdir(root)
        if n.startswith("step_") and (root / n / "manifest.json").exists()
    )


def test_two_nodes_save_on_their_own_disks_and_resume_after_one_is_killed(tmp_path):
    # Uninterrupted: 24 steps, a save every 4, each node's part on its own disk.
    out0, _ = run_two_nodes(tmp_path, "straight")
    assert "cpu x 4 process(es) (FSDP2)" in out0
    for node in (0, 1):
        root = tmp_path / f"straight{node}"
        assert committed(root)[-1] == 24
        manifest = json.loads((root / "step_00000024" / "manifest.json").read_text())
        mine = {f"__{r}_0.distcp" for r in (2 * node, 2 * node + 1)}
        assert {f for f in manifest["files"] if f.endswith(".distcp")} == mine
        assert set(manifest["part"]["elsewhere"]) == {f"__{r}_0.distcp" for r in range(4)} - mine
    want = json.loads((tmp_path / "straight.json").read_text())

    # The same run; the rank that commits node 1's part is SIGKILLed in its third save
    # (step 12), its files written and fsynced, before the rename; the rest of node 1
    # is killed with it, and node 0's processes once they have stopped.
    port = free_port()
    cut0, cut1 = tmp_path / "cut0", tmp_path / "cut1"
    crash = "local.commit.before_rename@3"
    nodes = [
        launch(0, port, cut0, tmp_path / "cut.json"),
        launch(1, port, cut1, tmp_path / "cut1.json", crash),
    ]
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and nodes[1].poll() is None:
            if cut1.exists() and any(n.startswith(".tmp-step_00000012") for n in os.listdir(cut1)):
                time.sleep(1.0)  # its committer crashes at the rename
                break
            time.sleep(0.01)
        kill_node(nodes[1])
    finally:
        out1 = finish(nodes[1], 60)
        out0 = finish(nodes[0], 120)
    assert nodes[1].returncode != 0, out1[-3000:]
    assert committed(cut0) == [4, 8], (committed(cut0), out0[-3000:])
    assert committed(cut1) == [4, 8], (committed(cut1), out1[-3000:])

    # Both nodes restarted: they resume from the newest step complete on both disks
    # and end exactly where the uninterrupted run ended.
    out0, _ = run_two_nodes(tmp_path, "cut")
    assert "from step 8" in out0, out0[-3000:]
    got = json.loads((tmp_path / "cut.json").read_text())
    assert got["step"] == 24 and got["world_size"] == 4
    assert got["param_digest"] == want["param_digest"]
    assert got["losses"] and all(want["losses"][k] == v for k, v in got["losses"].items())


def test_each_node_backs_up_its_part_and_a_fresh_cluster_restores_from_s3(tmp_path, s3_bucket):
    backup = f"s3://{s3_bucket}/run"
    short = ["--steps", "8"]
    port = free_port()
    nodes = [
        launch(n, port, tmp_path / f"a{n}", tmp_path / "a.json", extra=[*short, "--backup", backup])
        for n in (0, 1)
    ]
    outs = [finish(p, 300) for p in nodes]
    for p, out in zip(nodes, outs, strict=True):
        assert p.returncode == 0, out[-5000:]
    from ckptstore.storage import open_backend

    remote = open_backend(backup)
    manifest = json.loads(remote.read_bytes("step_00000008/manifest.json"))
    assert "part" not in manifest  # a whole checkpoint: every node's shards
    assert {f for f in manifest["files"] if f.endswith(".distcp")} == {
        f"__{r}_0.distcp" for r in range(4)
    }
    saved = json.loads((tmp_path / "a.json").read_text())

    # A fresh two-node cluster, empty local disks: every rank reads from S3 what it needs.
    port = free_port()
    nodes = [
        launch(
            n,
            port,
            tmp_path / f"b{n}",
            tmp_path / "b.json",
            extra=["--steps", "8", "--backup", backup],
        )
        for n in (0, 1)
    ]
    outs = [finish(p, 300) for p in nodes]
    for p, out in zip(nodes, outs, strict=True):
        assert p.returncode == 0, out[-5000:]
    assert "from step 8" in outs[0], outs[0][-3000:]
    assert json.loads((tmp_path / "b.json").read_text())["param_digest"] == saved["param_digest"]

    # One node of 3 ranks, an empty local disk: restores the same parameters from S3.
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun, "--standalone", "--nproc_per_node=3", "-m", "ckptstore.train", *TINY,
        "--steps", "8", "--ckpt-dir", str(tmp_path / "c"), "--report", str(tmp_path / "c.json"),
        "--backup", backup,
    ]  # fmt: skip
    one = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "from step 8" in one.stdout
    got = json.loads((tmp_path / "c.json").read_text())
    assert got["world_size"] == 3 and got["param_digest"] == saved["param_digest"]


def test_nodes_launched_with_different_flags_both_stop_saying_which(tmp_path):
    """--save-every 4 on one node and 3 on the other: the ranks met in different
    collectives and gloo aborted ("collective mismatch"), naming no flag. Every rank now
    stops at once (exit 2, torchrun then 1), naming the flag and the ranks' values."""
    port = free_port()
    nodes = [
        launch(n, port, tmp_path / f"d{n}", tmp_path / f"r{n}.json", extra=["--save-every", s])
        for n, s in ((0, "4"), (1, "3"))
    ]
    outs = [finish(p, 180) for p in nodes]
    said = "different flags (--save-every: 4 on rank(s) 0-1, 3 on rank(s) 2-3)"
    for p, out in zip(nodes, outs, strict=True):
        assert p.returncode != 0, out[-3000:]
        assert out.count(said) == 2, out[-3000:]  # (each of the node's two ranks)
        assert "exitcode: 2" in out and "collective mismatch" not in out, out[-3000:]
    assert not os.path.exists(tmp_path / "d0" / "step_00000004")  # (nothing trained)
