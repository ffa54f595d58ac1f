"""Node-local disks: ranks whose roots lie on different disks save one part per disk.

Real processes on gloo; "node" r is ranks 2r and 2r+1, each node with its own root
(tests/dist_worker.py, scenarios node_local*). The two-launcher torchrun run of the
reference loop is in tests/test_multinode.py.
"""

from __future__ import annotations

from test_distributed import run_ranks, spawn_ranks


def test_each_disk_holds_its_ranks_part_and_loads_alone(tmp_path):
    run_ranks("node_local", str(tmp_path), 4)


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
