"""Issue 14, data loss: a damaged or reused root never costs a checkpoint that verified.

- Retention never leaves a root without a checkpoint that verifies: a damaged newest
  checkpoint does not count as the one that protects the run (library, command line).
- Nothing is deleted before the run has restored and committed its own first save.
- A damaged newest checkpoint (or a stray entry at its name) is moved aside as
  ``step_N.damaged-<time>`` when a run restores past it, so rerunning the same training
  command just works; ``ckptstore quarantine`` does it by hand; ``ls --all`` shows it.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import damage
import pytest
import torch
from helpers import REPO

import ckptstore
from ckptstore.layout import FINALS_FILE, is_damaged_name
from ckptstore.manager import pointer


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptstore", *map(str, args)],
        capture_output=True, text=True, timeout=180, env=env(), cwd=REPO,
    )  # fmt: skip


def state(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64, 64), v), "b": torch.arange(100, dtype=torch.int64) + int(v)}


def blank() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(64, 64), "b": torch.zeros(100, dtype=torch.int64)}


def make_root(root, steps=(20, 25, 30)) -> None:
    """Committed checkpoints at ``steps`` (steps done), each holding its own step's values."""
    with ckptstore.CheckpointManager(root, codec="none") as mgr:
        for s in steps:
            mgr.save(s - 1, state(float(s)))
        mgr.wait()


