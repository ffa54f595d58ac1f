"""The reference training loop, run as a user runs it: real subprocesses, real signals.

SIGTERM to a training process then rerunning the same command equals the uninterrupted
run bit for bit (same losses, same parameters); a run saved by torchrun with 2 CPU
processes (FSDP2) resumes in 1 process with the same parameters; ``--no-checkpoint``
writes nothing; bad arguments say what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO

TINY = ["--size", "tiny", "--batch-size", "4", "--eval-every", "10", "--eval-batches", "1"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e["GLOO_SOCKET_IFNAME"] = "lo"
    return e


def train_cmd(ckpt_dir, report, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "ckptstore.train", *TINY,
        "--ckpt-dir", str(ckpt_dir), "--report", str(report), *extra,
    ]  # fmt: skip


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)


def report(path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_sigterm_then_rerun_equals_the_uninterrupted_run(tmp_path):
    assert_sigterm_then_rerun_equals_the_uninterrupted_run(tmp_path)


def assert_sigterm_then_rerun_equals_the_uninterrupted_run(tmp_path, *extra: str) -> None:
    """The reference loop (with ``extra`` arguments, e.g. ``--device cuda``) stopped by
    SIGTERM at step 23 of 40 and rerun ends with the losses and parameters of a run
    that was never stopped."""
    steps = ["--steps", "40", "--save-every", "10", "--log-every", "1", *extra]
    whole = run(train_cmd(tmp_path / "a", tmp_path / "a.json", *steps))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    want = report(tmp_path / "a.json")

    cmd = train_cmd(tmp_path / "b", tmp_path / "b.json", *steps)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=REPO
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("step     23/40"):  # mid-way, between two interval saves
                proc.send_signal(signal.SIGTERM)
                break
        out = "".join(seen) + proc.stdout.read()
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert "interrupted after step" in out and "rerun the same command to resume" in out
    assert "(signal)" in out  # the per-save line of the signal save
    stopped = report(tmp_path / "b.json")["step"]
    assert 23 <= stopped < 40

    again = run(cmd)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"from step {stopped}" in again.stdout
    got = report(tmp_path / "b.json")
    assert got["step"] == want["step"] == 40
    assert got["param_digest"] == want["param_digest"]
    resumed = {k: v for k, v in want["losses"].items() if int(k) >= stopped}
    assert got["losses"] == resumed
    for line in ("Done: 40 steps", "Blocked on checkpoints", "Checkpoints kept in"):
        assert line in again.stdout


def test_fine_tuning_with_incremental_saves_links_the_frozen_blocks_and_resumes_exactly(tmp_path):
    """--freeze-blocks --incremental: saves after the first link the blocks, and a run
    stopped by SIGTERM and rerun still ends where the uninterrupted one does."""
    extra = ("--freeze-blocks", "--incremental", "--full-every", "0", "--trust-version-counters")
    assert_sigterm_then_rerun_equals_the_uninterrupted_run(tmp_path, *extra)
    out = run(train_cmd(tmp_path / "a", tmp_path / "r.json", "--steps", "50", *extra))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "M train: --freeze-blocks)" in out.stdout
    assert "incremental, never full, trusting version counters" in out.stdout
    manifests = [
        json.loads(p.read_text()) for p in sorted((tmp_path / "a").glob("*/manifest.json"))
    ]
    assert len(manifests) == 3 and all(m["linked"] for m in manifests), manifests


def test_torchrun_two_processes_resume_with_one_and_back(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun, "--standalone", "--nproc_per_node=2", "-m", "ckptstore.train", *TINY,
        "--steps", "12", "--save-every", "6", "--log-every", "6",
        "--ckpt-dir", str(tmp_path / "c"), "--report", str(tmp_path / "two.json"),
    ]  # fmt: skip
    two = run(cmd)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "cpu x 2 process(es) (FSDP2)" in two.stdout
    saved = report(tmp_path / "two.json")
    assert saved["world_size"] == 2 and saved["step"] == 12
    manifest = json.loads((tmp_path / "c" / "step_00000012" / "manifest.json").read_text())
    assert manifest["world_size"] == 2

    # 2 -> 1: the same parameters; then train on to step 18 in one process.
    one = run(train_cmd(tmp_path / "c", tmp_path / "one.json", "--steps", "12"))
    assert one.returncode == 0, one.stdout + one.stderr
    assert "from step 12" in one.stdout
    got = report(tmp_path / "one.json")
    assert got["world_size"] == 1
    assert got["param_digest"] == saved["param_digest"]
    on = run(train_cmd(tmp_path / "c", tmp_path / "on.json", "--steps", "18"))
    assert on.returncode == 0, on.stdout + on.stderr
    single = report(tmp_path / "on.json")

    # 1 -> 2: the 1-process checkpoint of step 18, resumed by 2 processes.
    back = run([*cmd[: cmd.index("--steps")], "--steps", "18", "--ckpt-dir", str(tmp_path / "c"),
                "--report", str(tmp_path / "back.json")])  # fmt: skip
    assert back.returncode == 0, back.stdout + back.stderr
    assert "from step 18" in back.stdout
    again = report(tmp_path / "back.json")
    assert again["world_size"] == 2
    assert again["param_digest"] == single["param_digest"]


def test_no_checkpoint_writes_nothing(tmp_path):
    out = run(train_cmd(tmp_path / "none", tmp_path / "r.json", "--steps", "5", "--no-checkpoint"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Save checkpoints: disabled" in out.stdout
    assert not os.path.exists(tmp_path / "none")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "5", "--epochs", "1"], "not both"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),  # was taken for the default
        (["--steps", "-3"], "--steps must be at least 1"),  # was trained as 0 steps
        (["--save-every-s", "-1"], "--save-every-s must be a number >= 0"),  # named a parameter
        (["--save-every-s", "nan"], "--save-every-s must be a number >= 0"),
        (["--lr", "nan"], "--lr must be a number >= 0"),  # trained on NaN
        (["--full-every", "2"], "--full-every is about incremental saves: add --incremental"),
        (["--incremental", "--full-every", "-1"], "--full-every must be a number >= 0"),
        (["--no-checkpoint", "--incremental"], "--incremental is about saving, and --no-che"),
        (["--no-checkpoint", "--keep-best", "2"], "--keep-best is about saving"),
        (["--keep-best", "2", "--eval-every", "0"], "--eval-every 0 never validates"),  # kept none
        (["--backup", "s3:/b/run"], "--backup s3:/b/run: a URL needs two slashes: s3://b/run"),
        (["--backup", "{ckpt}/"], "is --ckpt-dir itself"),  # no backup at all, and two
        (["--backup", "{ckpt}/bak"], "is nested with --ckpt-dir"),  # retentions on one dir
        (["--backup", "local://{ckpt}"], "is --ckpt-dir itself"),
        (["--seed", "-1"], "--seed must be between 0 and 4294967295"),  # was a traceback
        (["--seed", str(2**32)], "--seed must be between 0 and 4294967295"),
        (["--device", "cuda:0"] if not os.path.exists("/dev/nvidia0") else ["--size", "nope"], ""),
    ],
)
def test_bad_arguments_say_what_to_do(tmp_path, args, message):
    args = [a.replace("{ckpt}", str(tmp_path / "x")) for a in args]
    out = run(train_cmd(tmp_path / "x", tmp_path / "r.json", *args), timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]  # a usage error, one line, no traceback
    assert message in out.stderr + out.stdout
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    if message:  # argparse's: one line, not the options' usage block before it
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].endswith(" --help)"), out.stderr


def test_a_run_with_tighter_retention_says_what_it_will_delete_before_training(tmp_path):
    """Resumed with the default --keep-last 3 over checkpoints an earlier run kept with
    --keep-last 0: they went at the first save without a word before."""
    first = run(train_cmd(tmp_path / "r", tmp_path / "a.json", "--steps", "40",
                          "--save-every", "10", "--keep-last", "0"))  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    again = run(train_cmd(tmp_path / "r", tmp_path / "b.json", "--steps", "50",
                          "--save-every", "10"))  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    banner = again.stdout.split("=" * 72)[1]  # before training
    assert "Retention:        keep last 3 will delete checkpoints already in" in banner
    assert "1 now (step_00000010)" in banner, banner


def test_the_console_command_runs_the_same_loop(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "ckptstore")
    if not os.path.exists(exe):
        pytest.skip("the ckptstore console script is not installed (pip install -e .)")
    start = time.monotonic()
    out = run([exe, "train", "--help"], timeout=60)
    assert out.returncode == 0 and "--save-every" in out.stdout, out.stderr
    assert out.stdout.startswith("usage: ckptstore train"), out.stdout[:80]
    assert time.monotonic() - start < 60


def test_resume_of_a_file_is_a_usage_error(tmp_path):
    """--resume FILE: said in the flag's terms (it was "[Errno 20] open failed: Not a
    directory" on the file's manifest.json, exit 1)."""
    from ckptstore.errors import EXIT_USAGE, CliError, StorageError
    from ckptstore.train import checks

    afile = tmp_path / "afile"
    afile.write_text("hi")
    exc = StorageError(f"[Errno 20] open failed: Not a directory: '{afile}/manifest.json'")
    got = checks.resume_error(str(afile), "r", exc)
    assert isinstance(got, CliError) and got.code == EXIT_USAGE, got
    assert "that is a file, not a checkpoint directory" in str(got), got


