"""Issue 18: replicas stage only what they write. Under DDP or HSDP several ranks hold
the same tensors and DCP writes each once; after the first save of a layout, each rank
copies into its staging buffer only the tensors it wrote last time
(``StagingPool.note_written``), and the coordinator refuses a save that would lose one."""

from __future__ import annotations

import json

import torch
from dist_worker import replica_state, two_pack_state
from test_distributed import run_ranks

import ckptstore


def test_replicas_stage_only_what_they_write_and_every_save_is_whole(tmp_path):
    run_ranks("replicas_stage_once", str(tmp_path), 2)
    ckpts = tmp_path / "ckpts"
    seen = [json.loads((ckpts / f"seen-{r}.json").read_text()) for r in range(2)]
    per_save = list(zip(seen[0]["seen"], seen[1]["seen"], strict=True))
    assert per_save[0] == ([], [])  # the first save of a layout stages everything
    for r0, r1 in per_save[1:3]:  # saves 2 and 3: each rank skips what another writes
        assert not set(r0) & set(r1)  # never both (DCP gave each tensor to one of them)
        assert "sharded" not in r0 + r1  # each rank's own shard: never skipped
        skipped = set(r0 + r1)
        assert {f"model.big{i}" for i in range(6)} <= skipped  # all replicated ones
        assert {f"model.small{i}" for i in range(300)} <= skipped
        assert "replicated" in skipped
    for r in range(2):  # skipping saves reuse the layout's packing plan
        assert seen[r]["plans"] == [1, 1, 1], seen[r]["plans"]
    assert per_save[3] == ([], [])  # a new layout: everything again
    for r in range(2):
        assert "tensor(s) would be missing" in seen[r]["failed"], seen[r]["failed"]
    assert per_save[5] == ([], [])  # after the failed save: everything again
    # Each committed save holds the whole state of its step, read on one process.
    for step in (1, 2, 3):
        want = {"model": {}, "sharded": None, "replicated": None}
        full = _full(step)
        got = {
            "model": {k: torch.zeros_like(v) for k, v in full["model"].items()},
            "sharded": torch.zeros(8, 3),
            "replicated": torch.zeros(5),
        }
        ckptstore.load(got, ckpts / f"step_{step:08d}")
        for k, v in full["model"].items():
            assert torch.equal(got["model"][k], v), (step, k)
        assert torch.equal(got["sharded"], full["sharded"]) and torch.equal(
            got["replicated"], full["replicated"]
        )
        del want
    assert not (ckpts / "step_00000005").exists()
    from ckptstore.cli.main import main as cli

    assert cli(["verify", str(ckpts)]) == 0


def _full(step: int) -> dict:
    """The values replica_state gives at ``step``, as plain tensors (no process group)."""
    g = torch.Generator().manual_seed(step)
    model = {f"big{i}": torch.randn(5000, generator=g) for i in range(6)}
    model.update({f"small{i}": torch.randn(1 + i % 9, generator=g) for i in range(300)})
    model["empty"] = torch.zeros(0)
    return {
        "model": model,
        "sharded": torch.randn(8, 3, generator=g),
        "replicated": torch.randn(5, generator=g),
    }


assert replica_state  # the worker's state, mirrored by _full


def test_a_rank_that_packs_no_longer_after_skipping_still_saves(tmp_path):
    """Two packs, one written by each rank; skipping leaves each rank fewer small tensors
    than it takes to pack, so it writes them one by one: the coordinator's check must
    see them as the same tensors (a review found every second save failing here)."""
    run_ranks("replicas_two_packs", str(tmp_path), 2)
    ckpts = tmp_path / "ckpts"
    seen = [json.loads((ckpts / f"seen-{r}.json").read_text()) for r in range(2)]
    assert seen[0][0] == seen[1][0] == 0
    assert all(n > 0 for n in seen[0][1:] + seen[1][1:]), seen
    for step in (1, 2, 3, 4):
        want = two_pack_state(step)
        got = {top: {k: torch.zeros_like(v) for k, v in t.items()} for top, t in want.items()}
        ckptstore.load(got, ckpts / f"step_{step:08d}")
        for top, tensors in want.items():
            for k, v in tensors.items():
                assert torch.equal(got[top][k], v), (step, top, k)
