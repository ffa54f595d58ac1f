"""``ckptstore.read``: a checkpoint's whole state dict without a target; ``no_dist`` saves."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import REPO, assert_same, realistic_state

import ckptstore


def as_stored(obj):
    """What ``read`` returns for ``obj``: dict keys as strings, empty dicts left out."""
    if isinstance(obj, dict):
        out = {str(k): as_stored(v) for k, v in obj.items()}
        return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
    if isinstance(obj, list) and any(isinstance(v, (dict, list, torch.Tensor)) for v in obj):
        return [as_stored(v) for v in obj]
    return obj


def test_read_returns_what_was_saved(tmp_path):
    state = realistic_state()
    ckptstore.save(state, tmp_path / "c")
    got = ckptstore.read(tmp_path / "c")
    assert_same(got, as_stored(state))
    assert got["optim"]["param_groups"] == state["optim"]["param_groups"]


def test_read_nested_lists_values_and_dotted_keys(tmp_path):
    state = {
        "w": torch.arange(6.0).reshape(2, 3),
        "mixed": [torch.ones(2), 5, {"x": torch.zeros(1)}],
        "plain": [1, 2, (3, "a")],
        "a.b": 1,
        "a": {"c": "two"},
        "empty_list": [],
    }
    ckptstore.save(state, tmp_path / "c")
    got = ckptstore.read(str(tmp_path / "c"))
    assert_same(got, state)
    assert got["w"].device.type == "cpu"


def test_read_returns_string_keys_and_drops_empty_dicts(tmp_path):
    # Documented: what DCP's stored paths cannot say (the Lightning plugin records it).
    ckptstore.save({"by_id": {0: torch.ones(1)}, "empty": {}, "v": 1}, tmp_path / "c")
    got = ckptstore.read(tmp_path / "c")
    assert list(got["by_id"]) == ["0"]
    assert "empty" not in got


def test_read_of_a_root_names_its_checkpoints(tmp_path):
    with ckptstore.Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save({"w": torch.ones(2)}, step=1)
    with pytest.raises(ckptstore.CheckpointNotFoundError, match="looks like a checkpoint root"):
        ckptstore.read(tmp_path / "run")


def test_no_dist_and_process_group_are_exclusive(tmp_path):
    with pytest.raises(ckptstore.InvalidArgumentError, match="not both"):
        ckptstore.save({"w": torch.ones(1)}, tmp_path / "c", no_dist=True, process_group=object())


RANK = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    import ckptstore
    rank, work = int(sys.argv[1]), sys.argv[2]
    store = dist.FileStore(os.path.join(work, "store"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    if rank == 0:  # alone: a collective here would wait for rank 1 forever
        ckptstore.save({"w": torch.arange(4.0), "r": 0}, os.path.join(work, "c"), no_dist=True)
        target = {"w": torch.zeros(4), "r": -1}
        ckptstore.load(target, os.path.join(work, "c"), no_dist=True)
        assert torch.equal(target["w"], torch.arange(4.0)) and target["r"] == 0
        assert ckptstore.read(os.path.join(work, "c"))["r"] == 0
    dist.barrier()
    if rank == 1:
        assert ckptstore.read(os.path.join(work, "c"))["r"] == 0
    dist.destroy_process_group()
    """
)


def test_no_dist_save_on_one_rank_runs_no_collective(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "GLOO_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(rank), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=90)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()  # reaped, its pipe closed (not warned about in a later test)
        pytest.fail("a no_dist save on rank 0 alone hung")
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]


def test_lazy_read_reads_a_tensor_when_it_is_looked_at(tmp_path, monkeypatch):
    state = realistic_state()
    ckptstore.save(state, tmp_path / "c")
    from ckptstore.engine import lazyread

    loaded: list[list[str]] = []
    real = lazyread.load_flat
    monkeypatch.setattr(
        lazyread, "load_flat", lambda flat, *a: (loaded.append(sorted(flat)), real(flat, *a))
    )
    lazy = ckptstore.read(tmp_path / "c", lazy=True)
    values_read = len(loaded)  # the non-tensor values, read on opening
    assert set(lazy) == set(as_stored(state))
    name, tensor = next((k, v) for k, v in state["model"].items() if isinstance(v, torch.Tensor))
    got = lazy["model"][name]
    assert loaded[values_read:] == [[f"model.{name}"]]  # that one tensor, nothing else
    assert torch.equal(got, tensor) and got.dtype == tensor.dtype
    assert lazy["model"][name] is got  # read once
    assert_same(lazy.materialize(), as_stored(state))
    assert lazy["optim"]["param_groups"] == state["optim"]["param_groups"]