def step_dir(root, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def rot(root, step: int) -> None:
    """Flip bytes in the middle of the checkpoint's shard (its data, not padding)."""
    shard = os.path.join(step_dir(root, step), damage.SHARD)
    damage.xor(shard, os.path.getsize(shard) // 3, length=64)


def mark_final(root, step: int) -> None:
    """Record ``step`` as the one that ended a completed run, as the training loop does."""
    with ckptstore.Checkpointer(root) as ckpt:
        pointer.record_final(ckpt.backend, f"step_{step:08d}")
    assert finals(root) == [f"step_{step:08d}"]


def finals(root) -> list[str]:
    with ckptstore.Checkpointer(root) as ckpt:
        return pointer.read_lines(ckpt.backend, FINALS_FILE)


def names(root) -> list[str]:
    return sorted(os.listdir(root))


def steps_listed(root) -> list[int]:
    with ckptstore.Checkpointer(root) as ckpt:
        return [i.step for i in ckpt.list()]


def test_retention_keeps_the_newest_checkpoint_that_verifies(tmp_path):
    root = tmp_path / "r"
    make_root(root)
    rot(root, 30)
    mgr = ckptstore.CheckpointManager(root, keep=ckptstore.KeepLast(1), codec="none")
    try:
        # Constructing the manager deletes nothing (it used to prune 20 and 25 here).
        assert steps_listed(root) == [20, 25, 30]
        sd = blank()
        assert mgr.restore(sd) == 25  # the rotted 30 is skipped ...
        assert torch.equal(sd["w"], state(25.0)["w"])
        aside = [n for n in names(root) if is_damaged_name(n)]
        assert len(aside) == 1 and aside[0].startswith("step_00000030.damaged-")  # ... set aside
        mgr.save(29, state(30.5))  # the run saves step 30 again, and retention runs
        mgr.wait()
    finally:
        mgr.close()
    assert steps_listed(root) == [30]
    with ckptstore.Checkpointer(root) as ckpt:
        assert ckpt.verify(30) == []
    assert any(is_damaged_name(n) for n in names(root)), "damaged ones are never deleted"


def test_prune_never_deletes_the_newest_checkpoint_that_verifies(tmp_path):
    root = tmp_path / "r"
    make_root(root)
    rot(root, 30)
    plan = cli("prune", root, "--keep-last", "1")
    assert plan.returncode == 0, plan.stderr
    assert "newest that verifies" in plan.stdout
    done = cli("prune", root, "--keep-last", "1", "--yes")
    assert done.returncode == 0, done.stderr
    assert steps_listed(root) == [25, 30]  # it used to delete 25, leaving only the rotted 30
    sd = blank()
    with ckptstore.CheckpointManager(root, enabled=False) as mgr:
        assert mgr.restore(sd) == 25


def test_prune_refuses_when_nothing_verifies(tmp_path):
    root = tmp_path / "r"
    make_root(root, steps=(20, 25))
    rot(root, 20)
    rot(root, 25)
    done = cli("prune", root, "--keep-last", "1", "--yes")
    assert done.returncode == 1
    assert "no checkpoint" in done.stderr and "verifies" in done.stderr
    assert steps_listed(root) == [20, 25]


def test_nothing_is_deleted_before_the_run_restores(tmp_path):
    """--resume 20 --keep-last 1 on a root holding 20, 25, 30 kept 20 until now? No: the
    manager's start-up retention deleted it before restore could load it."""
    root = tmp_path / "r"
    make_root(root)
    with ckptstore.CheckpointManager(root, keep=ckptstore.KeepLast(1)) as mgr:
        sd = blank()
        assert mgr.restore(sd, 20, newer="discard") == 20
        assert torch.equal(sd["w"], state(20.0)["w"])


DAMAGE = {
    "flipped shard": lambda d: damage.xor(
        os.path.join(d, damage.SHARD),
        os.path.getsize(os.path.join(d, damage.SHARD)) // 3,
        length=64,
    ),
    "truncated shard": lambda d: damage.truncate(os.path.join(d, damage.SHARD), 1000),
    # a link to the same file of the checkpoint before (another checkpoint's bytes)
    "shard replaced by a symlink": lambda d: _link_to_previous(d, damage.SHARD),
    "metadata replaced by a symlink": lambda d: _link_to_previous(d, ".metadata"),
    "edited world_size": lambda d: _edit_manifest(d, b'"world_size": 1', b'"world_size": 2'),
    "edited step": lambda d: _edit_manifest(d, b'"step": 30', b'"step": 31'),
    "deleted manifest": lambda d: os.remove(os.path.join(d, damage.MANIFEST)),
}


def _link_to_previous(d: str, name: str) -> None:
    os.remove(os.path.join(d, name))
    os.symlink(os.path.join("..", "step_00000025", name), os.path.join(d, name))


def _edit_manifest(d: str, old: bytes, new: bytes) -> None:
    path = os.path.join(d, damage.MANIFEST)
    with open(path, "rb") as f:
        data = f.read()
    assert old in data, data
    with open(path, "wb") as f:
        f.write(data.replace(old, new))


def _stray_file(root) -> None:
    import shutil

    shutil.rmtree(step_dir(root, 30))
    with open(step_dir(root, 30), "w") as f:
        f.write("not a checkpoint\n")


@pytest.mark.parametrize("kind", [*DAMAGE, "stray file at its name"])
def test_a_run_restores_past_a_damaged_newest_checkpoint_and_saves_that_step_again(tmp_path, kind):
    root = tmp_path / "r"
    make_root(root)
    mark_final(root, 30)
    if kind == "stray file at its name":
        _stray_file(root)
    else:
        DAMAGE[kind](step_dir(root, 30))
    for attempt in range(2):  # rerunning the same thing works every time
        with ckptstore.CheckpointManager(root, keep=ckptstore.KeepLast(2), codec="none") as mgr:
            sd = blank()
            assert mgr.restore(sd) == (25 if attempt == 0 else 30), kind
            if attempt == 0:
                mgr.save(29, state(30.0))  # used to fail: "already exists ... newer='discard'"
                mgr.wait()
    assert steps_listed(root) == [25, 30]
    aside = [n for n in names(root) if is_damaged_name(n)]
    assert len(aside) == 1, names(root)
    with ckptstore.CheckpointManager(root) as mgr:  # the old 30 ended a run; the new one did not
        assert [c.tags for c in mgr.list() if c.step == 30] == [frozenset({"latest"})], kind
    listing = cli("ls", root, "--all")
    assert listing.returncode == 0, listing.stderr
    assert aside[0] in listing.stdout and "damaged" in listing.stdout


def test_quarantine_moves_a_checkpoint_aside_by_hand(tmp_path):
    root = tmp_path / "r"
    make_root(root)
    mark_final(root, 30)
    rot(root, 30)
    assert cli("verify", root).returncode == 1
    moved = cli("quarantine", root, 30)
    assert moved.returncode == 0, moved.stderr
    assert "step_00000030.damaged-" in moved.stdout
    assert steps_listed(root) == [20, 25]
    assert cli("verify", root).returncode == 0
    assert "damaged" in cli("ls", root, "--all").stdout
    assert "damaged" not in cli("ls", root).stdout
    assert finals(root) == []  # a step 30 saved again later did not end a run
    intact = cli("quarantine", root, 25)
    assert intact.returncode == 1 and "verifies intact" in intact.stderr, intact.stderr
    assert steps_listed(root) == [20, 25]
    forced = cli("quarantine", root, 25, "--force")
    assert forced.returncode == 0 and steps_listed(root) == [20], forced.stderr
    missing = cli("quarantine", root, 99)
    assert missing.returncode == 2 and "ls" in missing.stderr
    assert cli("quarantine", root, "latest").returncode == 2


@pytest.mark.parametrize("kind", ["flipped shard", "deleted manifest"])
def test_rerunning_the_training_command_after_damage_just_works(tmp_path, kind):
    """The issue's own reproduction: damage the newest checkpoint, rerun the same command."""
    root = tmp_path / "run"
    base = [
        sys.executable, "-m", "ckptstore.train", "--size", "tiny", "--device", "cpu",
        "--batch-size", "4", "--eval-every", "100", "--eval-batches", "1",
        "--save-every", "5", "--ckpt-dir", str(root),
    ]  # fmt: skip
    first = subprocess.run(
        [*base, "--steps", "30", "--keep-last", "0"],
        capture_output=True, text=True, timeout=300, env=env(), cwd=REPO,
    )  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    assert steps_listed(root)[-3:] == [20, 25, 30]
    DAMAGE[kind](step_dir(root, 30))
    for _ in range(2):  # the same command, twice: the second run finds the run finished
        again = subprocess.run(
            [*base, "--steps", "40", "--keep-last", "1"],
            capture_output=True, text=True, timeout=300, env=env(), cwd=REPO,
        )  # fmt: skip
        assert again.returncode == 0, again.stdout + again.stderr
        assert "Traceback" not in again.stderr
    assert steps_listed(root) == [40]
    with ckptstore.Checkpointer(root) as ckpt:
        assert ckpt.verify(40) == []
    assert len([n for n in names(root) if is_damaged_name(n)]) == 1


def test_retention_reads_what_this_run_linked_before_it_counts_as_verified(tmp_path):
    """Issue 19: a save that links an earlier file (incremental) vouches for bytes written
    long before. Bit rot in a linked file is shared by every later checkpoint, so those
    are verified, not trusted, and the last checkpoint that verifies is kept."""
    root = tmp_path / "r"
    frozen = torch.arange(1 << 18, dtype=torch.float32)  # 1 MB, never changes

    def tuned(step: int) -> dict[str, torch.Tensor]:
        return {"frozen": frozen, "w": torch.full((64, 64), float(step))}

    opts = dict(keep=ckptstore.KeepLast(2), codec="none", incremental=True, full_every=3)
    with ckptstore.CheckpointManager(root, **opts) as mgr:
        for step in (10, 20, 30, 40):  # 10 and 40 write everything, 20 and 30 link 10's
            mgr.save(step - 1, tuned(step))
            mgr.wait()
        with ckptstore.Checkpointer(root) as ckpt:
            assert [sorted(i.manifest.linked.values()) for i in ckpt.list()] == [
                ["step_00000010"],
                [],  # 30, 40: what KeepLast(2) kept
            ]
        shard = os.path.join(step_dir(root, 40), damage.SHARD)
        damage.xor(shard, os.path.getsize(shard) // 2)  # in the frozen tensor's bytes
        mgr.save(50 - 1, tuned(50))  # links 40's rotten file
        mgr.wait()
        with ckptstore.Checkpointer(root) as ckpt:
            listed = {i.step: i for i in ckpt.list()}
            assert list(listed[50].manifest.linked.values()) == ["step_00000040"]
            assert 30 in listed, sorted(listed)  # was deleted: 50 was trusted
            assert ckpt.verify(30) == [] and ckpt.verify(50) != []
            sd = blank() | {"frozen": torch.zeros_like(frozen), "w": torch.zeros(64, 64)}
            del sd["b"]
            ckpt.load(sd, 30)
            assert torch.equal(sd["frozen"], frozen) and torch.equal(
                sd["w"], torch.full((64, 64), 30.0)
            )
        mgr.save(60 - 1, tuned(60))  # retention found 50 damaged: 60 links nothing
        mgr.wait()
    with ckptstore.Checkpointer(root) as ckpt:
        listed = {i.step: i for i in ckpt.list()}
        assert sorted(listed) == [50, 60]  # 60 verifies: 30 may go now
        assert not listed[60].manifest.linked and ckpt.verify(60) == []


@pytest.mark.parametrize("keep", [None, ckptstore.KeepEvery(steps=10)])
def test_a_run_that_deletes_nothing_still_reads_what_it_linked(tmp_path, caplog, keep):
    """Issue 19, stranger test: with every checkpoint kept (`--keep-last 0`) and no full
    save due (`--full-every 0`), retention deletes nothing and so never read what a save
    linked: one rotten byte in a frozen file went into every later save, and none of
    them could be resumed. The newest is read through after each save anyway."""
    root = tmp_path / "r"
    frozen = torch.arange(1 << 18, dtype=torch.float32)  # 1 MB, never changes

    def tuned(step: int) -> dict[str, torch.Tensor]:
        return {"frozen": frozen, "w": torch.full((64, 64), float(step))}

    opts = dict(keep=keep, codec="none", incremental=True, full_every=0)
    with ckptstore.CheckpointManager(root, **opts) as mgr:
        mgr.save(10 - 1, tuned(10))  # writes everything
        mgr.wait()
        shard = os.path.join(step_dir(root, 10), damage.SHARD)
        damage.xor(shard, os.path.getsize(shard) // 2)  # in the frozen tensor's bytes
        mgr.save(20 - 1, tuned(20))  # links 10's rotten file
        mgr.wait()
        mgr.save(30 - 1, tuned(30))  # the read found 20 damaged: 30 links nothing
        mgr.wait()
        mgr.save(40 - 1, tuned(40))  # and 40 links 30's intact file
        mgr.wait()
    assert "step_00000020 is damaged" in caplog.text
    assert "the next save writes every tensor again" in caplog.text
    with ckptstore.Checkpointer(root) as ckpt:
        listed = {i.step: i for i in ckpt.list()}
        assert sorted(listed) == [10, 20, 30, 40]
        assert not listed[30].manifest.linked
        assert list(listed[40].manifest.linked.values()) == ["step_00000030"]
        assert ckpt.verify(10) != [] and ckpt.verify(20) != []
        assert ckpt.verify(30) == [] and ckpt.verify(40) == []


def test_a_linked_checkpoint_that_cannot_be_read_through_counts_as_damaged(
    tmp_path, caplog, monkeypatch
):
    """Review: an OSError (EIO) while reading the newest checkpoint through ended the
    housekeeping turn silently, before retention and the heal. Unreadable is damaged:
    the next save writes everything."""
    import ckptstore.engine.ops as ops

    root = tmp_path / "r"
    frozen = torch.arange(1 << 18, dtype=torch.float32)

    def tuned(step: int) -> dict[str, torch.Tensor]:
        return {"frozen": frozen, "w": torch.full((64, 64), float(step))}

    def unreadable(*args: object, **kwargs: object) -> list[str]:
        raise OSError(errno.EIO, "Input/output error")

    opts = dict(keep=None, codec="none", incremental=True, full_every=0)
    with ckptstore.CheckpointManager(root, **opts) as mgr:
        mgr.save(10 - 1, tuned(10))
        mgr.wait()
        with monkeypatch.context() as m:
            m.setattr(ops, "verify", unreadable)
            mgr.save(20 - 1, tuned(20))  # links 10's file; reading it through fails
            mgr.wait()
        mgr.save(30 - 1, tuned(30))  # so this one links nothing
        mgr.wait()
    assert "step_00000020 is damaged: could not read it through" in caplog.text
    with ckptstore.Checkpointer(root) as ckpt:
        listed = {i.step: i for i in ckpt.list()}
        assert listed[20].manifest.linked and not listed[30].manifest.linked
