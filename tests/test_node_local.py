"""Node-local disks: ranks whose roots lie on different disks save one part per disk.

Real processes on gloo; "node" r is ranks 2r and 2r+1, each node with its own root
(tests/dist_worker.py, scenarios node_local*). The two-launcher torchrun run of the
reference loop is in tests/test_multinode.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_distributed import run_ranks, spawn_ranks

import ckptstore
from ckptstore.cli import main


def test_each_disk_holds_its_ranks_part_and_loads_alone(tmp_path, capsys):
    run_ranks("node_local", str(tmp_path), 4)
    # Restarted on another shape without a backup: told why nothing loads, and what does
    run_ranks("node_local_other_shape", str(tmp_path), 2)
    # The command line says what a part is: verify checks what lies here, info names
    # the rest; a part is never copied alone.
    node1 = str(tmp_path / "ckpts" / "node1")
    assert main(["verify", node1]) == 0
    assert "OK   step_00000002 (this node's part; 2 shard file(s)" in capsys.readouterr().out
    assert main(["info", f"{node1}/step_00000002"]) == 0
    assert "on other nodes' disks: __0_0.distcp, __1_0.distcp" in capsys.readouterr().out
    assert main(["pull", node1, str(tmp_path / "copy")]) == 1
    assert "node1 holds one node's parts" in capsys.readouterr().err


def test_three_disks_each_hold_their_part_and_load_alone(tmp_path):
    """Three nodes: two committers are sent the parts' shared .metadata body through a
    tree, each with its own changes (its copies of the replicated and packed items)."""
    run_ranks("node_local", str(tmp_path), 6)


def test_a_step_rank_0_never_committed_is_not_restored_and_its_parts_are_replaced(tmp_path):
    results = spawn_ranks("node_local_rank0_dies", str(tmp_path), 4, timeout=120)
    assert results[0][0] == 9, results[0][1][-3000:]
    for rc, out in results[1:]:
        assert rc == 3, out[-3000:]
    # Node 1's part of step 2 was committed before rank 0 died; rank 0's never was.
    node0, node1 = tmp_path / "ckpts" / "node0", tmp_path / "ckpts" / "node1"
    assert (node1 / "step_00000002" / "manifest.json").exists()
    assert not (node0 / "step_00000002").exists()
    run_ranks("node_local_resume", str(tmp_path), 4)


def test_a_restore_moves_newer_parts_aside_on_every_disk(tmp_path):
    run_ranks("node_local_newer_parts", str(tmp_path), 4, timeout=120)


def test_ranks_agree_on_why_a_step_could_not_be_read(tmp_path):
    run_ranks("restore_problem_agreed", str(tmp_path), 3)


def test_a_restore_that_fails_on_one_rank_fails_on_all(tmp_path):
    run_ranks("restore_fails_on_one_rank", str(tmp_path), 2, timeout=120)


def test_an_empty_disk_leaves_the_other_nodes_parts_newer_than_nothing(tmp_path):
    run_ranks("node_local_empty_disk", str(tmp_path), 4, timeout=120)


def test_a_part_damaged_on_one_nodes_disk_is_set_aside_saying_it_may_be_another_nodes(tmp_path):
    run_ranks("node_local_damaged_part_set_aside", str(tmp_path), 2)


def test_verify_and_pull_of_a_nodes_parts_say_pull_cannot_repair_them(tmp_path, capsys):
    """A node's disk holds parts: verify's advice for damage there is the run's backup,
    not `pull --replace-damaged`, and pull or sync into it are refused (a whole
    checkpoint copied in mixes with the parts and repairs none)."""
    import damage

    from ckptstore.cli.main import main

    run_ranks("node_local_parts", str(tmp_path), 2)
    disk = str(tmp_path / "ckpts" / "disk1")
    damage.xor(os.path.join(disk, "step_00000001", "__1_0.distcp"), 64)
    assert main(["verify", disk]) == 1
    out = capsys.readouterr().out
    assert "this node's parts of checkpoints saved to node-local disks" in out, out
    assert "--replace-damaged" not in out, out
    whole = str(tmp_path / "whole")
    with ckptstore.Checkpointer(whole) as ckpt:
        ckpt.save({"w": torch.ones(4)}, step=2)
    for command in ("pull", "sync"):
        assert main([command, whole, disk]) == 1
        err = capsys.readouterr().err
        assert "holds one node's parts of checkpoints saved to node-local disks" in err, err
        assert f"give {command} an empty directory" in err, err
    assert sorted(n for n in os.listdir(disk) if n.startswith("step_")) == ["step_00000001"]
    assert main(["sync", str(tmp_path / "ckpts" / "disk0"), str(tmp_path / "copy")]) == 1
    err = capsys.readouterr().err
    assert "disk0 holds one node's parts" in err and "ckptstore train --backup URL" in err, err
    assert "Rerun the same command" not in err, err


def test_a_part_damaged_on_another_nodes_disk_is_restored_from_the_backup(
    tmp_path, s3_server, s3_bucket
):
    run_ranks(
        "node_local_damaged_part_from_backup",
        str(tmp_path),
        2,
        extra_env={"CKPTSTORE_TEST_BACKUP": f"s3://{s3_bucket}/run"},
    )


def test_a_lost_nodes_disk_is_restored_from_the_backup(tmp_path, s3_server, s3_bucket):
    run_ranks(
        "node_local_lost_disk_from_backup",
        str(tmp_path),
        2,
        extra_env={"CKPTSTORE_TEST_BACKUP": f"s3://{s3_bucket}/lost"},
    )


def test_rot_in_a_linked_file_on_another_nodes_disk_is_not_linked_again(tmp_path):
    run_ranks("incremental_node_rot", str(tmp_path), 2)


def test_a_nodes_damaged_part_is_not_uploaded_to_the_backup(tmp_path, s3_server, s3_bucket):
    """Each other disk's rank uploads its part; a damaged one is refused before anything
    is sent (rank 0's part was checked so already): the backup would otherwise commit a
    checkpoint that does not load, and a restore would take it for an intact copy."""
    import damage

    from ckptstore.errors import CorruptCheckpointError
    from ckptstore.storage import open_backend
    from ckptstore.transfer_parts import upload_part

    run_ranks("node_local_parts", str(tmp_path), 2)
    disk = str(tmp_path / "ckpts" / "disk1")
    damage.xor(os.path.join(disk, "step_00000001", "__1_0.distcp"), 64)
    backup = open_backend(f"s3://{s3_bucket}/parts")
    with pytest.raises(CorruptCheckpointError, match=r"not copied: .*checksum mismatch"):
        upload_part(open_backend(disk), backup, "step_00000001")
    assert backup.list_names() == []


def test_rank_0_stops_waiting_for_a_part_another_node_refused(tmp_path, s3_server, s3_bucket):
    """The node whose part is damaged marks its files as not coming; rank 0's commit of
    that checkpoint on the backup gives up at once, and its replicator does not retry it.
    It waited 600 s before (at close(), once per attempt: five). A marker about other
    bytes (another save of that step) is not taken for this one's."""
    import time

    import damage

    from ckptstore.errors import PartRefusedError
    from ckptstore.manager.partbackup import PartUploader
    from ckptstore.manager.replicate import Replicator
    from ckptstore.storage import open_backend
    from ckptstore.transfer_parts import REFUSED_SUFFIX, commit_parts_backup

    run_ranks("node_local_parts", str(tmp_path), 2)
    disk0, disk1 = (open_backend(str(tmp_path / "ckpts" / f"disk{i}")) for i in (0, 1))
    name = "step_00000001"
    damage.xor(os.path.join(disk1.root, name, "__1_0.distcp"), 64)
    backup = open_backend(f"s3://{s3_bucket}/refused")
    uploader = PartUploader(disk1, backup)
    uploader.submit(name)
    assert uploader.wait(60)
    uploader.close()
    assert backup.exists(f"{name}/__1_0.distcp{REFUSED_SUFFIX}")
    assert not backup.exists(f"{name}/__1_0.distcp")

    started = time.monotonic()
    with pytest.raises(PartRefusedError, match=rf"did not upload its part of {name} \(__1_0"):
        commit_parts_backup(disk0, backup, name, wait_s=120)
    replicator = Replicator(disk0, backup, catch_up=False)
    replicator.submit(name)
    assert replicator.wait(120, give_up_after=1) == []  # done with it: not retried
    replicator.close()
    assert time.monotonic() - started < 60
    assert not backup.exists(f"{name}/manifest.json")

    marker = f"{name}/__1_0.distcp{REFUSED_SUFFIX}"
    stale = json.loads(backup.read_bytes(marker))
    stale["xxh3_64"] = "0" * 16
    backup.put_atomic(marker, json.dumps(stale).encode())
    with pytest.raises(ckptstore.StorageError, match="still lacks the other nodes"):
        commit_parts_backup(disk0, backup, name, wait_s=2)


def upload_then_commit(disk0, disk1, backup, name: str) -> None:
    """Node 1's part uploaded by its uploader, then rank 0's commit; the backup's copy
    verifies."""
    from ckptstore.engine.ops import verify
    from ckptstore.manager.partbackup import PartUploader
    from ckptstore.transfer_parts import commit_parts_backup

    uploader = PartUploader(disk1, backup)
    uploader.submit(name)
    assert uploader.wait(60, give_up_after=1)
    uploader.close()
    commit_parts_backup(disk0, backup, name, wait_s=60)
    assert verify(backup, name, None) == []


def test_a_dead_attempts_leftovers_on_the_backup_are_written_again(tmp_path, s3_server, s3_bucket):
    """A node's part uploaded by a run that died, then another save of that step: the
    backup holds other bytes under both nodes' file names, without a manifest. Every
    upload failed on them (EEXIST, files are written once), the node retried forever
    and its run never exited. Now they are removed and written again."""
    from ckptstore.storage import open_backend

    run_ranks("node_local_parts", str(tmp_path), 2)
    disk0, disk1 = (open_backend(str(tmp_path / "ckpts" / f"disk{i}")) for i in (0, 1))
    name = "step_00000001"
    backup = open_backend(f"s3://{s3_bucket}/leftovers")
    fs = s3_server.fs()
    for fname in ("__0_0.distcp", "__1_0.distcp"):
        fs.pipe_file(f"{s3_bucket}/leftovers/{name}/{fname}", os.urandom(4096))
    upload_then_commit(disk0, disk1, backup, name)


def test_a_node_that_cannot_upload_its_part_gives_up_at_close(tmp_path, s3_server, s3_bucket):
    """close() waited for this node's upload with no limit while it retried forever:
    the run never exited. It now gives up after 5 failed attempts in a row (as rank 0's
    backup does) and marks the part as not coming, so rank 0 stops waiting too."""
    import errno
    import time

    from ckptstore.errors import PartRefusedError
    from ckptstore.manager.partbackup import PartUploader
    from ckptstore.storage import open_backend
    from ckptstore.storage.testing.faulty import FaultyBackend
    from ckptstore.transfer_parts import commit_parts_backup

    run_ranks("node_local_parts", str(tmp_path), 2)
    disk0, disk1 = (open_backend(str(tmp_path / "ckpts" / f"disk{i}")) for i in (0, 1))
    name = "step_00000001"
    backup = open_backend(f"s3://{s3_bucket}/failing")

    def fault(op: str, fname: str) -> BaseException | None:
        if op == "create_file" and fname.endswith(".distcp"):
            return OSError(errno.EIO, "injected: the store refuses this node's uploads")
        return None

    uploader = PartUploader(disk1, FaultyBackend(backup, fault), retry_max_s=0.1)
    uploader.submit(name)
    started = time.monotonic()
    uploader.close()
    assert time.monotonic() - started < 30
    with pytest.raises(PartRefusedError, match="that node gave up after 5 failed uploads"):
        commit_parts_backup(disk0, backup, name, wait_s=60)
    # The store answers again (the next run): the node's upload clears its markers, and
    # rank 0 commits (a marker left in place gave that checkpoint up for good)
    upload_then_commit(disk0, disk1, backup, name)


def test_rank_0_waits_once_at_close_for_a_node_that_cannot_reach_the_backup(
    tmp_path, s3_server, s3_bucket, caplog
):
    """A node that cannot reach the store at all leaves no marker: rank 0's close()
    waited for its files once per attempt (600 s, five attempts: 50 minutes at the end
    of a run). As the run ends the other nodes' uploaders stop too: one wait."""
    import logging
    import time

    from ckptstore.manager.replicate import Replicator
    from ckptstore.storage import open_backend

    run_ranks("node_local_parts", str(tmp_path), 2)
    disk0 = open_backend(str(tmp_path / "ckpts" / "disk0"))
    name = "step_00000001"
    replicator = Replicator(disk0, open_backend(f"s3://{s3_bucket}/unreached"), catch_up=False)
    replicator.parts_wait_s = 3.0
    replicator.retry_initial_s = replicator.retry_max_s = 0.5
    replicator.submit(name)
    try:
        deadline = time.monotonic() + 60  # mid-run: one attempt timed out, and is retried
        while replicator.status().failures < 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # (its wait starts once rank 0's own files are up: load-bound)
        assert replicator.status().failures >= 1
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="ckptstore"):
            left = replicator.close()
    finally:
        replicator.close(wait=False)
    assert left == [name]
    assert time.monotonic() - started < 4 * replicator.parts_wait_s  # five: >15 s
    said = [r.getMessage() for r in caplog.records]
    assert any(f"giving up on {name} as the run ends" in m for m in said), said
    assert any(f"not backed up to s3://{s3_bucket}/unreached: {name}" in m for m in said), said
    assert "PartsMissingError" in (replicator.status().last_error or "")  # (train says it)
    assert replicator.status().given_up == (name,)