@pytest.mark.parametrize("which", ["latest", "30"])
def test_a_part_that_cannot_load_on_this_shape_is_not_a_usage_error(which):
    """--resume STEP of a node-local part on another shape: the step is there (not a
    usage error naming steps `ls` lists); the message says what works."""
    from ckptstore.errors import EXIT_FAILED, CliError, PartElsewhereError
    from ckptstore.train import checks

    exc = PartElsewhereError("r/step_00000030/__2_0.distcp is on another node's disk: ...")
    got = checks.resume_error(which, "r", exc)
    assert isinstance(got, CliError) and got.code == EXIT_FAILED, got
    assert "start over with --resume none --discard-newer" in str(got), got
    assert "a step that" not in str(got), got


def test_the_demo_on_a_finished_directory_says_so(tmp_path):
    """The README's main command run again with the same --dir, its run finished: it
    resumes, has nothing left to do, and says so (it exited 1, "not 130: stopping")."""
    ckpts = tmp_path / "ckpts"
    first = run(train_cmd(ckpts, tmp_path / "r.json", "--steps", "4", "--save-every", "2"))
    assert first.returncode == 0, first.stderr[-2000:]
    cmd = [sys.executable, "-m", "ckptstore.train.demo", "--dir", str(ckpts), "--steps", "4"]
    out = run([*cmd, "--interrupt-at", "2", *TINY], timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "had already done its 4 steps" in out.stdout, out.stdout[-3000:]


@pytest.mark.parametrize("flags", [["--steps", "abc"], ["--steps", "10", "--interrupt-at", "20"]])
def test_the_demo_says_a_usage_error_in_one_line_without_importing_torch(flags):
    """The demo's own flags fail as the training loop's do: one line that points at
    --help, not argparse's usage block first; and before torch is imported."""
    cmd = [sys.executable, "-X", "importtime", "-m", "ckptstore.train.demo", *flags]
    out = run(cmd, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if not ln.startswith("import time:")]
    assert len(lines) == 1 and lines[0].startswith("python -m ckptstore.train.demo: error: ")
    assert lines[0].endswith("(see python -m ckptstore.train.demo --help)"), lines
    assert not [ln for ln in out.stderr.splitlines() if ln.endswith("| torch")], "torch imported"


def test_the_kept_line_of_a_run_that_keeps_every_checkpoint_stays_short(tmp_path, capsys):
    """Stranger test: with --keep-last 0, the closing line listed all 200 kept steps."""
    import argparse

    import torch

    import ckptstore
    from ckptstore.train.loop import Run
    from ckptstore.train.report import kept_summary

    root = str(tmp_path / "r")
    with ckptstore.CheckpointManager(root, keep=None) as mgr:
        for step in range(15):  # a tagged one in the middle (a run ended there) stays named
            mgr.save(step, {"w": torch.zeros(4)}, reason="final" if step == 7 else "interval")
        mgr.wait()
    run = Run(args=argparse.Namespace(ckpt_dir=root, no_checkpoint=False))
    assert kept_summary(run, mgr) == "step_00000015"
    line = capsys.readouterr().out.strip()
    assert line == (
        f"Checkpoints kept in {root}: 1, 2, 3, ... (4 more), 8 [final], ... (4 more), "
        "13, 14, 15 [latest] (15 in all; ckptstore ls lists them)"
    ), line


def test_a_run_resumed_past_its_steps_says_nothing_was_trained(capsys):
    """--steps 10 on a run at step 30 printed "Done: 30 steps (0 in this run)" and
    nothing else."""
    import argparse
    from types import SimpleNamespace

    from ckptstore.train.loop import Run
    from ckptstore.train.report import summary

    run = Run(args=argparse.Namespace(epochs=None))
    state = SimpleNamespace(step=30)
    summary(run, None, state, 0, 0.01, 0.0, 256, total=10)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "Nothing trained: the run resumed at step 30, past where --steps ends it" in out, out
    summary(run, None, SimpleNamespace(step=10), 0, 0.01, 0.0, 256, total=10)  # type: ignore[arg-type]
    assert "Nothing trained" not in capsys.readouterr().out  # (a finished run, rerun)
