"""Issue 17: saves after the first of a layout reuse DCP's plans (``dcp.plancache``):
the ranks send a generation instead of their plans and results, the coordinator reuses
the global plan, the metadata and the item table. Each checkpoint must still be exactly
what a save planned from scratch writes."""

from __future__ import annotations

import json

import torch
from test_distributed import run_ranks

import ckptstore
from ckptstore.dcp import metadata as md_format
from ckptstore.dcp.plancache import PlanCache


def _state(step: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {f"w{i}": torch.randn(64, 8, generator=g) for i in range(4)},
        "small": {f"b{i}": torch.randn(3, generator=g) for i in range(200)},  # packed
        "step": step,
    }


def _metadata(root, step: int):
    ckpt = root / f"step_{step:08d}"
    return md_format.loads((ckpt / ".metadata").read_bytes(), str(ckpt))


def test_one_process_reuses_the_plan_and_writes_what_a_fresh_plan_writes(tmp_path):
    with ckptstore.Checkpointer(tmp_path / "cached", codec="zstd") as ck:
        cache: PlanCache = ck._save_cache.plans
        for step in (1, 2, 3):
            ck.save(_state(step), step)
        assert (cache.saves, cache.reused) == (3, 2)
        grown = _state(4)
        grown["model"]["w9"] = torch.ones(2)  # a new layout: planned again
        ck.save(grown, 4)
        ck.save(grown, 5)
        assert (cache.saves, cache.reused) == (5, 3)
        assert ck.verify(3) == [] and ck.verify(5) == []
    fresh = tmp_path / "fresh"
    for step in (3, 5):  # the same states saved by one-shot saves (no cache)
        ckptstore.save(_state(3) if step == 3 else grown, fresh / f"step_{step:08d}", codec="zstd")
    for step in (3, 5):
        a, b = _metadata(tmp_path / "cached", step), _metadata(fresh, step)
        assert a.state_dict_metadata == b.state_dict_metadata
        assert a.planner_data == b.planner_data
        assert a.storage_data == b.storage_data
    for step in (1, 3):
        got = {"model": {k: torch.zeros_like(v) for k, v in _state(step)["model"].items()}}
        got["small"] = {k: torch.zeros_like(v) for k, v in _state(step)["small"].items()}
        got["step"] = 0
        ckptstore.load(got, tmp_path / "cached" / f"step_{step:08d}")
        want = _state(step)
        for top in ("model", "small"):
            for k, v in want[top].items():
                assert torch.equal(got[top][k], v), (step, k)
        assert got["step"] == step


def test_a_failed_save_empties_the_cache(tmp_path):
    with ckptstore.Checkpointer(tmp_path, codec="none") as ck:
        cache: PlanCache = ck._save_cache.plans
        ck.save(_state(1), 1)
        ck.save(_state(2), 2)
        assert cache.reused == 1
        try:
            ck.save(_state(3), 2)  # a step that exists: refused by the commit
        except ckptstore.errors.CkptStoreError:
            pass
        else:
            raise AssertionError("saving step 2 twice should fail")
        assert cache.gen is None  # forgotten: the next save plans from scratch
        ck.save(_state(3), 3)
        ck.save(_state(4), 4)
        assert (cache.saves, cache.reused) == (4, 2)
        assert ck.verify(4) == []


