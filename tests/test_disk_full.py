"""Disk full on real, size-limited tmpfs mounts: in a shard, at DCP's metadata, at the
manifest, at the rename / root fsync, and under CheckpointManager retention.

The scenarios run in one child process inside a user and mount namespace
(``unshare -rm``), where mounting a tmpfs needs no privileges (``disk_full_child.py``
does the saving; a fresh interpreter in the same namespace then checks every root with
``invariants.check_here``). Each tmpfs is resized (``mount -o remount,size=``) so the
next save runs out of space at the chosen file. The rename and the root's fsync need no
space on tmpfs (a save that fits to the last page commits), so ENOSPC is injected at
those two OS calls too. After each: a ``StorageFullError`` (errno 28, an ``OSError``)
naming the file and saying what to do, the older checkpoints listed and intact, no temp
left, and the next save succeeds once space is freed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
from helpers import REPO

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="tmpfs and user namespaces are Linux"
)

SCENARIOS = ["shard", "metadata", "manifest", "commit", "manager"]
HINT = "free space on that file system (or keep fewer checkpoints"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a user namespace here: {probe.stderr.decode().strip()}")
    base = tmp_path_factory.mktemp("mnt")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = os.path.join(REPO, "tests", "disk_full_child.py")
    # A session of its own: on a timeout the child and its checker go together.
    proc = subprocess.Popen(
        ["unshare", "-rm", sys.executable, child, str(base), *SCENARIOS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the disk-full scenarios hung for 300 s")
    lines = stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, stdout[-3000:] + stderr[-3000:]
    out: dict[str, Any] = json.loads(lines[-1])
    # The mounts lived in the child's namespace only: nothing is left mounted here.
    assert not os.listdir(os.path.join(base, "shard")), "the tmpfs leaked out of the namespace"
    return out


def scenario(report: dict[str, Any], name: str) -> dict[str, Any]:
    facts: dict[str, Any] = report[name]
    assert "crashed" not in facts, facts.get("crashed")
    problems = report["invariants"].get(facts["root"])
    assert problems == [], f"invariants after {name}: {problems}"
    return facts


def check_full_error(err: dict[str, Any], file: str) -> None:
    assert err["type"] == "StorageFullError" and err["errno"] == 28, err
    assert err["is_oserror"]
    assert err["file"] == file, f"ran out of space in {err['file']}, meant {file}"
    assert "No space left on device" in err["message"] or "ENOSPC" in err["message"]
    assert HINT in err["message"], err["message"]


@pytest.mark.parametrize(
    ("name", "file"),
    [("shard", "__0_0.distcp"), ("metadata", ".metadata"), ("manifest", "manifest.json")],
)
def test_running_out_of_space_in_a_file_of_the_checkpoint(report, name, file):
    facts = scenario(report, name)
    assert facts["sizes"]["__0_0.distcp"] > 4_000_000
    check_full_error(facts["error"], file)
    assert facts["listed_after_error"] == [1]
    assert facts["temps_after_error"] == []
    assert facts["verify_1"] == []
    # shard: space freed by deleting step 1; the others: the file system grown back.
    assert facts["listed_at_end"] == ([3] if name == "shard" else [1, 2])


def test_running_out_of_space_at_the_rename_or_the_root_fsync(report):
    facts = scenario(report, "commit")
    assert facts["free_after_exact_fit"] == 0, "the exact-fit save did not fill the disk"
    for label in ("renameat2(<tmp>)", "fsync(<root>)"):
        err = facts[label]
        assert err["fired"] == [label], err
        check_full_error(err, "step_00000002")
        assert err["listed"] == [1], f"{label}: a failed save is listed"
        assert err["temps"] == []
    assert facts["listed_at_end"] == [1, 2]


def test_retention_on_a_full_disk_says_to_keep_fewer(report):
    """KeepLast(2) on room for 2.5 checkpoints: the third save fails (pruning follows a
    commit), the two kept ones survive, and after `ckptstore prune --keep-last 1 --yes`
    (what the message says) the next save fits."""
    facts = scenario(report, "manager")
    err = facts.get("error")
    assert err is not None, f"the third save did not run out of space: {facts}"
    assert err["type"] == "StorageFullError" and err["errno"] == 28, err
    assert "more than you keep" in err["message"], err["message"]
    assert "step 3" in err["outer"], err["outer"]
    assert facts["listed_after_error"] == [1, 2]
    assert facts["temps_after_error"] == []
    assert facts["prune_status"] == 0
    assert facts["listed_at_end"] == [4]
