"""Hostile files under a root: what is not a regular file of a sane size is refused, and
``ls``, ``verify`` and restore agree on what a checkpoint is.

* A FIFO named ``latest``, ``manifest.json``, ``.metadata`` or a shard used to block
  ``open()`` forever; a directory in a shard's place stopped a resume with "Is a
  directory" instead of restoring the checkpoint before; a 16 GiB sparse ``latest`` or ``manifest.json`` used to be read
  whole (a ``MemoryError``, or 16 GiB of memory). Each case runs ``ckptstore ls``,
  ``ckptstore verify`` and a ``CheckpointManager.restore`` in a child process with a
  timeout and a cap on its address space, so a regression fails instead of hanging or
  eating the machine's memory.
* A step directory whose manifest names another step (a symlink to another checkpoint,
  a copy at ``step_99999999``) is not a checkpoint for any of the three.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import REPO

import ckptstore
from ckptstore.cli import main
from ckptstore.layout import LATEST_FILE, MANIFEST_FILE, METADATA_FILE, read_limit_bytes
from ckptstore.storage.local import LocalBackend

GIB = 1 << 30


def make_state() -> dict[str, Any]:
    return {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3)}


def save_steps(root: str, *steps: int) -> None:
    """Checkpoints ``step_<n>`` for each ``n`` (the manager names a save by steps done)."""
    with ckptstore.CheckpointManager(root) as mgr:
        for n in steps:
            mgr.save(n - 1, make_state())
        mgr.wait()


# The child: ls, verify and restore, each reported; its address space capped at what it
# has plus 4 GiB, so a regression that reads a 16 GiB file fails fast instead of paging.
CHILD = """
    import json, os, resource, sys
    import torch
    import ckptstore
    from ckptstore.cli import main

    root = sys.argv[1]
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 30), hard))
    out = {"ls": main(["ls", root, "--all"]), "verify": main(["verify", root, "--jobs", "1"])}
    state = {"w": torch.zeros(1000), "b": torch.zeros(3)}
    with ckptstore.CheckpointManager(root) as mgr:
        out["restored"] = mgr.restore(state)
    out["w_ok"] = bool(torch.equal(state["w"], torch.arange(1000, dtype=torch.float32)))
    print("RESULT " + json.dumps(out))