def test_ranks_reuse_plans_on_shared_and_node_local_roots(tmp_path):
    run_ranks("plan_cache", str(tmp_path), 2)
    ckpts = tmp_path / "ckpts"
    reports = [json.loads((ckpts / f"plans-{r}.json").read_text()) for r in range(2)]
    # Per save, the plans reused so far. Shared root: save 2 stages less than save 1
    # (replicas skip what another rank wrote: issue 18), so its plan differs; 3 and 4
    # reuse. Node-local roots: each rank writes its own copy, nothing is skipped, so 2
    # reuses already. Save 5 changes the layout; 7 fails (the coordinator forgot its
    # plans while the other rank sent a reference to them); 8 plans from scratch; at 10
    # rank 1 forgot and sends its whole plan: planned again, no failure; 11 reuses.
    # 12: rank 1 cannot stage, the save fails on both; 13 plans from scratch (not "out
    # of step"), 14 reuses (node-local) or plans once more (shared: replicas skip again).
    want = {
        "shared": [0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3],
        "local": [0, 1, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6, 7],
    }
    for report in reports:
        for kind in ("shared", "local"):
            got = report[kind]
            assert got["reused"][:14] == want[kind], (kind, got)
            failed = got["failed"][:2]
            assert [f.split(":")[0] for f in failed] == ["7", "12"], failed
            assert "out of step" in failed[0], failed
            assert "out of step" not in failed[1], failed
    # Node-local roots (each rank its own disk): rank 1 commits its disk's part, and is
    # sent its .metadata's body only when it does not hold it: the first save of each
    # layout (1, 5), and after a failed commit (15: rank 1's part failed, so 16); else
    # the tail alone (saves 7 and 12 failed before any part was handed out, and 8 and
    # 13, planned again, made the same .metadata).
    bodies = reports[1]["local"]["bodies"]
    assert reports[1]["shared"]["bodies"] == [] and reports[0]["local"]["bodies"] == []
    sent = [n > 0 for n in bodies]
    steps = [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16]
    assert [s for s, whole in zip(steps, sent, strict=True) if whole] == [1, 5, 16], bodies
    local = reports[0]["local"]
    assert [f.split(":")[0] for f in local["failed"]] == ["7", "12", "15"], local["failed"]
    # On one root, every committed checkpoint verifies from the command line.
    from ckptstore.cli.main import main as cli

    assert cli(["verify", str(ckpts / "shared")]) == 0


def test_object_store_roots_reuse_plans_with_files_named_per_attempt():
    """Object stores name each attempt's files anew: the reused item table must point
    at this save's files, not the last one's."""
    import uuid

    from ckptstore.engine.listing import read_manifest
    from ckptstore.engine.ops import read_dcp_metadata

    url = f"memory://plan-cache-{uuid.uuid4().hex[:8]}/run"
    with ckptstore.Checkpointer(url, codec="none") as ck:
        for step in (1, 2, 3):
            ck.save(_state(step), step)
        assert ck._save_cache.plans.reused == 2
        seen = set()
        for step in (2, 3):
            name = f"step_{step:08d}"
            manifest = read_manifest(ck._backend, name)
            md = read_dcp_metadata(ck._backend, name, manifest)
            files = {stored["file"] for stored in md.storage_data.values()}
            assert files <= set(manifest.files), (files, manifest.files)
            assert not files & seen  # this attempt's names, not the last save's
            seen |= files
            assert ck.verify(step) == []
            got = {top: {k: torch.zeros_like(v) for k, v in _state(step)[top].items()}
                   for top in ("model", "small")}  # fmt: skip
            got["step"] = 0
            ck.load(got, step=step)
            for top in ("model", "small"):
                for k, v in _state(step)[top].items():
                    assert torch.equal(got[top][k], v), (step, k)


def test_node_local_parts_tables_are_one_table_and_each_parts_changes():
    """``Outcome.part_tables`` gives, for every part, exactly the table ``storage``
    builds for it alone (its own copy of what ranks on several disks wrote, the one
    writer's entry for the rest), for random layouts of writers over 4 ranks on 2-3
    disks; and the tables are kept while the files stay the same."""
    import random

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.storage import WriteResult

    from ckptstore.dcp.plancache import Outcome

    rng = random.Random(7)
    for _ in range(50):
        world = 4
        disks = [rng.randrange(3) for _ in range(world)]
        results: list[list[WriteResult]] = [[] for _ in range(world)]
        for i in range(40):
            for r in rng.sample(range(world), rng.randint(1, world)):
                results[r].append(
                    WriteResult(
                        MetadataIndex(f"t{i}"),
                        1,
                        {"file": f"__{r}_0.distcp", "item": len(results[r])},
                    )
                )
        for r in range(world):
            if results[r]:
                shard = {"size_bytes": 1, "xxh3_64": "0", "raw_bytes": 1}
                results[r][0].storage_data["shard"] = shard
        outcome = Outcome.of(results)
        parts = tuple(tuple(r for r in range(world) if disks[r] == d) for d in dict.fromkeys(disks))
        common, changes = outcome.part_tables(parts)
        for ranks, change in zip(parts, changes, strict=True):
            others = tuple(r for r in range(world) if r not in ranks)
            assert {**common, **change} == outcome.storage(ranks, others)
        assert outcome.part_tables(parts)[0] is common  # kept while the files are the same


