"""Issue 14, items 4 and 7: resuming an older checkpoint, starting over in a used root,
and run lineage.

Resuming step 10 of a root holding 10, 20 and 30 (or starting afresh there) would save
over the newer checkpoints. ``restore(newer="refuse")`` (the training command without
``--discard-newer``) says so before anything changes; ``newer="discard"`` (with the
flag) moves them aside as ``step_N.retired-<UTC>``, byte for byte, in both tiers, and the
run goes on as a new branch whose manifests name the run it left. Retention and
``latest`` consider only the current run's lineage: another run's checkpoints in the
same root or backup are neither deleted by this run's retention nor resumed instead of
its own.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, assert_same, train
from helpers import train_state as make_state

from ckptstore import Checkpointer, CheckpointManager, KeepLast, SaveEvery
from ckptstore.engine.ops import list_checkpoints, load_into, read_manifest, verify
from ckptstore.errors import CheckpointExistsError, CheckpointNotFoundError, NewerCheckpointsError
from ckptstore.layout import checkpoint_name, set_aside_kind
from ckptstore.storage import open_backend


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != ".writer-lease":
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def retired(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if set_aside_kind(n) == "retired")


def steps(root) -> list[int]:
    return [i.manifest.step or 0 for i in list_checkpoints(open_backend(root))]


@pytest.fixture
def root_10_20_30(tmp_path) -> Path:
    root = tmp_path / "run"
    with CheckpointManager(root, save=SaveEvery(steps=10)) as mgr:
        train(mgr, make_state(), 30)
    assert steps(root) == [10, 20, 30]
    return root


# ---- the API -------------------------------------------------------------------------
def test_refuse_raises_before_changing_anything(root_10_20_30):
    before = tree(root_10_20_30)
    for which in (10, "none"):
        with (
            CheckpointManager(root_10_20_30, save=SaveEvery(steps=10)) as mgr,
            pytest.raises(NewerCheckpointsError) as err,
        ):
            mgr.restore(make_state(seed=1), which, newer="refuse")
        assert isinstance(err.value, CheckpointExistsError)
        expected = ["step_00000020", "step_00000030"]
        assert err.value.names == (expected if which == 10 else ["step_00000010", *expected])
        assert "newer='discard'" in str(err.value)
    assert tree(root_10_20_30) == before


def test_discard_moves_the_newer_ones_aside_whole_and_starts_a_branch(root_10_20_30):
    root = root_10_20_30
    backend = open_backend(root)
    old = {s: read_manifest(backend, checkpoint_name(s)) for s in (10, 20, 30)}
    run_a = old[10].run_id
    assert run_a is not None
    state = make_state(seed=1)
    with CheckpointManager(root, save=SaveEvery(steps=10), keep=KeepLast(2)) as mgr:
        assert mgr.restore(state, 10, newer="discard") == 10
        assert steps(root) == [10]
        aside = retired(root)
        assert [n.split(".")[0] for n in aside] == ["step_00000020", "step_00000030"]
        for name in aside:  # moved whole: the same manifest, and every byte verifies
            assert read_manifest(backend, name) == old[int(name[5:13])]
            assert verify(backend, name, None) == []
        train(mgr, state, 30, start=10)
    new = read_manifest(backend, checkpoint_name(40))
    assert new.run_id not in (None, run_a)
    assert new.lineage == (run_a,)
    # Retention (keep the last 2) counted the lineage: step 10 of run A went, the
    # retired branch was left alone.
    assert steps(root) == [30, 40]
    assert retired(root) == aside


def test_a_resumed_branch_keeps_its_id_and_lineage(root_10_20_30):
    with CheckpointManager(root_10_20_30, save=SaveEvery(steps=10)) as mgr:
        state = make_state(seed=1)
        mgr.restore(state, 20, newer="discard")
        train(mgr, state, 10, start=20)
    branch = read_manifest(open_backend(root_10_20_30), checkpoint_name(30))
    with CheckpointManager(root_10_20_30, save=SaveEvery(steps=10)) as mgr:
        state = make_state(seed=2)
        assert mgr.restore(state, newer="refuse") == 30
        train(mgr, state, 10, start=30)
    again = read_manifest(open_backend(root_10_20_30), checkpoint_name(40))
    assert (again.run_id, again.lineage) == (branch.run_id, branch.lineage)


def test_retention_never_deletes_another_runs_checkpoints(tmp_path):
    """Another run's checkpoints at higher steps in the root: this run's retention
    neither deletes them nor lets them push this run's own out."""
    root = tmp_path / "shared"
    with Checkpointer(root) as ckpt:
        for step in (100, 110):
            ckpt.save_async(make_state(seed=5).state_dict(), step, run_id="other-run").wait()
    state = make_state()
    with CheckpointManager(root, save=SaveEvery(steps=10), keep=KeepLast(1)) as mgr:
        assert mgr.restore(state, "none") == 0  # newer="keep": warned, not refused
        train(mgr, state, 30)
    assert steps(root) == [30, 100, 110]


