"""The manager in real training processes: fresh-process resume, SIGTERM, SIGINT."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO

import ckptstore

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_worker.py")


@contextlib.contextmanager
def started(root, *args):
    """A training process of ``train_worker.py``; killed on the way out if still running."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, WORKER, root, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run(root, *args, timeout=120):
    with started(root, *args) as proc:
        out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def result(path):
    with open(path) as f:
        data = json.load(f)
    data["losses"] = {int(k): v for k, v in data["losses"].items()}
    return data


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 30 steps, without checkpoints: the truth to match."""
    d = tmp_path_factory.mktemp("reference")
    out = str(d / "ref.json")
    run(str(d / "root"), "--steps", "30", "--no-checkpoint", "--out", out)
    return result(out)


def test_resume_in_a_fresh_process_is_bit_identical_mid_epoch(tmp_path, reference):
    root = str(tmp_path / "run")
    first, second = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    run(root, "--steps", "13", "--save-every", "13", "--out", first)  # step 13: mid-epoch 1
    run(root, "--steps", "30", "--out", second)
    a, b = result(first), result(second)
    assert b["start"] == 13
    assert {**a["losses"], **b["losses"]} == reference["losses"]
    assert b["params"] == reference["params"]


def wait_for_line(proc, prefix, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line
    raise AssertionError(f"never saw {prefix!r}; stderr: {proc.stderr.read()[-2000:]}")


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_exits_conventionally_and_resumes_identically(
    tmp_path, reference, sig, status
):
    root = str(tmp_path / "run")
    with started(root, "--steps", "1000", "--slow-from", "5") as proc:
        wait_for_line(proc, "STEP 7")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err[-3000:]
    assert "saving at the end of this step" in err
    with ckptstore.CheckpointManager(root) as mgr:
        listed = mgr.list()
    assert len(listed) == 1
    assert listed[0].reason == "signal"
    saved = listed[0].step
    assert 8 <= saved <= 12
    out = str(tmp_path / "resumed.json")
    run(root, "--steps", str(saved + 4), "--out", out)
    resumed = result(out)
    assert resumed["start"] == saved
    assert resumed["losses"] == {s: reference["losses"][s] for s in range(saved, saved + 4)}


def test_a_second_sigint_exits_at_once_and_commits_nothing(tmp_path):
    root = str(tmp_path / "run")
    # Every storage write waits 50 ms: the save of the tiny model's ~100 items takes seconds.
    with started(root, "--steps", "1000", "--slow-from", "5", "--slow-storage", "0.05") as proc:
        wait_for_line(proc, "STEP 7")
        proc.send_signal(signal.SIGINT)
        first = time.monotonic()
        deadline = first + 30
        while time.monotonic() < deadline:  # wait until the signal's save is writing
            if os.path.isdir(root) and any(n.startswith(".tmp-") for n in os.listdir(root)):
                break
            time.sleep(0.02)
        # The same signal again within a second is taken for a duplicate (a terminal's
        # Ctrl+C and torchrun's forwarded copy): a second Ctrl+C comes later than that.
        time.sleep(max(0.0, first + 1.2 - time.monotonic()))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err[-3000:]
    assert "second signal" in err
    assert not [n for n in os.listdir(root) if n.startswith("step_")], (
        "nothing half-written is visible"
    )
    with ckptstore.CheckpointManager(root) as mgr:
        assert mgr.list() == []
        assert mgr.restore(ckptstore.TrainState()) == 0


def test_no_checkpoint_writes_nothing(tmp_path):
    root = str(tmp_path / "never")
    run(root, "--steps", "3", "--save-every", "1", "--no-checkpoint")
    assert not os.path.exists(root)


def run_failing(root, *args, timeout=120):
    with started(root, *args) as proc:
        _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 1, err[-3000:]
    assert "injected failure" in err
    return err


def test_an_error_saves_the_last_completed_step_and_resumes_identically(tmp_path, reference):
    root = str(tmp_path / "run")
    # Step index 13 fails in its forward pass: 13 steps were done; the data loader has
    # already handed out the 14th batch and the generators have moved on.
    err = run_failing(root, "--steps", "30", "--raise-before-update", "13")
    assert "saved step 13 (error)" in err
    with ckptstore.CheckpointManager(root) as mgr:
        assert [(c.step, c.reason) for c in mgr.list()] == [(13, "error")]
    out = str(tmp_path / "resumed.json")
    run(root, "--steps", "17", "--out", out)
    resumed = result(out)
    assert resumed["start"] == 13
    assert resumed["losses"] == {s: reference["losses"][s] for s in range(13, 17)}


def test_an_error_after_the_optimizer_step_saves_nothing(tmp_path):
    root = str(tmp_path / "run")
    err = run_failing(root, "--steps", "30", "--save-every", "5", "--raise-after-update", "7")
    assert "not saved: the error came after optimizer.step()" in err
    with ckptstore.CheckpointManager(root) as mgr:
        assert [(c.step, c.reason) for c in mgr.list()] == [(5, "interval")]


def test_a_duplicate_signal_does_not_abort_the_save(tmp_path):
    """A terminal's Ctrl+C and torchrun's forwarded copy arrive together: one signal."""
    root = str(tmp_path / "run")
    with started(root, "--steps", "1000", "--slow-from", "5") as proc:
        wait_for_line(proc, "STEP 7")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "second signal" not in err
    with ckptstore.CheckpointManager(root) as mgr:
        assert [c.reason for c in mgr.list()] == ["signal"]
