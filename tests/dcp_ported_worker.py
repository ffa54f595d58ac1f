"""The multi-rank cases of tests/test_dcp_ported.py, run by one launch of gloo ranks.

``dist_worker.py dcp_ported WORKDIR RANK WORLD`` calls :func:`run_all` on every rank
(the process group is already up). Each case runs twice, once per way of saving and
loading (``dcp``: ``dcp.save`` / ``dcp.load`` through ckptstore's ``StorageWriter`` /
``StorageReader``; ``ckptstore``: ``ckptstore.save`` / ``ckptstore.load``). A failing
case does not stop the others: each rank writes ``{case/way: null or the error}`` to
``WORKDIR/ckpts/results-RANK.json`` and the test file asserts on it, case by case.

Upstream overwrites one directory again and again; ckptstore never overwrites a
committed checkpoint, so every save here goes to a fresh path.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor import zeros as dtensor_zeros

import ckptstore
from ckptstore.engine.ops import read_manifest
from ckptstore.integrations.dcp import StorageReader, StorageWriter
from ckptstore.storage import open_backend

WAYS = ("dcp", "ckptstore")


class Paths:
    """A fresh checkpoint path per save, the same on every rank."""

    def __init__(self, root: str, case: str, way: str) -> None:
        self.root, self.prefix, self.n = root, f"{case}-{way}", 0

    def next(self) -> str:
        self.n += 1
        return os.path.join(self.root, f"{self.prefix}-{self.n}")


def save(way: str, state: dict[str, Any], path: str) -> None:
    if way == "dcp":
        dcp.save(state, storage_writer=StorageWriter(path))
    else:
        ckptstore.save(state, path)


def load(way: str, state: dict[str, Any], path: str) -> None:
    if way == "dcp":
        dcp.load(state, storage_reader=StorageReader(path))
    else:
        ckptstore.load(state, path)


def full(t: Any) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: {a} != {b}"


def global_4x4() -> torch.Tensor:
    return torch.arange(16, dtype=torch.float).view(4, 4)


ONE_D = ([Shard(0)], [Replicate()])
TWO_D = (
    [Replicate(), Replicate()],
    [Replicate(), Shard(0)],
    [Shard(0), Replicate()],
    [Shard(0), Shard(0)],
)


# ---- the cases: each mirrors the upstream test named in its docstring ---------------------


def case_sharded_model_round_trip(way: str, paths: Paths, world: int) -> None:
    """test_file_system_checkpoint_cpu.py::test_read_write_shard_tensor (DTensor for the
    deprecated ShardedTensor): a row-sharded parameter, saved and loaded into a fresh one."""
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(1)
    saved = {"sharded": distribute_tensor(torch.rand(10, 20, generator=g), mesh, [Shard(0)])}
    path = paths.next()
    save(way, saved, path)
    got = {"sharded": dtensor_zeros(10, 20, device_mesh=mesh, placements=[Shard(0)])}
    load(way, got, path)
    same(got["sharded"].to_local(), saved["sharded"].to_local(), "local shard")


def case_load_with_a_different_shard_plan(way: str, paths: Paths, world: int) -> None:
    """test_file_system_checkpoint_cpu.py::test_load_with_different_shard_plan: every pair
    of distinct layouts of a [10, 20] tensor, saved in one, loaded in the other."""
    mesh = init_device_mesh("cpu", (world,))
    layouts = ([Shard(0)], [Shard(1)], [Replicate()])
    whole = torch.rand(10, 20, generator=torch.Generator().manual_seed(2))
    for src, dst in itertools.permutations(layouts, 2):
        path = paths.next()
        save(way, {"t": distribute_tensor(whole, mesh, src)}, path)
        got = {"t": dtensor_zeros(10, 20, device_mesh=mesh, placements=dst)}
        load(way, got, path)
        same(full(got["t"]), whole, f"{src} -> {dst}")


def case_load_rowwise_to_colwise(way: str, paths: Paths, world: int) -> None:
    """test_file_system_checkpoint_cpu.py::test_load_rowwise_to_colwise."""
    mesh = init_device_mesh("cpu", (world,))
    whole = torch.rand(10, 20, generator=torch.Generator().manual_seed(3))
    path = paths.next()
    save(way, {"t": distribute_tensor(whole, mesh, [Shard(0)])}, path)
    got = {"t": dtensor_zeros(10, 20, device_mesh=mesh, placements=[Shard(1)])}
    load(way, got, path)
    same(full(got["t"]), whole, "rowwise -> colwise")


def case_save_load_bytes(way: str, paths: Paths, world: int) -> None:
    """test_file_system_checkpoint_cpu.py::test_save_load_bytes: non-tensor values from
    every rank."""
    path = paths.next()
    save(way, {"bytes0": [1], "bytes1": "string"}, path)
    got: dict[str, Any] = {"bytes0": [2], "bytes1": "other"}
    load(way, got, path)
    assert got == {"bytes0": [1], "bytes1": "string"}, got


def case_switch_between_sharded_and_plain_tensor(way: str, paths: Paths, world: int) -> None:
    """test_file_system_checkpoint_cpu.py::test_switch_between_sharded_tensor_to_tensor:
    a sharded tensor loads into a plain one and a plain (replicated) one into a sharded
    one, for several shardings on each side."""
    mesh = init_device_mesh("cpu", (world,))
    layouts = ([Shard(0)], [Replicate()])
    n = 32
    for i, (save_layout, load_layout) in enumerate(itertools.product(layouts, layouts)):
        g = torch.Generator().manual_seed(10 + i)  # same on every rank: "replicated"
        sharded_whole, replicated = torch.rand(n, generator=g), torch.rand(n, generator=g)
        path = paths.next()
        save(
            way,
            {
                "sharded": distribute_tensor(sharded_whole, mesh, save_layout),
                "replicated": replicated,
            },
            path,
        )
        got = {
            "sharded": torch.zeros(n),
            "replicated": dtensor_zeros(n, device_mesh=mesh, placements=load_layout),
        }
        load(way, got, path)
        same(got["sharded"], sharded_whole, f"sharded {save_layout} -> plain")
        same(full(got["replicated"]), replicated, f"plain -> {load_layout}")


def case_list_stored_state_dict_metadata(way: str, paths: Paths, world: int) -> None:
    """test_list_stored_state_dict.py::test_list_stored_sd_metadata (torch 2.13 has no
    ``dcp.list_stored_state_dict``: the stored metadata is what the reader returns)."""
    mesh = init_device_mesh("cpu", (world,))
    path = paths.next()
    save(
        way,
        {
            "distributed_weight": distribute_tensor(global_4x4(), mesh, [Shard(0)]),
            "bytes_data": io.BytesIO(b"TrainingEpoch:4"),
        },
        path,
    )
    md = StorageReader(path).read_metadata().state_dict_metadata
    weight = md["distributed_weight"]
    assert isinstance(weight, TensorStorageMetadata), weight
    assert weight.size == torch.Size([4, 4]) and weight.properties.dtype == torch.float32
    assert isinstance(md["bytes_data"], BytesStorageMetadata), md["bytes_data"]


def case_replicated_tensor_stored_once(way: str, paths: Paths, world: int) -> None:
    """test_dedup_tensors.py::test_dedup_shards, as storage sees it: a tensor every rank
    holds whole is written once; each rank's own tensor is written by that rank."""
    path = paths.next()
    rank = dist.get_rank()
    save(way, {"tensor_0": torch.ones(4), f"r{rank}": torch.full((10,), float(rank))}, path)
    md = StorageReader(path).read_metadata()
    where = {idx.fqn: data["file"] for idx, data in md.storage_data.items()}
    writes = sum(1 for idx in md.storage_data if idx.fqn == "tensor_0")
    assert writes == 1, f"tensor_0 written {writes} times"
    for r in range(world):
        assert where[f"r{r}"].startswith(f"__{r}_"), where
    got = {"tensor_0": torch.zeros(4), f"r{rank}": torch.zeros(10)}
    load(way, got, path)
    same(got[f"r{rank}"], torch.full((10,), float(rank)), "own tensor")


