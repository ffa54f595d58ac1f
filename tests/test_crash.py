"""A save killed mid-flight (SIGKILL, a real process) leaves nothing that looks complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
from helpers import REPO

import ckptstore

CHILD = r"""
import sys, time, torch
sys.path.insert(0, {tests!r})
import ckptstore
from ckptstore.storage.testing import FaultyBackend
from ckptstore.storage import LocalBackend

root = sys.argv[1]
state = {{"w": torch.arange(2_000_000, dtype=torch.float32), "step": 0}}
with ckptstore.Checkpointer(root, chunk_bytes=64 * 1024) as ckpt:
    ckpt.save(state, 1)
# Step 2 writes slowly: every chunk write sleeps, so it is mid-write when killed.
slow = FaultyBackend(LocalBackend(root), delay_s=0.02)
ckpt = ckptstore.Checkpointer(slow, chunk_bytes=64 * 1024)
state["w"] += 1
ckpt.save_async(state, 2)
print("STAGED", flush=True)
time.sleep(120)
"""


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(root):
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(tests=tests), root],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "STAGED", proc.stderr.read()
        deadline = time.monotonic() + 30
        temp = []
        while time.monotonic() < deadline:  # wait until the shard file is being written
            temp = [n for n in os.listdir(root) if n.startswith(".tmp-step_00000002")]
            if temp and os.listdir(os.path.join(root, temp[0])):
                break
            time.sleep(0.01)
        assert temp, "the save never started writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    names = os.listdir(root)
    assert "step_00000002" not in names
    leftovers = [n for n in names if n.startswith(".tmp-step_00000002")]
    assert leftovers, "the dead save's temp dir is there"
    old = time.time() - 3600  # sweep spares anything younger than a few seconds
    os.utime(os.path.join(root, leftovers[0]), (old, old))
    # A fresh process: only step 1 is listed, it verifies and loads; the leftovers go.
    with ckptstore.Checkpointer(root, sweep_grace_s=0) as ckpt:
        assert [i.step for i in ckpt.list()] == [1]
        assert ckpt.verify(1) == []
        target = {"w": torch.zeros(2_000_000), "step": -1}
        ckpt.load(target)
        assert torch.equal(target["w"], torch.arange(2_000_000, dtype=torch.float32))
    assert sorted(os.listdir(root)) == ["step_00000001"]


LIVE = r"""
import sys, time
import ckptstore
from ckptstore.storage import LocalBackend
pending = LocalBackend(sys.argv[1]).begin("step_00000007")
print(pending.token, flush=True)
time.sleep(120)
"""


def test_sweep_never_removes_a_live_save_of_another_process(root):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", LIVE, root], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        token = proc.stdout.readline().strip()
        assert token.startswith(".tmp-step_00000007-")
        old = time.time() - 3600  # old, but alive: its lock says so
        os.utime(os.path.join(root, token), (old, old))
        with ckptstore.Checkpointer(root, sweep_grace_s=0) as ckpt:
            assert ckpt.sweep(0) == []
        assert token in os.listdir(root)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    with ckptstore.Checkpointer(root, sweep_grace_s=0):
        pass  # start-up sweep: the owner is dead now
    assert token not in os.listdir(root)