def test_node_local_parts_metadata_reads_as_a_whole_table_per_part():
    """Each node-local part's .metadata as saves write it (one shared body, the part's
    head and tail: MetadataCache.dumps_part) reads back, with stock pickle and the
    allowlist, as the metadata built from that part's whole table (the way it was built
    before), with packs that ranks made differently, items some ranks did not write,
    and files renamed (object stores); its digest is the file's, and a part's idents
    hold from save to save."""
    import dataclasses
    import pickle
    import random

    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )
    from torch.distributed.checkpoint.storage import WriteResult

    from ckptstore.dcp import packs as packs_mod
    from ckptstore.dcp.plancache import Outcome
    from ckptstore.format.checksum import digest

    rng = random.Random(1)
    members = [f"m{i}" for i in range(12)]
    for trial in range(60):
        packs = {
            f"__ckptstore_pack_{j}": tuple(
                packs_mod.Member(f, torch.float32, (2,), 16 * k, 8)
                for k, f in enumerate(rng.sample(members, rng.randint(1, 5)))
            )
            for j in range(5)
        }
        names = [*packs, *(f"t{i}" for i in range(6)), *rng.sample(members, 2)]
        world = rng.randint(2, 6)
        disks = [rng.randrange(3) for _ in range(world)]
        results: list[list[WriteResult]] = [[] for _ in range(world)]
        for name in names:
            if rng.random() < 0.15:
                continue  # nobody wrote it
            for r in rng.sample(range(world), rng.randint(1, world)):
                index = MetadataIndex(name, torch.Size([0]))
                data = {"file": f"__{r}_0.distcp", "item": len(results[r])}
                results[r].append(WriteResult(index, 1, data))
        for r in range(world):
            if results[r]:
                shard = {"size_bytes": 1, "xxh3_64": "0", "raw_bytes": 1}
                results[r][0].storage_data["shard"] = shard
        written = {wr.index.fqn for rs in results for wr in rs}
        props = TensorProperties(dtype=torch.float32)
        chunk = [ChunkStorageMetadata(torch.Size([0]), torch.Size([2]))]
        items = {n: TensorStorageMetadata(props, torch.Size([2]), chunk) for n in written}
        base = Metadata(state_dict_metadata=items, planner_data={})

        def made(table, base=base, packs=packs):
            md = dataclasses.replace(
                base, state_dict_metadata=dict(base.state_dict_metadata), storage_data=dict(table)
            )
            packs_mod.expand(md, packs)
            return md

        parts = tuple(tuple(r for r in range(world) if disks[r] == d) for d in dict.fromkeys(disks))
        memo: dict = {}
        cache = md_format.MetadataCache()
        idents: dict = {}
        for save in range(3):
            if save < 2:
                outcome = Outcome([f for f in Outcome.of(results).facts], results, memo)
            else:  # an object store: the same items in files named anew
                renamed = [None if f is None else (f[0] + "-b", f[1]) for f in outcome.facts]
                outcome = Outcome(renamed, None, memo)
            common, changes = outcome.part_tables(parts, packs_mod.expander(packs, items))
            meta = StorageMeta(checkpoint_id=f"step_{save}")
            for p, (ranks, change) in enumerate(zip(parts, changes, strict=True)):
                others = tuple(r for r in range(world) if r not in ranks)
                if save < 2:
                    want = made(outcome.storage(ranks, others))
                else:
                    table = Outcome.of(results).storage(ranks, others)
                    table = {k: {**v, "file": v["file"] + "-b"} for k, v in table.items()}
                    want = made(table)
                want.storage_meta = meta
                pp = cache.dumps_part(("k", save // 2), lambda c=common: made(c), meta, p, change)
                data = pp.body + pp.head + pp.tail
                assert cache.digest_part(p, pp) == digest(data)
                if save == 1:
                    assert idents[p] == (pp.shared, pp.ident)  # held from save to save
                idents[p] = (pp.shared, pp.ident)
                for got in (pickle.loads(data), md_format.loads(data, "test")):
                    assert got == want, (trial, save, p)


def test_dcp_makes_a_local_plan_once_per_layout(tmp_path, monkeypatch):
    """A local plan depends only on the state's layout (dcp.planner.LocalPlans): DCP
    makes it for the first save of a layout, and again whenever the layout changes."""
    from torch.distributed.checkpoint import default_planner

    made = []
    real = default_planner.create_default_local_save_plan

    def counted(state_dict, is_coordinator):
        made.append(len(state_dict))
        return real(state_dict, is_coordinator)

    monkeypatch.setattr(default_planner, "create_default_local_save_plan", counted)
    recast = _state(4)
    recast["model"]["w1"] = recast["model"]["w1"].double()  # same keys and shapes
    with ckptstore.Checkpointer(tmp_path, codec="none", max_inflight=2) as ck:
        for step in (1, 2, 3):
            ck.save_async(_state(step), step)  # two arenas in turn
        ck.wait()
        assert len(made) == 1, made
        ck.save(recast, 4)
        ck.save(_state(5), 5)  # the first layout again: a new layout object
        assert len(made) == 3, made
        got = {"model": {k: torch.zeros_like(v) for k, v in recast["model"].items()}}
        got["small"] = {k: torch.zeros_like(v) for k, v in recast["small"].items()}
        got["step"] = 0
        ck.load(got, 4)
    assert got["model"]["w1"].dtype == torch.float64
    assert torch.equal(got["model"]["w1"], recast["model"]["w1"]), "planned as the old dtype"


def test_a_staged_state_is_set_up_as_dcp_would_without_walking_it(monkeypatch):
    """StagedSavePlanner skips DCP's flattening of a staged (flat) state: the state,
    mappings and local plan are what DCP's own set-up gives; a nested state still goes
    through DCP's walk."""
    from torch.distributed.checkpoint import default_planner
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from ckptstore.dcp.planner import SerializedValue, StagedSavePlanner

    flat = {
        "model.w": torch.randn(4, 3),
        "model.b": torch.zeros(3, dtype=torch.bfloat16),
        "optim.param_groups": SerializedValue(b"x"),
    }
    mappings = {k: tuple(k.split(".")) for k in flat}
    ours, dcps = StagedSavePlanner(mappings), DefaultSavePlanner()
    dcps.set_up_planner(flat, is_coordinator=True)
    walks = []
    real = default_planner.flatten_state_dict
    monkeypatch.setattr(
        default_planner, "flatten_state_dict", lambda sd: walks.append(1) or real(sd)
    )
    ours.set_up_planner(flat, is_coordinator=True)
    assert not walks
    assert ours.state_dict == dcps.state_dict and ours.state_dict is not flat
    assert ours.is_coordinator is True and ours.mappings is mappings
    assert ours.create_local_plan().items == dcps.create_local_plan().items

    nested = {"model": {"w": torch.randn(2)}, "step": 3}
    planner = StagedSavePlanner({"model.w": ("model", "w"), "step": ("step",)})
    planner.set_up_planner(nested)
    assert set(planner.state_dict) == {"model.w", "step"} and walks


def test_a_sharded_tensor_is_refused_by_name_and_never_taken_for_a_staged_tensor(monkeypatch):
    """ShardedTensor is a torch.Tensor subclass: staging names it (it used to fail deep
    in its tensor checks), and the planner does not take it for a staged tensor."""
    import pytest
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from ckptstore.dcp.planner import _STAGED, StagedSavePlanner

    assert issubclass(ShardedTensor, torch.Tensor) and ShardedTensor not in _STAGED
    # One needs a process group to be made; a subclass of the same name stands for it
    # (staging tells it by name)
    fake = torch.Tensor._make_subclass(type("ShardedTensor", (torch.Tensor,), {}), torch.zeros(2))
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    walked = []
    monkeypatch.setattr(  # DCP's own set-up: the walks
        DefaultSavePlanner, "set_up_planner", lambda *args: walked.append(1)
    )
    StagedSavePlanner({}).set_up_planner({"st": fake})
    assert walked
    from ckptstore.engine.layout_cache import plan_layout

    with pytest.raises(ckptstore.UnsupportedStateError, match=r"\['st'\] is a ShardedTensor"):
        plan_layout({"st": fake})
