"""Issue 14: the backup tier tells checkpoints apart by content and run, not by name.

A checkpoint counts as backed up only when the remote holds the same one (same files
and checksums, same run); a different one of that name (a branch retired by
``restore(newer="discard")``, another run sharing the backup prefix) is replaced, never
leaving the remote without a complete checkpoint; and the remote's retention only counts
this run's checkpoints, so another run's newer-looking steps never push this run's out.
S3 through the moto server of ``conftest.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from helpers import assert_same, realistic_state, train
from helpers import train_state as make_state

import ckptstore
from ckptstore import CheckpointManager, KeepLast, SaveEvery
from ckptstore.cli import main
from ckptstore.engine.ops import list_checkpoints, read_manifest, verify
from ckptstore.errors import CorruptCheckpointError, StorageError
from ckptstore.format.manifest import Manifest
from ckptstore.layout import MANIFEST_FILE, checkpoint_name, set_aside_kind
from ckptstore.manager.replicate import Replicator
from ckptstore.progress import Progress
from ckptstore.storage import open_backend
from ckptstore.storage.testing.faulty import FaultyBackend
from ckptstore.transfer import copy_checkpoint, replace_checkpoint


def small(seed: int) -> dict:
    return {"w": torch.randn(1000, generator=torch.Generator().manual_seed(seed))}


def same_on_both(local, remote, step: int) -> bool:
    """The remote's checkpoint ``step`` is the local one: the same files and checksums."""
    name = checkpoint_name(step)
    return read_manifest(remote, name).files == read_manifest(local, name).files


# ---- the manifest records the run ----------------------------------------------------
def test_run_id_is_optional_in_the_manifest_and_round_trips(tmp_path):
    local = open_backend(tmp_path / "l")
    with ckptstore.Checkpointer(local) as ckpt:
        ckpt.save(realistic_state(), 1)
        ckpt.save_async(realistic_state(), 2, run_id="run-A_1").wait()
        with pytest.raises(ValueError, match="run_id"):
            ckpt.save_async(realistic_state(), 3, run_id="a/b")
    plain = local.read_bytes(f"step_00000001/{MANIFEST_FILE}")
    assert "run_id" not in json.loads(plain)  # a plain save's manifest is as before
    assert read_manifest(local, "step_00000001").run_id is None
    assert read_manifest(local, "step_00000002").run_id == "run-A_1"
    m = read_manifest(local, "step_00000002")
    assert Manifest.from_json(m.to_json(), "x").run_id == "run-A_1"
    forged = dataclasses.replace(m, run_id="../etc").to_json()
    with pytest.raises(CorruptCheckpointError, match="run_id"):
        Manifest.from_json(forged, "x")


def test_a_fresh_run_gets_a_new_run_id_and_a_resumed_run_keeps_it(tmp_path):
    root = tmp_path / "run"
    with CheckpointManager(root, save=SaveEvery(steps=2)) as mgr:
        train(mgr, make_state(), 2)
    local = open_backend(root)
    first = read_manifest(local, "step_00000002").run_id
    assert first
    state = make_state()
    with CheckpointManager(root, save=SaveEvery(steps=2)) as mgr:
        assert mgr.restore(state) == 2
        train(mgr, state, 2, start=2)
    assert read_manifest(local, "step_00000004").run_id == first
    with CheckpointManager(tmp_path / "other", save=SaveEvery(steps=2)) as mgr:
        train(mgr, make_state(), 2)
    other = read_manifest(open_backend(tmp_path / "other"), "step_00000002").run_id
    assert other and other != first