def case_default_metadata(way: str, paths: Paths, world: int) -> None:
    """test_checkpoint.py::test_default_metadata: what the stored metadata says of a
    sharded tensor (one chunk per rank), a replicated one (one chunk) and a Python value."""
    mesh = init_device_mesh("cpu", (world,))
    replicated = torch.rand(4, generator=torch.Generator().manual_seed(4))
    path = paths.next()
    save(
        way,
        {
            "sharded": distribute_tensor(torch.rand(10, 10), mesh, [Shard(0)]),
            "replicated": replicated,
            "bytes": [1, 2, 3, 4],
        },
        path,
    )
    md = StorageReader(path).read_metadata().state_dict_metadata
    assert isinstance(md["bytes"], BytesStorageMetadata)
    rep = md["replicated"]
    assert isinstance(rep, TensorStorageMetadata)
    assert rep.size == replicated.size() and rep.properties.dtype == torch.float32
    assert len(rep.chunks) == 1, rep.chunks
    sharded = md["sharded"]
    assert isinstance(sharded, TensorStorageMetadata)
    assert sharded.size == torch.Size([10, 10]) and sharded.properties.dtype == torch.float32
    assert len(sharded.chunks) == world, sharded.chunks


def case_dtensor_model_with_extra_state(way: str, paths: Paths, world: int) -> None:
    """test_dtensor_checkpoint.py::test_distributed_tensor_planner: a module with a
    sharded and a replicated DTensor parameter and an ``_extra_state`` of an int and a
    tensor; loading into the same model built with values x10 brings back the saved ones."""
    mesh = init_device_mesh("cpu", (world,))

    class WithExtraState(torch.nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            base = torch.arange(0, 4, dtype=torch.float32) * scale
            self.sdt = torch.nn.Parameter(distribute_tensor(base, mesh, [Shard(0)]))
            self.rdt = torch.nn.Parameter(distribute_tensor(base + 4 * scale, mesh, [Replicate()]))
            self.extra = {
                "extra_state": int(scale),
                "extra_state_tensor": torch.zeros(1) + scale - 1,
            }

        def get_extra_state(self) -> dict[str, Any]:
            return self.extra

        def set_extra_state(self, state: dict[str, Any]) -> None:
            self.extra = state

    saved = WithExtraState(1.0)
    path = paths.next()
    save(way, saved.state_dict(), path)
    target = WithExtraState(10.0).state_dict()
    load(way, target, path)
    same(target["sdt"].to_local(), saved.sdt.to_local(), "sdt")
    same(target["rdt"].to_local(), saved.rdt.to_local(), "rdt")
    assert target["_extra_state"]["extra_state"] == 1, target["_extra_state"]
    same(target["_extra_state"]["extra_state_tensor"], torch.tensor([0.0]), "extra tensor")


def _placements_round_trip(
    way: str, paths: Paths, save_mesh: Any, save_pl: Any, load_mesh: Any, load_pl: Any
) -> None:
    whole = global_4x4()
    saved = distribute_tensor(whole, save_mesh, save_pl)
    path = paths.next()
    save(way, {"dtensor": saved}, path)
    got = {"dtensor": dtensor_zeros([4, 4], device_mesh=load_mesh, placements=load_pl)}
    load(way, got, path)
    back = got["dtensor"]
    same(
        back.redistribute(load_mesh, [Replicate()] * len(load_pl)).to_local(),
        whole,
        f"{save_pl} -> {load_pl}",
    )
    if load_mesh is save_mesh:  # and back to the saved placement, shard for shard
        same(back.redistribute(save_mesh, save_pl).to_local(), saved.to_local(), "local")


def case_1d_to_1d_reshard_placement_change(way: str, paths: Paths, world: int) -> None:
    """test_dtensor_resharding.py::test_1d_to_1d_reshard_placement_change (both params)."""
    mesh = init_device_mesh("cpu", (world,))
    for src, dst in itertools.permutations(ONE_D, 2):
        _placements_round_trip(way, paths, mesh, src, mesh, dst)


def case_2d_to_2d_reshard_placement_change(way: str, paths: Paths, world: int) -> None:
    """test_dtensor_resharding.py::test_2d_to_2d_reshard_placement_change (all 12 pairs;
    the mesh is (2, world // 2) as upstream: (2, 1) on two ranks)."""
    mesh = init_device_mesh("cpu", (2, world // 2))
    for src, dst in itertools.permutations(TWO_D, 2):
        _placements_round_trip(way, paths, mesh, src, mesh, dst)


def case_1d_to_2d_reshard_mesh_change(way: str, paths: Paths, world: int) -> None:
    """test_dtensor_resharding.py::test_1d_to_2d_reshard_mesh_change."""
    mesh_1d = init_device_mesh("cpu", (world,))
    mesh_2d = init_device_mesh("cpu", (2, world // 2))
    for src, dst in itertools.product(ONE_D, TWO_D):
        _placements_round_trip(way, paths, mesh_1d, src, mesh_2d, dst)


def case_2d_to_1d_reshard_mesh_change(way: str, paths: Paths, world: int) -> None:
    """test_dtensor_resharding.py::test_2d_to_1d_reshard_mesh_change."""
    mesh_1d = init_device_mesh("cpu", (world,))
    mesh_2d = init_device_mesh("cpu", (2, world // 2))
    for src, dst in itertools.product(TWO_D, ONE_D):
        _placements_round_trip(way, paths, mesh_2d, src, mesh_1d, dst)


def case_different_ordered_state_dict_keys(way: str, paths: Paths, world: int) -> None:
    """e2e/test_e2e_save_and_load.py::test_different_ordered_state_dict_keys: ranks list
    the same stateful objects in different orders, and their ``load_state_dict`` runs
    collectives; a load that followed each rank's own order would deadlock."""
    rank = dist.get_rank()

    class Gathers:
        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            out = [torch.ones(2, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(out, torch.arange(2, dtype=torch.int64) + 1 + 2 * rank)

    class Reduces:
        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            dist.all_reduce(torch.arange(2, dtype=torch.int64) + 1 + 2 * rank)

    state = {"A": Gathers(), "B": Reduces()}
    if rank % 2:
        state = {"B": state["B"], "A": state["A"]}
    path = paths.next()
    save(way, state, path)
    load(way, state, path)


def case_one_rank_fails_to_save(way: str, paths: Paths, world: int) -> None:
    """test_checkpoint.py::test_save_error_handling: one rank's failure fails the save on
    every rank (no rank hangs, nothing is committed) and names the failing rank."""
    rank = dist.get_rank()
    path = paths.next()
    state: dict[str, Any] = {f"x{rank}": torch.ones(2)}
    if rank == world - 1:
        state["bad"] = [lambda: None]  # DCP fails to pickle it writing; ckptstore, staging
    if way == "dcp":
        with pytest.raises(CheckpointException) as info:
            save(way, state, path)
        assert set(info.value.failures) == {world - 1}, info.value.failures
    elif rank == world - 1:  # its own error; the others hear which rank failed
        with pytest.raises(ckptstore.UnsupportedStateError, match="bad"):
            save(way, state, path)
    else:
        with pytest.raises(ckptstore.CkptStoreError, match=f"rank {world - 1} could not stage"):
            save(way, state, path)
    dist.barrier()
    with pytest.raises(ckptstore.CheckpointNotFoundError):  # nothing was committed
        read_manifest(open_backend(os.path.dirname(path)), os.path.basename(path))


def case_every_rank_fails_to_load_a_missing_checkpoint(way: str, paths: Paths, world: int) -> None:
    """test_checkpoint.py::test_load_error_handling (read_metadata failing): a load of a
    checkpoint that is not there fails on every rank, with ckptstore's reason."""
    path = paths.next()
    raises = CheckpointException if way == "dcp" else ckptstore.CheckpointNotFoundError
    with pytest.raises(raises, match="no committed checkpoint"):
        load(way, {"x": torch.zeros(2)}, path)


def case_async_process_save_fails_then_serves_again(way: str, paths: Paths, world: int) -> None:
    """test_async_process_executor.py::test_checkpoint_save_failure_continues_serving:
    a process-based ``dcp.async_save`` that fails (here: its target is a committed
    checkpoint) reports the failure through its future; the next one succeeds. DCP only:
    ckptstore.save has no process-based mode."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    g = torch.Generator().manual_seed(5)  # the same on every rank: replicated
    state = {
        "model": {"weight": torch.randn(4, 4, generator=g), "bias": torch.randn(4, generator=g)},
        "optimizer": {"param_groups": [{"lr": 0.01}]},
        "epoch": 5,
    }
    taken = paths.next()
    ckptstore.save(state, taken)
    fut = dcp.async_save(
        state,
        storage_writer=StorageWriter(taken),
        async_checkpointer_type=AsyncCheckpointerType.PROCESS,
    )
    error = fut.exception(timeout=120)
    assert error is not None and "already committed" in str(error), error
    fresh = paths.next()
    fut = dcp.async_save(
        state,
        storage_writer=StorageWriter(fresh),
        async_checkpointer_type=AsyncCheckpointerType.PROCESS,
    )
    fut.result(timeout=120)
    got = {
        "model": {"weight": torch.zeros(4, 4), "bias": torch.zeros(4)},
        "optimizer": {"param_groups": [{"lr": 0.0}]},
        "epoch": 0,
    }
    ckptstore.load(got, fresh)
    assert got["epoch"] == 5 and got["optimizer"] == state["optimizer"], got
    same(got["model"]["weight"], state["model"]["weight"], "weight")


case_async_process_save_fails_then_serves_again.ways = ("dcp",)  # type: ignore[attr-defined]


CASES: dict[str, Callable[[str, Paths, int], None]] = {
    name[len("case_") :]: fn for name, fn in globals().items() if name.startswith("case_")
}


def run_all(ckpts: str, rank: int, world: int) -> None:
    os.makedirs(ckpts, exist_ok=True)
    results: dict[str, str | None] = {}
    for name, case in CASES.items():
        for way in getattr(case, "ways", WAYS):
            print(f"case {name}/{way}", flush=True)
            try:
                case(way, Paths(ckpts, name, way), world)
                results[f"{name}/{way}"] = None
            except Exception as exc:
                traceback.print_exc()
                results[f"{name}/{way}"] = f"{type(exc).__name__}: {exc}"[:2000]
            dist.barrier()
    with open(os.path.join(ckpts, f"results-{rank}.json"), "w") as f:
        json.dump(results, f)