def test_a_part_arriving_after_close_began_is_still_committed(tmp_path, s3_server, s3_bucket):
    """The other nodes go on uploading while rank 0 closes (up to five attempts): an
    attempt whose wait began before the close and ran out meanwhile is tried again."""
    import threading
    import time

    from ckptstore.manager.replicate import Replicator
    from ckptstore.storage import open_backend
    from ckptstore.transfer_parts import upload_part

    run_ranks("node_local_parts", str(tmp_path), 2)
    disk0, disk1 = (open_backend(str(tmp_path / "ckpts" / f"disk{i}")) for i in (0, 1))
    name, backup = "step_00000001", open_backend(f"s3://{s3_bucket}/late")
    replicator = Replicator(disk0, backup, catch_up=False)
    replicator.parts_wait_s = 5.0
    replicator.retry_initial_s = replicator.retry_max_s = 0.5
    late = threading.Timer(6.5, lambda: upload_part(disk1, backup, name))
    replicator.submit(name)
    late.start()
    try:
        time.sleep(1.0)  # the first attempt waits; the run ends
        assert replicator.close() == []
    finally:
        late.join()
        replicator.close(wait=False)
    assert backup.exists(f"{name}/manifest.json")


def test_a_parts_metadata_damaged_on_one_rank_is_skipped_by_every_rank(tmp_path):
    run_ranks("node_local_metadata_damaged_on_one_rank", str(tmp_path), 2, timeout=120)