# ---- replacing without a window ------------------------------------------------------
def test_replace_keeps_a_complete_checkpoint_on_the_destination_throughout(tmp_path):
    """Failing at the worst moment (old deleted, new not yet under its name) leaves the
    complete new one beside it; a second call finishes the job."""
    old, new = open_backend(tmp_path / "old"), open_backend(tmp_path / "new")
    with ckptstore.Checkpointer(old) as ckpt:
        ckpt.save(small(1), 1)
    with ckptstore.Checkpointer(new) as ckpt:
        ckpt.save(small(2), 1)
    name = "step_00000001"
    inner = open_backend(tmp_path / "dst")
    copy_checkpoint(old, inner, name)
    failing = {"on": True}

    def fault(op, what):
        if failing["on"] and op == "begin" and what == name:
            return StorageError("injected: the link went down")
        return None

    dst = FaultyBackend(inner, fault)
    with pytest.raises(StorageError, match="injected"):
        replace_checkpoint(new, dst, name)
    beside = f"{name}.replacing"
    assert read_manifest(inner, beside).same_checkpoint(read_manifest(new, name))
    assert verify(inner, beside, None) == []
    failing["on"] = False
    # A plain copy (what sync and the backup tier make of a name without a manifest)
    # finishes the job too: the copy left beside it is removed (it stayed forever)
    copy_checkpoint(new, inner, name)
    assert beside not in inner.list_names()
    assert read_manifest(inner, name).same_checkpoint(read_manifest(new, name))
    inner.delete(name)
    copy_checkpoint(new, inner, name, dst_name=beside)  # as the failure left it
    progress = Progress("replacing", 0, enabled=False)
    replace_checkpoint(new, dst, name, progress=progress)  # (the old one went before)
    assert progress.payload == read_manifest(new, name).stored_bytes
    assert read_manifest(inner, name).same_checkpoint(read_manifest(new, name))
    assert verify(inner, name, None) == []
    assert beside not in inner.list_names()
    progress = Progress("replacing", 0, enabled=False)
    replace_checkpoint(new, inner, name, progress=progress)  # beside, then in its place
    # sent once: the copy under its name links the files of the one beside it (was 2x)
    assert progress.payload == read_manifest(new, name).stored_bytes
    assert verify(inner, name, None) == [] and beside not in inner.list_names()
    # Deleted before: writing the new one beside failed, the old one stays.
    inner2 = open_backend(tmp_path / "dst2")
    copy_checkpoint(old, inner2, name)
    dst2 = FaultyBackend(
        inner2,
        lambda op, what: StorageError("injected") if op == "begin" else None,
    )
    with pytest.raises(StorageError):
        replace_checkpoint(new, dst2, name)
    assert read_manifest(inner2, name).same_checkpoint(read_manifest(old, name))


def test_a_copy_over_a_damaged_one_from_a_damaged_source_deletes_nothing(tmp_path):
    """Stranger test (the order of its lines): a copy that replaces (a restore from a
    backup on a local disk over a damaged local copy) deleted the copy there before it
    found the source damaged too, and then copied nothing."""
    src, dst = open_backend(tmp_path / "src"), open_backend(tmp_path / "dst")
    with ckptstore.Checkpointer(src) as ckpt:
        ckpt.save(small(1), 1)
    name = "step_00000001"
    copy_checkpoint(src, dst, name)
    for root in (tmp_path / "src", tmp_path / "dst"):
        with open(root / name / "__0_0.distcp", "r+b") as f:
            f.seek(40)
            byte = f.read(1)
            f.seek(40)
            f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match="not copied"):
        copy_checkpoint(src, dst, name, replace=True)
    assert dst.exists(f"{name}/{MANIFEST_FILE}")  # still there, for what it is worth


