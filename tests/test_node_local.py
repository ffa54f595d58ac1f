"""Node-local disks: ranks whose roots lie on different disks save one part per disk.

Real processes on gloo; "node" r is ranks 2r and 2r+1, each node with its own root
(tests/dist_worker.py, scenarios node_local*). The two-launcher torchrun run of the
reference loop is in tests/test_multinode.py.
"""

from __future__ import annotations

from test_distributed import run_ranks, spawn_ranks

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
    assert main(["pull", node1, str(tmp_path / "copy")]) != 0
    assert "is one node's part of a checkpoint" in capsys.readouterr().out


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
