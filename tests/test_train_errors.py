"""The training command's expected failures, run as a user runs it (issue 14).

Each case runs the real ``python -m ckptstore.train`` and checks the exit status (1
failed, 2 usage), that no Python traceback reaches the user, that it stopped before
training, and that the one-line message says what to type next. Read-only and full
file systems are real tmpfs mounts inside a user and mount namespace (``unshare -rm``),
where root's permission bits would not stop a write. Also: two runs on one checkpoint
directory (the second is refused at once, naming the first; ``ckptstore ls`` works
meanwhile), and the end-of-run summary of a backup that fell behind.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO

TINY = ["--size", "tiny", "--device", "cpu", "--batch-size", "4", "--eval-every", "0"]
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def env(unset: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in unset}
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.update(extra)
    return e


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ckptstore.train", *TINY, "--steps", "2", *args]


def run(
    cmd: list[str], timeout: float = 180, unset: tuple[str, ...] = (), **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env(unset, **extra), cwd=REPO
    )


def in_namespace(script: str, cmd: list[str]) -> list[str]:
    """``cmd`` run inside a fresh user and mount namespace, after ``script`` (mounts)."""
    return ["unshare", "-rm", "sh", "-c", f"{script} && exec {shlex.join(cmd)}"]


def namespaces_work() -> bool:
    if sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    return probe.returncode == 0


def assert_clean_failure(out: subprocess.CompletedProcess[str], code: int, *hints: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "step      1/" not in out.stdout, "it trained before failing"
    errors = [line for line in out.stderr.splitlines() if "train: error: " in line]
    assert errors, out.stderr[-3000:]
    for hint in hints:
        assert hint in out.stderr, out.stderr[-3000:]
    assert "Checkpointer(" not in out.stderr  # command-line terms, not Python calls


# ---- bad arguments and unusable roots ---------------------------------------------------
def case_resume_foo(tmp):
    return ["--ckpt-dir", str(tmp / "run"), "--resume", "foo"], 2, ["--resume foo", "ckptstore ls"]


def case_data_missing(tmp):
    return (
        ["--data", str(tmp / "nope.txt"), "--ckpt-dir", str(tmp / "run")],
        2,
        [
            "no such file",
            "leave --data out",
        ],
    )


def case_data_empty(tmp):
    (tmp / "empty.txt").write_bytes(b"")
    return ["--data", str(tmp / "empty.txt"), "--ckpt-dir", str(tmp / "run")], 2, ["is empty"]


def case_root_is_a_file(tmp):
    (tmp / "file").write_text("not a directory")
    return ["--ckpt-dir", str(tmp / "file")], 2, ["is a file, not a directory"]


def case_root_under_a_file(tmp):  # (was exit 1, "... then save again")
    (tmp / "file").write_text("not a directory")
    return ["--ckpt-dir", str(tmp / "file" / "run")], 2, ["lies under a file", "give a directory"]


def case_root_is_a_broken_link(tmp):  # (a mount not up yet: was "is a file")
    os.symlink(tmp / "not-mounted", tmp / "link")
    return ["--ckpt-dir", str(tmp / "link" / "run")], 2, ["is a symbolic link to", "not there"]


def case_root_is_empty(tmp):
    return ["--ckpt-dir", ""], 2, ["--ckpt-dir must not be empty"]


@pytest.mark.parametrize(
    "case",
    [
        case_resume_foo,
        case_data_missing,
        case_data_empty,
        case_root_is_a_file,
        case_root_under_a_file,
        case_root_is_a_broken_link,
        case_root_is_empty,
    ],
    ids=lambda c: c.__name__[5:],
)
def test_expected_failures_say_what_to_do_without_a_traceback(tmp_path, case):
    args, code, hints = case(tmp_path)
    out = run(train_cmd(*args))
    assert_clean_failure(out, code, *hints)


@pytest.mark.skipif(not namespaces_work(), reason="needs unshare -rm (user + mount namespace)")
@pytest.mark.parametrize(
    ("mount", "hints"),
    [
        ("-o ro", ["Read-only file system", "give a directory this user can write"]),
        ("-o size=16m,nr_inodes=1", ["out of inodes", "--ckpt-dir"]),
    ],
    ids=["read-only", "no-inodes"],
)
def test_an_unwritable_root_fails_before_training(tmp_path, mount, hints):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = train_cmd("--ckpt-dir", str(mnt / "run" if "ro" not in mount else mnt))
    out = run(in_namespace(f"mount -t tmpfs {mount} tmpfs {shlex.quote(str(mnt))}", cmd))
    assert_clean_failure(out, 1, *hints)


@pytest.mark.skipif(not namespaces_work(), reason="needs unshare -rm (user + mount namespace)")
def test_a_disk_that_fills_during_the_run_says_so_in_one_line(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = train_cmd("--ckpt-dir", str(mnt / "run"), "--save-every", "1")
    out = run(in_namespace(f"mount -t tmpfs -o size=256k tmpfs {shlex.quote(str(mnt))}", cmd))
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "out of space" in out.stderr and "--keep-last" in out.stderr, out.stderr[-3000:]


# ---- S3: no credentials, no bucket ------------------------------------------------------
def no_credentials(s3_server) -> dict[str, str]:
    e = {k: v for k, v in s3_server.client_env().items() if k not in AWS_KEYS}
    e.update(
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_CONFIG_FILE="/nonexistent",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return e


@pytest.mark.parametrize("flag", ["--ckpt-dir", "--backup"])
def test_s3_without_credentials_fails_before_training(tmp_path, s3_server, flag):
    bucket = s3_server.new_bucket()
    extra = no_credentials(s3_server)
    url = f"s3://{bucket}/run"
    args = [flag, url] if flag == "--ckpt-dir" else ["--ckpt-dir", str(tmp_path / "r"), flag, url]
    out = run(train_cmd(*args), unset=AWS_KEYS, **extra)
    assert_clean_failure(out, 1, flag, "AWS_ACCESS_KEY_ID")


def test_a_backup_bucket_that_does_not_exist_fails_before_training(tmp_path, s3_server):
    out = run(train_cmd("--ckpt-dir", str(tmp_path / "r"), "--backup", "s3://no-such-bucket/x"))
    assert_clean_failure(out, 1, "--backup s3://no-such-bucket/x", "does not exist")


# ---- two writers on one root --------------------------------------------------------------
@contextlib.contextmanager
def training(root, log, *args: str):
    """A training process writing into ``log`` (a file: a pipe nobody reads would fill)."""
    cmd = [sys.executable, "-m", "ckptstore.train", *TINY, "--ckpt-dir", str(root), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env(), cwd=REPO
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            if text in f.read():
                return
        time.sleep(0.2)
    with open(path) as f:
        pytest.fail(f"{text!r} never appeared:\n{f.read()[-3000:]}")


def test_a_second_writer_is_refused_at_once_naming_the_first(tmp_path):
    root, log = tmp_path / "run", tmp_path / "first.log"
    with training(root, log, "--steps", "100000", "--save-every", "5", "--log-every", "1") as first:
        wait_for(log, "step      6/")  # it has saved: a real writer
        assert first.poll() is None

        start = time.monotonic()
        second = run(train_cmd("--ckpt-dir", str(root)), timeout=120)
        assert_clean_failure(second, 1, f"process {first.pid} on host", "since", "--ckpt-dir")
        assert time.monotonic() - start < 60

        # Readers run freely meanwhile.
        ls = run([sys.executable, "-m", "ckptstore", "ls", str(root)], timeout=120)
        assert ls.returncode == 0, ls.stdout + ls.stderr
        assert "committed checkpoint(s)" in ls.stdout, ls.stdout

        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 128 + signal.SIGTERM

    # The lease died with its holder: the same command now resumes.
    again = run([*train_cmd("--ckpt-dir", str(root)), "--steps", "8"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Resume:           from step" in again.stdout, again.stdout


def test_the_lease_is_held_by_a_writing_manager_only(root):
    import ckptstore

    with ckptstore.CheckpointManager(root) as writer:
        assert writer.enabled
        with pytest.raises(ckptstore.WriterLeaseError, match=f"process {os.getpid()} on host"):
            ckptstore.CheckpointManager(root)
        with ckptstore.CheckpointManager(root, enabled=False) as reader:  # readers are free
            assert reader.list() == []
    with ckptstore.CheckpointManager(root):  # released by close()
        pass


# ---- a backup that fell behind ----------------------------------------------------------
def test_a_backup_that_fell_behind_is_in_the_summary_and_the_exit_status(capsys):
    import argparse

    from ckptstore.manager.backup_status import BackupStatus
    from ckptstore.train.loop import Run
    from ckptstore.train.report import EXIT_BACKUP_BEHIND, backup_summary

    class Manager:
        def __init__(self, newest: str | None) -> None:
            self.status = BackupStatus(
                remote="s3://b/run",
                newest_backed_up=newest,
                in_progress=None,
                queued=(),
                skipped=(),
                failures=5 if newest != "step_00000010" else 0,
                last_error="connection refused" if newest != "step_00000010" else None,
                behind_s=12.0,
            )

        def backup_status(self) -> BackupStatus:
            return self.status

        checkpointer = None

    run_ = Run(argparse.Namespace(ckpt_dir="runs/gpt"))
    assert backup_summary(run_, Manager("step_00000005"), "step_00000010") == EXIT_BACKUP_BEHIND
    out = capsys.readouterr().out
    assert "is BEHIND" in out and "step_00000005" in out and "connection refused" in out
    assert "ckptstore sync runs/gpt s3://b/run" in out
    parts = Manager("step_00000005")  # node-local disks: sync refuses their parts
    parts.checkpointer = argparse.Namespace(node_local=True)  # type: ignore[assignment]
    assert backup_summary(run_, parts, "step_00000010") == EXIT_BACKUP_BEHIND
    out = capsys.readouterr().out
    assert "is BEHIND" in out and "ckptstore sync" not in out, out
    assert backup_summary(run_, Manager("step_00000010"), "step_00000010") == 0
    assert "newest step_00000010" in capsys.readouterr().out


@pytest.mark.skipif(not namespaces_work(), reason="needs unshare -rm (user + mount namespace)")
def test_a_restore_from_the_backup_onto_a_full_disk_says_so(tmp_path):
    backup = str(tmp_path / "backup")
    first = run(train_cmd("--ckpt-dir", str(tmp_path / "a"), "--backup", backup))
    assert first.returncode == 0, first.stdout + first.stderr
    assert os.path.isdir(os.path.join(backup, "step_00000002")), first.stdout + first.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = train_cmd("--ckpt-dir", str(mnt / "run"), "--backup", backup, "--steps", "4")
    out = run(in_namespace(f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(mnt))}", cmd))
    assert_clean_failure(
        out, 1, "could not download the checkpoint from the backup", "out of space"
    )


@pytest.mark.skipif(not namespaces_work(), reason="needs unshare -rm (user + mount namespace)")
def test_a_backup_that_fails_during_the_run_makes_the_exit_status_say_so(tmp_path):
    mnt = tmp_path / "mnt"  # the backup: writable at start-up, too small for a checkpoint
    mnt.mkdir()
    cmd = train_cmd("--ckpt-dir", str(tmp_path / "run"), "--backup", str(mnt / "backup"))
    out = run(in_namespace(f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(mnt))}", cmd))
    text = out.stdout + out.stderr
    assert out.returncode == 3, text[-3000:]  # trained and saved, but the backup is behind
    assert "Traceback" not in text, text[-3000:]
    assert "Done: 2 steps" in out.stdout
    assert "is BEHIND" in out.stdout and "ckptstore sync" in out.stdout, out.stdout[-3000:]