def test_a_replace_on_s3_ends_intact_though_the_stores_copies_go_wrong(
    tmp_path, s3_server, s3_bucket, monkeypatch
):
    """On an object store a copy inside it (CopyObject) is not read back: a replace
    must not build the checkpoint under its name from such copies of the one beside it
    and then delete that one (with a store whose copies flip a byte, only a damaged
    checkpoint was left)."""
    from ckptstore.storage.s3 import S3Backend

    old, new = open_backend(tmp_path / "old"), open_backend(tmp_path / "new")
    with ckptstore.Checkpointer(old) as ckpt:
        ckpt.save(small(1), 1)
    with ckptstore.Checkpointer(new) as ckpt:
        ckpt.save(small(2), 1)
    name, dst = "step_00000001", open_backend(f"s3://{s3_bucket}/replace")
    copy_checkpoint(old, dst, name)

    def damaging_copy(self, src, to, recursive=False):
        data = bytearray(self.fs.cat_file(src))
        data[len(data) // 2] ^= 1
        self.fs.pipe_file(to, bytes(data))

    monkeypatch.setattr(S3Backend, "copy_inside", damaging_copy)
    replace_checkpoint(new, dst, name)
    assert read_manifest(dst, name).same_checkpoint(read_manifest(new, name))
    assert verify(dst, name, None) == []


# ---- the backup tier -----------------------------------------------------------------
def test_after_a_discard_the_backup_holds_the_new_branch_and_a_lost_disk_restores_it(
    s3_server, s3_bucket, tmp_path, caplog
):
    url = f"s3://{s3_bucket}/branch"
    local_root = tmp_path / "local"
    caplog.set_level(logging.INFO, logger="ckptstore")
    opts = {"save": SaveEvery(steps=10), "backup": url, "backup_max_queued": 3}
    with CheckpointManager(local_root, **opts) as mgr:
        train(mgr, make_state(), 30)
        assert mgr.wait_backup() == []
    state = make_state(seed=1)
    with CheckpointManager(local_root, **opts) as mgr:
        assert mgr.restore(state, 10, newer="discard") == 10
        with torch.no_grad():  # the new branch takes another path
            next(state.model.parameters()).add_(0.5)
        train(mgr, state, 20, start=10)
        assert mgr.wait_backup() == []
    local, remote = open_backend(local_root), open_backend(url)
    assert same_on_both(local, remote, 20)
    assert same_on_both(local, remote, 30)
    assert f"moved 2 newer checkpoint(s) under {url} aside as a retired branch" in caplog.text
    # Moved aside on both tiers, not deleted.
    for backend in (local, remote):
        assert len([n for n in backend.list_names() if set_aside_kind(n) == "retired"]) == 2
    assert "already on" not in caplog.text
    assert [n for n in remote.list_names() if n.endswith(".replacing")] == []
    # The local disk is lost: the backup brings back the new branch, not the retired one.
    fresh = make_state(seed=7)
    with CheckpointManager(tmp_path / "elsewhere", backup=url) as mgr:
        assert mgr.restore(fresh) == 30
    assert_same(fresh.model.state_dict(), state.model.state_dict())
    assert s3_server.open_uploads(s3_bucket) == []


def test_a_second_run_on_the_same_backup_keeps_its_own_checkpoints(
    s3_server, s3_bucket, tmp_path, caplog
):
    """Run B (started afresh) shares run A's backup prefix: A's steps 20-30 neither push
    B's uploads out through the remote's retention nor pass for B's checkpoints."""
    url = f"s3://{s3_bucket}/shared"
    caplog.set_level(logging.INFO, logger="ckptstore")
    opts = {
        "save": SaveEvery(steps=5),
        "backup": url,
        "backup_keep": KeepLast(3),
        "backup_max_queued": 6,
    }
    with CheckpointManager(tmp_path / "a", **opts) as mgr:
        train(mgr, make_state(), 30)
        assert mgr.wait_backup() == []
    remote = open_backend(url)
    assert [i.manifest.step for i in list_checkpoints(remote)] == [20, 25, 30]
    local_b = open_backend(tmp_path / "b")
    state = make_state(seed=1)
    with CheckpointManager(tmp_path / "b", **opts) as mgr:
        step = 0
        while step < 30:
            step = train(mgr, state, 5, start=step)
            assert mgr.wait_backup() == []
            # This run's newest upload is on the remote, as uploaded.
            assert same_on_both(local_b, remote, step), step
            assert remote.read_bytes("latest").decode().strip() == checkpoint_name(step)
        status = mgr.backup_status()
    on_remote = list_checkpoints(remote)
    assert [i.manifest.step for i in on_remote] == [20, 25, 30]
    assert all(same_on_both(local_b, remote, s) for s in (20, 25, 30))
    assert status is not None
    assert set(status.replaced) == {"step_00000020", "step_00000025", "step_00000030"}
    assert "already on" not in caplog.text
    assert [n for n in remote.list_names() if n.endswith(".replacing")] == []
    assert s3_server.open_uploads(s3_bucket) == []


def test_a_checkpoint_unreadable_on_the_remote_is_replaced(s3_server, s3_bucket, tmp_path):
    local = open_backend(tmp_path / "l")
    with ckptstore.Checkpointer(local) as ckpt:
        ckpt.save(realistic_state(), 1)
    remote = open_backend(f"s3://{s3_bucket}/bad")
    copy_checkpoint(local, remote, "step_00000001")
    remote.put_atomic(f"step_00000001/{MANIFEST_FILE}", b"{not json")
    with pytest.raises(CorruptCheckpointError):
        read_manifest(remote, "step_00000001")
    rep = Replicator(local, remote, catch_up=False)
    try:
        rep.submit("step_00000001")
        assert rep.wait(timeout_s=60) == []
        status = rep.status()
    finally:
        rep.close()
    assert same_on_both(local, remote, 1)
    assert status.replaced == ("step_00000001",)


def test_a_fresh_run_warns_about_another_runs_checkpoints(s3_server, s3_bucket, tmp_path, caplog):
    url = f"s3://{s3_bucket}/warn"
    root = tmp_path / "run"
    opts = {"save": SaveEvery(steps=2), "backup": url}
    with CheckpointManager(root, **opts) as mgr:
        train(mgr, make_state(), 4)
        assert mgr.wait_backup() == []
    earlier = read_manifest(open_backend(root), "step_00000004").run_id
    caplog.set_level(logging.WARNING, logger="ckptstore")
    # Resuming that run: nothing to say.
    with CheckpointManager(root, **opts) as mgr:
        assert mgr.restore(make_state()) == 4
    assert "another run" not in caplog.text
    # Starting afresh where it saved: both tiers are named, with what they hold.
    caplog.clear()
    with CheckpointManager(root, **opts) as mgr:
        assert mgr.restore(make_state(), "none") == 0
    warnings = [r.getMessage() for r in caplog.records if "another run" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert any(w.startswith(str(root)) for w in warnings)
    assert any(w.startswith(url) for w in warnings)
    assert all(f"run {earlier}: step_00000002, step_00000004" in w for w in warnings)


# ---- ckptstore sync ------------------------------------------------------------------
def test_sync_reports_another_runs_checkpoint_of_the_same_name(tmp_path, capsys):
    """``sync`` compares content and run, not names: another run's checkpoint of the same
    step at the destination is reported DIFFERENT, with both runs, and left alone."""
    for run, seed in (("a", 0), ("b", 1)):
        with CheckpointManager(tmp_path / run, save=SaveEvery(steps=2)) as mgr:
            train(mgr, make_state(seed=seed), 2)
    dst = tmp_path / "dst"
    assert main(["sync", str(tmp_path / "a"), str(dst)]) == 0
    capsys.readouterr()
    code = main(["sync", str(tmp_path / "b"), str(dst)])
    out = capsys.readouterr().out
    ran = {r: read_manifest(open_backend(tmp_path / r), "step_00000002").run_id for r in "ab"}
    assert code == 1, out
    assert "DIFFERENT step_00000002" in out and "present" not in out
    assert f"run {ran['a']} there, {ran['b']} here" in out
    assert same_on_both(open_backend(tmp_path / "a"), open_backend(dst), 2)


def test_discard_retires_the_newer_checkpoints_on_the_backup_too(s3_server, s3_bucket, tmp_path):
    """The local disk lost after a discard, before the new branch reached the old one's
    newest step: the backup must not bring the retired branch back."""
    url = f"s3://{s3_bucket}/retire"
    local_root = tmp_path / "local"
    opts = {"save": SaveEvery(steps=10), "backup": url, "backup_max_queued": 3}
    with CheckpointManager(local_root, **opts) as mgr:
        train(mgr, make_state(), 30)
        assert mgr.wait_backup() == []
    state = make_state(seed=1)
    with CheckpointManager(local_root, **opts) as mgr:
        assert mgr.restore(state, 10, newer="discard") == 10
        with torch.no_grad():
            next(state.model.parameters()).add_(0.5)
        train(mgr, state, 10, start=10)
        assert mgr.wait_backup() == []
    remote = open_backend(url)
    assert [i.manifest.step for i in list_checkpoints(remote)] == [10, 20]
    assert remote.read_bytes("latest") == b"step_00000020\n"
    fresh = make_state(seed=7)
    with CheckpointManager(tmp_path / "elsewhere", backup=url) as mgr:
        assert mgr.restore(fresh) == 20
    assert_same(fresh.model.state_dict(), state.model.state_dict())


def test_the_same_runs_checkpoint_with_other_content_is_replaced(tmp_path, caplog):
    """A retired branch's checkpoint the discard could not retire on the backup (it was
    unreachable then): same run, same step, other files. Local disk as the remote."""
    local, remote = open_backend(tmp_path / "l"), open_backend(tmp_path / "r")
    with ckptstore.Checkpointer(local) as ckpt:
        ckpt.save_async(small(1), 1, run_id="r1").wait()
    copy_checkpoint(local, remote, "step_00000001")
    local.delete("step_00000001")
    with ckptstore.Checkpointer(local) as ckpt:
        ckpt.save_async(small(2), 1, run_id="r1").wait()
    caplog.set_level(logging.INFO, logger="ckptstore")
    rep = Replicator(local, remote, catch_up=False, run_id="r1")
    try:
        rep.submit("step_00000001")
        assert rep.wait(timeout_s=60) == []
        status = rep.status()
    finally:
        rep.close()
    assert same_on_both(local, remote, 1)
    assert status.replaced == ("step_00000001",)
    assert "same run, other files or checksums" in caplog.text
    assert verify(remote, "step_00000001", None) == []
    assert "step_00000001.replacing" not in remote.list_names()


def test_a_checkpoint_restored_from_the_backup_counts_as_backed_up(s3_server, s3_bucket, tmp_path):
    """A fresh machine resumes from the backup and saves nothing new: its backup is not
    behind (it was reported "BEHIND: it has nothing" before)."""
    url = f"s3://{s3_bucket}/run"
    state = make_state()
    with CheckpointManager(tmp_path / "a", save=SaveEvery(steps=2), backup=url) as mgr:
        train(mgr, state, 2)
        assert mgr.wait_backup(60) == []
    fresh = make_state(seed=1)
    with CheckpointManager(tmp_path / "b", backup=url) as mgr:
        assert mgr.restore(fresh) == 2
        status = mgr.backup_status()
        assert status is not None and status.newest_backed_up == "step_00000002"


def test_the_progress_line_counts_in_the_units_of_every_other_message(caplog):
    """Found by a stranger test: a 3.3 MB backup showed '(6 of 6 MiB)' and a 638 KB one
    '(0 of 0 MiB, 0 MB/s)': MiB beside the MB of every other line, and a total twice the
    checkpoint's (sent, then read back) without saying so."""
    caplog.set_level(logging.INFO, logger="ckptstore")
    Progress("waiting", 0).show(force=True)  # not started: no "100.0% (0 B of 0 B)"
    upload = Progress("backup", 0)
    upload.restart(2 * 638_000, 638_000)  # an object store: read back after the upload
    upload.add(638_000)
    upload.show(force=True)
    download = Progress("pull", 0)
    download.restart(3_300_000, 3_300_000)
    download.add(3_300_000)
    download.show(force=True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("backup:  50.0% (638.00 KB of 1.28 MB sent and read back, "), lines
    assert lines[1].startswith("pull: 100.0% (3.30 MB of 3.30 MB, "), lines
    assert all(line.endswith("B/s)") and "MiB" not in line for line in lines), lines


def test_a_manager_that_saves_nothing_reads_the_backup_without_downloading(tmp_path):
    """``enabled=False`` (``ckptstore train --no-checkpoint``) "turns every write off":
    with a backup, restore downloaded the step into the local root (and replaced a
    damaged local copy there). It now reads the backup's copy where it lies, and leaves
    the local root as it was."""
    import os

    remote, local = tmp_path / "backup", tmp_path / "local"
    opts = {"save": SaveEvery(steps=10), "backup": str(remote)}
    with CheckpointManager(tmp_path / "trained", **opts) as mgr:
        saved = make_state()
        train(mgr, saved, 20)
    # nothing locally: read from the backup
    os.makedirs(local)
    with CheckpointManager(local, enabled=False, **opts) as mgr:
        state = make_state(seed=1)
        assert mgr.restore(state) == 20
    assert_same(state.model.state_dict(), saved.model.state_dict())
    assert os.listdir(local) == []
    # damaged locally: the backup's copy, and the local file left as it is
    with CheckpointManager(local, **opts) as mgr:
        mgr.restore(make_state(seed=1))  # (downloads 20: saving is on)
    shard = sorted((local / checkpoint_name(20)).glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with CheckpointManager(local, enabled=False, **opts) as mgr:
        state = make_state(seed=1)
        assert mgr.restore(state) == 20
    assert_same(state.model.state_dict(), saved.model.state_dict())
    assert shard.read_bytes() == bytes(data)
