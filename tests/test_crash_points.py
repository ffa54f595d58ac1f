"""Real processes saving in a loop, killed with SIGKILL at every named point of the commit
protocol and at random moments; afterwards a fresh process checks the invariants
(``tests/invariants.py``): nothing committed lost, nothing half-written visible, gc
leaves nothing behind.

The saving processes are forked from a server that imported ckptstore once
(``tests/crashrig.py``), so one trial costs a fraction of a second instead of a new
interpreter's ~4 s; one test also arms a crash point the documented way, through the
environment of a brand-new interpreter. ``--run-slow`` runs hundreds of random kills
and prints the counts (``CKPTSTORE_STRESS_OUT=path`` also writes them there as JSON).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from typing import Any

import damage
import pytest
import torch
from crashrig import ForkServer, expected_digests, make_state, read_progress
from helpers import REPO
from invariants import (
    InvariantError,
    assert_surfaced,
    check_invariants,
    digest_state,
    raise_on_problems,
)

import ckptstore
from ckptstore.crashpoints import CRASH_POINTS

SMALL = 100_000  # floats: ~400 KB a checkpoint, several 64 KiB chunks
MULTIPART = 1_500_000  # floats: 6 MB, two parts of 5 MiB on S3
CHILD_TIMEOUT_S = 60.0


def _job(tmp: str, root_url: str, **kw: Any) -> dict[str, Any]:
    os.makedirs(tmp, exist_ok=True)
    return {
        "kind": "loop",
        "root_url": root_url,
        "progress": os.path.join(tmp, "progress"),
        "log": os.path.join(tmp, "log"),
        "numel": SMALL,
        **kw,
    }


def _log(job: dict[str, Any]) -> str:
    try:
        with open(job["log"]) as f:
            return f.read()[-3000:]
    except FileNotFoundError:
        return ""


def _check_after(server: ForkServer, job: dict[str, Any], tmp: str, **kw: Any) -> dict[str, Any]:
    saving, committed = read_progress(job["progress"])
    return server.check(
        job["root_url"],
        expected=expected_digests(saving, job["numel"]),
        newest=committed or None,
        workdir=tmp,
        storage_options=job.get("storage_options"),
        **kw,
    )


# ---- the checker itself can fail ---------------------------------------------------------
def test_checker_passes_a_good_root_and_names_each_kind_of_damage(root, tmp_path, forkserver):
    with ckptstore.Checkpointer(root, chunk_bytes=64 << 10, codec="none") as ckpt:
        for step in (1, 2):
            ckpt.save(make_state(step, SMALL), step)
    expected = expected_digests(2, SMALL)
    # A brand-new interpreter: the documented entry point.
    report = check_invariants(root, expected=expected, newest=2)
    assert report["listed"] == [1, 2] and report["restored"] == [1, 2]

    def problems(**kw: Any) -> str:
        kw.setdefault("expected", expected)
        report = forkserver.check(root, workdir=str(tmp_path), newest=kw.pop("newest", 2), **kw)
        with pytest.raises(InvariantError) as info:
            raise_on_problems(report)
        return str(info.value)

    # A digest that does not match what was saved.
    wrong = dict(expected)
    wrong[1] = digest_state(make_state(7, SMALL))
    assert "step_00000001: restored state differs" in problems(expected=wrong)
    # A listed step the run never saved.
    assert "never saved step 2" in problems(expected={1: expected[1]}, newest=1)
    # Debris under the root that gc does not remove: a step directory with no manifest.
    os.mkdir(os.path.join(root, "step_00000009"))
    assert "neither checkpoints nor pointers: ['step_00000009']" in problems()
    os.rmdir(os.path.join(root, "step_00000009"))
    # A dangling latest pointer.
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000005\n")
    assert "latest names 'step_00000005'" in problems()
    os.unlink(os.path.join(root, "latest"))
    # A flipped byte in the newest checkpoint's shard: verify and restore both object.
    damage.xor(os.path.join(root, "step_00000002", damage.SHARD), 4096)
    assert "step_00000002: verify: " in problems()
    # The newest good checkpoint gone.
    ckpt_dir = os.path.join(root, "step_00000002")
    os.rename(ckpt_dir, os.path.join(str(tmp_path), "moved"))
    assert "step 2, the newest checkpoint that was good before the fault, is gone" in problems()


def test_assert_surfaced_accepts_only_typed_errors_or_death():
    assert_surfaced(returncode=-signal.SIGKILL)
    assert_surfaced(ckptstore.StorageError("disk on fire"))
    with pytest.raises(AssertionError, match="exited with 0"):
        assert_surfaced(returncode=0)
    with pytest.raises(AssertionError, match="RuntimeError"):
        assert_surfaced(RuntimeError("untyped"))
    with pytest.raises(AssertionError, match="swallowed"):
        assert_surfaced(None)


# ---- named crash points -----------------------------------------------------------------
def test_every_crash_point_in_the_source_is_listed_and_tested():
    used = set()
    for dirpath, _, files in os.walk(os.path.join(REPO, "ckptstore")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name)) as f:
                    used |= set(re.findall(r'crash_point\("([^"]+)"\)', f.read()))
    assert used == set(CRASH_POINTS)
    tested = {case[0] for case in LOCAL_CASES + S3_CASES}
    assert tested == set(CRASH_POINTS)


# (crash point, mode, steps saved before arming, retention KeepLast, last step)
LOCAL_CASES = [
    ("local.commit.before_manifest", "checkpointer", 1, 0, 4),
    ("local.commit.before_rename", "checkpointer", 1, 0, 4),
    ("local.commit.before_root_fsync", "checkpointer", 1, 0, 4),
    ("local.commit.before_manifest", "manager", 2, 2, 5),
    ("local.commit.before_rename", "manager", 2, 2, 5),
    ("local.commit.before_root_fsync", "manager", 2, 2, 5),
    ("local.put_atomic.before_replace", "manager", 1, 2, 4),
    ("local.delete.before_rmtree", "manager", 2, 2, 5),
    # Three checkpoints over KeepLast(1) at start-up: killed between two deletions.
    ("retention.after_delete", "manager", 4, 1, 6),
]
S3_CASES = [
    ("s3.upload.before_complete", "checkpointer", 1, 0, 3),
    ("fsspec.commit.before_manifest", "checkpointer", 1, 0, 3),
    ("fsspec.commit.before_manifest", "manager", 2, 2, 4),
    ("fsspec.delete.after_manifest", "manager", 2, 2, 4),
    ("retention.after_delete", "manager", 3, 1, 4),
]


def _named(server: ForkServer, job: dict[str, Any], tmp: str, before_check: Any = None) -> None:
    pid = server.fork(job)
    code, timed_out = server.wait(pid, CHILD_TIMEOUT_S)
    assert not timed_out, f"the saving process hung:\n{_log(job)}"
    # It died at the crash point (SIGKILL), so the point was reached.
    assert code == -signal.SIGKILL, f"exit {code}, crash point not reached:\n{_log(job)}"
    assert_surfaced(returncode=code)
    _, committed = read_progress(job["progress"])
    assert committed >= job["baseline"], "the baseline saves did not complete"
    if before_check is not None:
        before_check()
    raise_on_problems(_check_after(server, job, tmp))


def _local_kill(server: ForkServer, tmp_path: Any, case: tuple[Any, ...], **kw: Any) -> None:
    """One LOCAL_CASES case (``kw``: the crash point as armed, and more job options)."""
    point, mode, baseline, keep, steps = case
    job = _job(str(tmp_path), str(tmp_path / "root"), mode=mode, baseline=baseline,
               keep=keep, steps=steps, **{"crash_at": point, **kw})  # fmt: skip
    _named(server, job, str(tmp_path))


@pytest.mark.parametrize(("point", "mode", "baseline", "keep", "steps"), LOCAL_CASES)
def test_kill_at_named_point_local(forkserver, tmp_path, point, mode, baseline, keep, steps):
    _local_kill(forkserver, tmp_path, (point, mode, baseline, keep, steps))


@pytest.mark.parametrize(("point", "mode", "baseline", "keep", "steps"), LOCAL_CASES)
def test_kill_at_named_point_local_incremental(
    forkserver, tmp_path, point, mode, baseline, keep, steps
):
    """The same kills with incremental saves (issue 19): the checkpoints share files
    through hard links; no listed one may lose a byte it needs. Killed at the point's
    third passage (the third save after the baseline: one that links, after one that
    linked), but for the deletions at start-up."""
    at_startup = point == "retention.after_delete"
    armed = point if at_startup else f"{point}@3"
    case = (point, mode, baseline, keep, steps)
    _local_kill(forkserver, tmp_path, case, crash_at=armed, incremental=True)
    linked = [
        os.path.join(d, f)
        for d, _, files in os.walk(tmp_path / "root")
        for f in files
        if f.endswith(".distcp") and os.stat(os.path.join(d, f)).st_nlink > 1
    ]
    if not at_startup:
        assert linked, "no checkpoint shares a file: the incremental saves linked nothing"


@pytest.mark.parametrize(("point", "mode", "baseline", "keep", "steps"), S3_CASES)
def test_kill_at_named_point_s3(
    forkserver, s3_server, s3_bucket, tmp_path, point, mode, baseline, keep, steps
):
    job = _job(
        str(tmp_path),
        f"s3://{s3_bucket}/run",
        storage_options=s3_server.options(),
        mode=mode,
        baseline=baseline,
        keep=keep,
        steps=steps,
        crash_at=point,
        numel=MULTIPART if point == "s3.upload.before_complete" else SMALL,
    )

    def upload_left_open() -> None:
        # The kill left an upload open, which the check's gc must abort.
        if point == "s3.upload.before_complete":
            assert [u["Key"] for u in s3_server.open_uploads(s3_bucket)]

    _named(forkserver, job, str(tmp_path), upload_left_open)


def test_crash_point_armed_by_environment_in_a_new_interpreter(root, tmp_path, forkserver):
    """The documented switch: CKPTSTORE_CRASH_AT set before a new interpreter starts."""
    with ckptstore.Checkpointer(root, chunk_bytes=64 << 10) as ckpt:
        ckpt.save(make_state(1, SMALL), 1)
    code = f"""