"""


def run_child(root: str, timeout: float = 120) -> tuple[dict[str, Any], str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), root],
        capture_output=True,
        text=True,
        timeout=timeout,  # a FIFO opened blocking: TimeoutExpired, a failure, not a hang
        env=env,
        cwd=REPO,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :]), output


def plant_fifo(path: str) -> None:
    os.unlink(path)
    os.mkfifo(path)


def plant_directory(path: str) -> None:
    os.unlink(path)
    os.mkdir(path)


def plant_sparse(path: str) -> None:
    os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(16 * GIB)  # no blocks allocated: costs nothing on disk


HOSTILE = {
    # (what is replaced, how) -> (verify's exit status, steps restored)
    ("latest", "fifo"): (0, 20),
    ("latest", "sparse"): (0, 20),
    ("manifest", "fifo"): (1, 10),
    ("manifest", "sparse"): (1, 10),
    ("metadata", "fifo"): (1, 10),
    ("shard", "fifo"): (1, 10),
    ("latest", "directory"): (0, 20),
    ("manifest", "directory"): (1, 10),
    ("metadata", "directory"): (1, 10),
    ("shard", "directory"): (1, 10),
}
PLANT = {"fifo": plant_fifo, "sparse": plant_sparse, "directory": plant_directory}


@pytest.mark.parametrize(("what", "how"), list(HOSTILE))
def test_fifos_and_huge_sparse_files_are_refused_promptly(root, what, how):
    save_steps(root, 10, 20)
    newest = os.path.join(root, "step_00000020")
    path = {
        "latest": os.path.join(root, LATEST_FILE),
        "manifest": os.path.join(newest, MANIFEST_FILE),
        "metadata": os.path.join(newest, METADATA_FILE),
        "shard": os.path.join(newest, "__0_0.distcp"),
    }[what]
    assert os.path.isfile(path)
    PLANT[how](path)

    out, text = run_child(root)

    verify_code, restored = HOSTILE[(what, how)]
    assert out["ls"] == 0, text
    assert out["verify"] == verify_code, text
    assert out["restored"] == restored, text
    assert out["w_ok"], text
    assert "MemoryError" not in text
    if verify_code:
        assert "BAD  step_00000020" in text
        assert "OK   step_00000010" in text
    if what == "manifest":
        assert "more than the" in text if how == "sparse" else "not a regular file" in text


def _promptly(call: Callable[[], Any], unblock: str | None = None) -> BaseException | None:
    """What ``call`` raised (None: nothing), failing the test if it takes over 20 s; a
    reader stuck opening the FIFO ``unblock`` is released by opening its write end."""
    result: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive() and unblock is not None:
        fd = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK)  # lets the blocked open return
        os.close(fd)
        thread.join(20)
    assert result, "blocked"
    return result[0]


@pytest.mark.parametrize("name", [LATEST_FILE, f"step_00000001/{MANIFEST_FILE}"])
def test_the_local_backend_refuses_a_fifo_as_corrupt(tmp_path, name):
    backend = LocalBackend(str(tmp_path))
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    os.mkfifo(path)
    for call in (lambda: backend.read_bytes(name), lambda: backend.open_reader(name)):
        exc = _promptly(call, unblock=str(path))
        assert isinstance(exc, ckptstore.CorruptCheckpointError), exc
        assert "FIFO" in str(exc)


@pytest.mark.parametrize("name", [LATEST_FILE, f"step_00000001/{MANIFEST_FILE}"])
def test_the_local_backend_refuses_a_directory_in_a_files_place_as_corrupt(tmp_path, name):
    backend = LocalBackend(str(tmp_path))
    (tmp_path / name).mkdir(parents=True)
    for call in (lambda: backend.read_bytes(name), lambda: backend.open_reader(name)):
        with pytest.raises(ckptstore.CorruptCheckpointError, match="a directory, not a regular"):
            call()


def test_the_local_backend_caps_what_it_reads_whole_by_kind(tmp_path):
    backend = LocalBackend(str(tmp_path))
    limit = read_limit_bytes(LATEST_FILE)
    (tmp_path / LATEST_FILE).write_bytes(b"x" * limit)
    assert len(backend.read_bytes(LATEST_FILE)) == limit  # the cap itself is allowed
    (tmp_path / LATEST_FILE).write_bytes(b"x" * (limit + 1))
    with pytest.raises(ckptstore.CorruptCheckpointError, match="more than the"):
        backend.read_bytes(LATEST_FILE)
    assert read_limit_bytes(f"step_00000001/{MANIFEST_FILE}") < 16 * GIB
    assert read_limit_bytes(f"step_00000001/{METADATA_FILE}") < 16 * GIB


def _ls_verify(root: str, capsys: pytest.CaptureFixture[str]) -> tuple[Any, Any]:
    assert main(["ls", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    code = main(["verify", root, "--json"])
    verified = json.loads(capsys.readouterr().out)
    return listed, (code, verified)


def _names(listed: Any) -> list[str]:
    rows = listed["checkpoints"] if isinstance(listed, dict) else listed
    return [row["name"] for row in rows]


@pytest.mark.parametrize("how", ["symlink", "copy"])
def test_ls_verify_and_restore_agree_on_a_step_that_is_not_its_manifests(root, capsys, how):
    save_steps(root, 10, 30)
    alias = "step_00000040" if how == "symlink" else "step_99999999"
    if how == "symlink":
        os.symlink("step_00000030", os.path.join(root, alias))
    else:
        shutil.copytree(os.path.join(root, "step_00000030"), os.path.join(root, alias))

    listed, (code, verified) = _ls_verify(root, capsys)

    assert alias not in _names(listed)
    assert _names(listed) == ["step_00000010", "step_00000030"]
    by_name = {c["name"]: c for c in verified["checkpoints"]}
    assert by_name["step_00000010"]["ok"]
    assert by_name["step_00000030"]["ok"]
    assert not by_name[alias]["ok"], verified  # listed as a problem, not silently passed
    assert "not a checkpoint" in " ".join(by_name[alias]["problems"])
    assert "step 30" in " ".join(by_name[alias]["problems"])
    assert code == 1
    with ckptstore.CheckpointManager(root) as mgr:
        assert mgr.restore(make_state()) == 30
        assert [c.step for c in mgr.list()] == [10, 30]


def test_a_file_or_a_lost_manifest_in_a_checkpoints_place_is_damage_to_verify(root, capsys):
    """A regular file named ``step_N``, and a step directory without its manifest, are
    damaged checkpoints: ``verify`` said "deleted while it was being checked, not
    counted" of both (they are still there), and with no other checkpoint, "every one
    was deleted", exit 0."""
    save_steps(root, 10, 20, 30)
    shutil.rmtree(os.path.join(root, "step_00000010"))
    with open(os.path.join(root, "step_00000010"), "w") as f:
        f.write("not a checkpoint")
    os.remove(os.path.join(root, "step_00000020", MANIFEST_FILE))

    code = main(["verify", root, "--json"])
    verified = json.loads(capsys.readouterr().out)

    assert code == 1, verified
    by_name = {c["name"]: c for c in verified["checkpoints"]}
    assert sorted(by_name) == ["step_00000010", "step_00000020", "step_00000030"], verified
    assert by_name["step_00000030"]["ok"]
    assert not by_name["step_00000010"]["ok"] and not by_name["step_00000020"]["ok"]
    said = " ".join(by_name["step_00000010"]["problems"])
    assert "a file where ckptstore makes a directory" in said, said
    assert not any("deleted" in n for n in verified["notes"]), verified["notes"]
    with ckptstore.CheckpointManager(root) as mgr:
        assert mgr.restore(make_state()) == 30


def test_the_local_backend_calls_a_file_in_a_directorys_place_corrupt(tmp_path):
    """ENOTDIR under a checkpoint: damage (naming the file), not an unreachable store."""
    backend = LocalBackend(str(tmp_path))
    (tmp_path / "step_00000001").write_text("a file")
    for call in (
        lambda: backend.read_bytes(f"step_00000001/{MANIFEST_FILE}"),
        lambda: backend.open_reader(f"step_00000001/{MANIFEST_FILE}"),
    ):
        with pytest.raises(ckptstore.CorruptCheckpointError, match="step_00000001: a file where"):
            call()