def test_latest_does_not_take_another_runs_checkpoint_from_the_backup(tmp_path):
    """The local root holds this run's 10 and 20; the backup prefix, shared by mistake,
    another run's 40: resuming takes 20 (and, refusing, says what is on the backup)."""
    remote = tmp_path / "backup"
    with Checkpointer(remote) as ckpt:
        ckpt.save_async(make_state(seed=5).state_dict(), 40, run_id="other-run").wait()
    local = tmp_path / "local"
    mine = make_state()
    with CheckpointManager(local, save=SaveEvery(steps=10)) as mgr:
        train(mgr, mine, 20)
    opts = {"save": SaveEvery(steps=10), "backup": str(remote)}
    with CheckpointManager(local, **opts) as mgr:
        state = make_state(seed=1)
        assert mgr.restore(state) == 20
    assert_same(state.model.state_dict(), mine.model.state_dict())
    with (
        CheckpointManager(local, **opts) as mgr,
        pytest.raises(NewerCheckpointsError, match="other-run"),
    ):
        mgr.restore(make_state(seed=1), newer="refuse")
    # Left alone on the backup (which meanwhile caught up with this run's 10 and 20).
    assert read_manifest(open_backend(remote), checkpoint_name(40)).run_id == "other-run"


def test_a_refusal_says_which_newer_checkpoint_on_the_backup_is_damaged(tmp_path):
    """Step 30 damaged locally and on the backup: the restore falls back to 20 and
    refuses to train on over the backup's 30, saying that 30 is damaged there too (it
    named 30 as a newer checkpoint only, as if training on would lose good work)."""
    local, remote = tmp_path / "local", tmp_path / "backup"
    opts = {"save": SaveEvery(steps=10), "backup": str(remote)}
    with CheckpointManager(local, **opts) as mgr:
        train(mgr, make_state(), 30)
    for root in (local, remote):
        shard = sorted((root / checkpoint_name(30)).glob("*.distcp"))[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    with (
        CheckpointManager(local, **opts) as mgr,
        pytest.raises(NewerCheckpointsError) as err,
    ):
        mgr.restore(make_state(seed=1), newer="refuse")
    assert err.value.names == [checkpoint_name(30)]
    assert f"of which {checkpoint_name(30)} failed its checksums" in err.value.what, err.value
    assert "damaged there too" in err.value.what


# ---- the training command --------------------------------------------------------------
TINY = ["--size", "tiny", "--device", "cpu", "--batch-size", "4", "--eval-every", "0"]


def train_cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "ckptstore.train", *TINY, "--save-every", "10"]
    return subprocess.run(
        [*cmd, "--keep-last", "0", "--ckpt-dir", str(root), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )


def test_train_resume_older_stops_before_training_then_discard_newer_goes_on(tmp_path):
    root = tmp_path / "r"
    assert train_cli(root, "--steps", "30").returncode == 0
    before = tree(root)
    refused = train_cli(root, "--steps", "40", "--resume", "10")
    assert refused.returncode == 1, refused.stderr
    assert "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert "--discard-newer" in line and "step_00000020..step_00000030" in line
    assert "step 11" not in refused.stdout  # not a step trained
    assert "resumed from" not in refused.stderr  # (it said so before the refusal)
    assert tree(root) == before
    done = train_cli(root, "--steps", "40", "--resume", "10", "--discard-newer")
    assert done.returncode == 0, done.stderr
    assert steps(root) == [10, 20, 30, 40]
    assert [n.split(".")[0] for n in retired(root)] == ["step_00000020", "step_00000030"]
    listing = subprocess.run(
        [sys.executable, "-m", "ckptstore", "ls", str(root), "--all"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
        check=True,
    ).stdout
    assert listing.count("RETIRED") == 2
    # The branch's step 30 did not end a run (the retired step 30 did): not "final".
    with CheckpointManager(root) as mgr:
        tags = {c.step: c.tags for c in mgr.list()}
    assert "final" not in tags[30] and "final" in tags[40]
    # Rerunning the same command now just resumes the branch's newest.
    again = train_cli(root, "--steps", "40", "--resume", "latest")
    assert again.returncode == 0 and "from step 40" in again.stdout


def test_train_resume_none_in_a_used_root(tmp_path):
    root = tmp_path / "r"
    assert train_cli(root, "--steps", "20").returncode == 0
    before = tree(root)
    refused = train_cli(root, "--steps", "20", "--resume", "none")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "there are checkpoints already" in refused.stderr
    assert "another --ckpt-dir" in refused.stderr and "--discard-newer" in refused.stderr
    assert tree(root) == before
    fresh = train_cli(root, "--steps", "20", "--resume", "none", "--discard-newer", "--seed", "1")
    assert fresh.returncode == 0, fresh.stderr
    assert len(retired(root)) == 2 and steps(root) == [10, 20]
    new = read_manifest(open_backend(root), checkpoint_name(20))
    old = read_manifest(open_backend(root), retired(root)[-1])
    assert new.run_id != old.run_id and new.lineage == ()


def test_a_reader_that_loses_the_race_with_retention_is_told_so(root_10_20_30):
    """An evaluation job loads step 10 while the writer's retention deletes it: the
    reader hears "retired while loading", not "shard file is missing" (damage)."""
    backend = open_backend(root_10_20_30)
    original = backend.open_reader

    def retired_meanwhile(path: str):  # the writer deletes step 10 just before
        backend.delete(checkpoint_name(10))
        return original(path)

    backend.open_reader = retired_meanwhile  # type: ignore[method-assign]
    target = make_state(seed=3).state_dict()
    with pytest.raises(CheckpointNotFoundError, match="retired while loading"):
        load_into(target, backend, checkpoint_name(10), pool=None, group=None)