import sys
sys.path.insert(0, {os.path.join(REPO, "tests")!r})
import ckptstore
from crashrig import make_state
with ckptstore.Checkpointer(sys.argv[1], chunk_bytes=64 << 10) as ckpt:
    ckpt.save(make_state(2, {SMALL}), 2)
print("NOT KILLED")
"""
    env = dict(os.environ, CKPTSTORE_CRASH_AT="local.commit.before_root_fsync")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", code, root],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    # Killed after the rename: step 2 is complete and listed, though its save never
    # returned; both restore bit-exact.
    report = forkserver.check(
        root, expected=expected_digests(2, SMALL), newest=1, workdir=str(tmp_path)
    )
    assert report["listed"] == [1, 2] and not report["problems"], report


# ---- random kills -------------------------------------------------------------------------
def _random_trials(
    server: ForkServer,
    tmp_root: str,
    trials: int,
    seed0: int,
    s3: dict[str, Any] | None = None,
    chain: int = 2,
) -> dict[str, Any]:
    """``trials`` saving processes, each killed at a moment drawn from its seed.

    Trials come in chains of ``chain`` on one root: each process after the first
    resumes after the newest checkpoint there, among the previous one's leftovers (a
    run restarted after a crash). Every kill is checked; gc only at a chain's end.
    """
    counts: dict[str, Any] = {
        "trials": 0,
        "kills": 0,
        "finished_before_kill": 0,
        "left_debris": 0,
        "left_open_upload": 0,
        "failures": [],
        "hangs": 0,
    }
    job: dict[str, Any] = {}
    debris: set[str] = set()
    for seed in range(seed0, seed0 + trials):
        rng = random.Random(seed)
        link = (seed - seed0) % chain
        manager = (seed - seed0) // chain % 2 == 1
        tmp = os.path.join(tmp_root, f"chain{(seed - seed0) // chain}")
        kw: dict[str, Any] = {
            "mode": "manager" if manager else "checkpointer",
            "keep": 2 if manager else 0,
            "inflight": 1 if manager else 2,
            "codec": rng.choice(["none", "zstd"]),
            "incremental": rng.random() < 0.5,  # object stores: full saves anyway
            "baseline": 0,
            "steps": 400,
            "resume": True,
        }
        if link == 0:
            debris = set()
            if s3 is not None:
                bucket = s3["server"].new_bucket()
                job = _job(tmp, f"s3://{bucket}/run", storage_options=s3["server"].options())
                if manager and (seed - seed0) // chain % 4 == 3:
                    # Killed mid-multipart upload, often. With retention: few to verify.
                    job["numel"] = MULTIPART
            else:
                job = _job(tmp, os.path.join(tmp, "root"))
        job.update(kw)
        # Local disk: the window opens after this process committed 0-3 checkpoints and
        # spans a few saves. S3 saves take longer and vary more: the window opens when a
        # chosen save starts and spans about one save.
        progress = read_progress(job["progress"])
        if s3 is None:
            wait_for, index = progress[1] + rng.randint(0, 3), 1
            delay = rng.uniform(0.0, 0.25)
        else:
            wait_for, index = progress[0] + rng.randint(1, 3), 0
            delay = rng.uniform(0.0, 0.3 if job["numel"] == MULTIPART else 0.1)
        pid = server.fork(job)
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while read_progress(job["progress"])[index] < wait_for and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        code, timed_out = server.wait(pid, CHILD_TIMEOUT_S)
        counts["trials"] += 1
        counts["hangs"] += timed_out
        if code == -signal.SIGKILL:
            counts["kills"] += 1
        else:
            counts["finished_before_kill"] += 1
            if code != 0:
                counts["failures"].append(f"seed {seed}: exit {code}: {_log(job)}")
        last = link == chain - 1 or seed == seed0 + trials - 1
        report = _check_after(server, job, tmp, gc=last)
        # What this kill left behind (earlier links' leftovers stay until gc).
        new_debris = set(report.get("temp_before_gc", [])) - debris
        debris |= new_debris
        counts["left_debris"] += bool(new_debris)
        new_uploads = set(report.get("open_uploads_before_gc", [])) - debris
        debris |= new_uploads
        counts["left_open_upload"] += bool(new_uploads)
        if report["problems"]:
            counts["failures"].append(
                f"seed {seed} ({kw['mode']}, {kw['codec']}, incremental {kw['incremental']}, "
                f"chain link {link}): "
                f"{report['problems']}"
            )
    return counts


def _report(name: str, counts: dict[str, Any]) -> None:
    line = {k: (len(v) if isinstance(v, list) else v) for k, v in counts.items()}
    print(f"\n{name}: {json.dumps(line)}")
    out = os.environ.get("CKPTSTORE_STRESS_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"test": name, **line, "failure_details": counts["failures"]}))
            f.write("\n")


def _assert_clean(counts: dict[str, Any]) -> None:
    assert not counts["failures"], "\n".join(counts["failures"][:5])
    assert counts["hangs"] == 0
    assert counts["kills"] >= counts["trials"] // 2, counts  # most trials were real kills


def test_random_kills_local(forkserver, tmp_path):
    counts = _random_trials(forkserver, str(tmp_path), trials=16, seed0=0)
    _report("random kills, local", counts)
    _assert_clean(counts)


def test_random_kills_s3(forkserver, s3_server, tmp_path):
    counts = _random_trials(forkserver, str(tmp_path), trials=3, seed0=0, s3={"server": s3_server})
    _report("random kills, s3", counts)
    _assert_clean(counts)


@pytest.mark.slow
def test_random_kills_local_stress(forkserver, tmp_path):
    trials = int(os.environ.get("CKPTSTORE_CRASH_TRIALS", "300"))
    counts = _random_trials(forkserver, str(tmp_path), trials=trials, seed0=1000, chain=3)
    _report("random kills, local (stress)", counts)
    _assert_clean(counts)


@pytest.mark.slow
def test_random_kills_s3_stress(forkserver, s3_server, tmp_path):
    trials = int(os.environ.get("CKPTSTORE_CRASH_TRIALS_S3", "60"))
    counts = _random_trials(
        forkserver, str(tmp_path), trials=trials, seed0=1000, s3={"server": s3_server}
    )
    _report("random kills, s3 (stress)", counts)
    _assert_clean(counts)


def test_make_state_differs_per_step():
    a, b = make_state(1, 1000), make_state(2, 1000)
    assert digest_state(a) != digest_state(b)
    assert digest_state(a) == digest_state(make_state(1, 1000))
    assert isinstance(a["model"]["w"], torch.Tensor)
