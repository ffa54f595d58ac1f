"""Issue 15: states of many small tensors are stored in packs (``ckptstore/dcp/packs.py``):
one DCP item, one shard entry and checksum per group, while ``.metadata`` still lists
every tensor. Each reader gets the state back as saved; damage is caught."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import assert_same, blank_like
from test_distributed import run_ranks

import ckptstore
from ckptstore.cli.info import shard_items
from ckptstore.dcp import packs
from ckptstore.engine.ops import read_dcp_metadata, read_manifest
from ckptstore.errors import CorruptCheckpointError
from ckptstore.storage import open_backend


def many(n: int = packs.PACK_FROM + 50, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.float16]
    model = {
        f"block{i}.w": torch.randn(1 + i % 37, generator=g).to(dtypes[i % 4]) for i in range(n)
    }
    model["zero"] = torch.empty(0, 3)
    model["scalar"] = torch.tensor(3.5)
    model["flags"] = torch.tensor([True, False, True])
    model["big"] = torch.randn(40_000, generator=g)  # > SMALL_BYTES: stored on its own
    return {"model": model, "step": 7, "names": ["a", "b"]}


def stored_items(root, name: str) -> tuple[int, list[str]]:
    backend = open_backend(root)
    manifest = read_manifest(backend, name)
    metadata = read_dcp_metadata(backend, name, manifest)
    items, problems = shard_items(backend, name, manifest)
    assert not problems
    return sum(len(v) for v in items.values()), list(metadata.state_dict_metadata)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_many_small_tensors_round_trip_through_every_reader(tmp_path, codec):
    state = many()
    ckptstore.save(state, tmp_path / "c", codec=codec)
    n_items, listed = stored_items(tmp_path, "c")
    assert n_items < 10  # a few packs, the big tensor, two values: not one per tensor
    assert not any(k.startswith(packs.PACK_PREFIX) for k in listed)  # members are listed
    assert len(listed) == len(state["model"]) + 2  # and "step", "names"
    target = blank_like(state)
    ckptstore.load(target, tmp_path / "c")
    assert_same(target, state)
    assert_same(ckptstore.read(tmp_path / "c"), state)
    lazy = ckptstore.read(tmp_path / "c", lazy=True)
    assert torch.equal(lazy["model"]["block5.w"], state["model"]["block5.w"])
    assert_same(lazy.materialize(), state)


def test_packed_tensors_load_through_dcp_into_other_dtypes_and_partial_targets(tmp_path):
    import torch.distributed.checkpoint as dcp

    from ckptstore.integrations.dcp import StorageReader

    state = many()
    ckptstore.save(state, tmp_path / "c")
    wide = {"model": {k: v.double() for k, v in list(state["model"].items())[:200]}}
    got = blank_like(wide)
    ckptstore.load(got, tmp_path / "c", allow_partial=True, allow_cast=True)  # the DCP path
    assert_same(got, wide)
    got = blank_like(wide)
    dcp.load(got, storage_reader=StorageReader(tmp_path / "c"))
    assert_same(got, wide)


def test_the_manager_saves_and_restores_packed_state(tmp_path):
    state = many()
    with ckptstore.Checkpointer(tmp_path / "root") as ckpt:
        ckpt.save_async(state, 3).wait()
        target = blank_like(state)
        ckpt.load(target)
    assert_same(target, state)


def test_damage_inside_a_pack_is_caught(tmp_path):
    state = many()
    ckptstore.save(state, tmp_path / "c", codec="none")
    shard = next(p for p in os.listdir(tmp_path / "c") if p.endswith(".distcp"))
    with open(tmp_path / "c" / shard, "r+b") as f:
        f.seek(200)  # inside the first pack's bytes
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError):
        ckptstore.load(blank_like(state), tmp_path / "c")
    from ckptstore.cli.main import main as cli

    assert cli(["verify", str(tmp_path / "c")]) != 0  # verify finds it too


def test_a_range_outside_its_pack_is_refused():
    with pytest.raises(ValueError, match="bad range"):
        packs.member_range({"range": [0, 5]}, 4)
    with pytest.raises(ValueError, match="bad range"):
        packs.member_range({"range": [-1, 4]}, 4)
    assert packs.member_range({"file": "x", "item": 0}, 4) is None


def test_two_ranks_pack_shared_and_own_tensors_and_reload_on_one(tmp_path):
    run_ranks("packs_save", str(tmp_path), 2)
    from dist_worker import packed_state

    for rank in range(2):
        want = packed_state(rank)
        got = blank_like(want)
        ckptstore.load(got, tmp_path / "ckpts" / "packed")
        assert_same(got, want)
    with open(tmp_path / "ckpts" / "packed" / "manifest.json") as f:
        assert json.load(f)["world_size"] == 2


def test_parameters_that_require_grad_load_in_place(tmp_path):
    """Loading into ``nn.Parameter``s (a state dict of module.named_parameters()),
    stored whole and packed: filled in place, still requiring grad."""
    one = {"w": torch.nn.Parameter(torch.randn(5))}
    many_params = {f"p{i}": torch.nn.Parameter(torch.randn(3)) for i in range(packs.PACK_FROM)}
    for name, state in (("one", one), ("many", many_params)):
        ckptstore.save(state, tmp_path / name)
        target = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in state.items()}
        ckptstore.load(target, tmp_path / name)
        for k, v in state.items():
            assert torch.equal(target[k], v) and target[k].requires_grad


def test_staged_saves_pack_views_of_the_arena_and_plan_once_per_layout(tmp_path):
    """Checkpointer saves: each pack is a view of the staging arena (no copy), the
    grouping is planned once and reused while the layout holds, and every save still
    holds the state as it was at its own save call."""
    state = many()
    want = {}
    with ckptstore.Checkpointer(tmp_path / "root", codec="none") as ckpt:
        cache = ckpt._save_cache.packs
        ckpt.save_async(state, 1).wait()
        first = cache.plan
        assert first is not None and first.groups
        assert all(g.span is not None for g in first.groups)  # every group lies in order
        want[1] = {k: v.clone() for k, v in state["model"].items()}
        for step in (2, 3):
            state["model"]["block3.w"].add_(1)
            state["model"]["block300.w"].mul_(-1)
            ckpt.save_async(state, step).wait()
            want[step] = {k: v.clone() for k, v in state["model"].items()}
        assert cache.plan is first  # the same layout: planned once
        state["model"]["added"] = torch.arange(5.0)  # a new layout: planned again
        ckpt.save_async(state, 4).wait()
        want[4] = {k: v.clone() for k, v in state["model"].items()}
        assert cache.plan is not first
        for step, model in want.items():
            target = blank_like({**state, "model": model})
            ckpt.load(target, step=step)
            assert_same(target["model"], model)
    from ckptstore.cli.main import main as cli

    assert cli(["verify", str(tmp_path / "root")]) == 0


def test_a_pack_is_a_view_only_of_members_in_order_and_gaps_are_zero():
    arena = torch.zeros(64 * packs.PACK_FROM, dtype=torch.uint8)
    flat = {}
    at = 0
    for i in range(packs.PACK_FROM):
        n = 1 + i % 5  # 4-20 bytes: each member starts at the next multiple of 64
        view = arena[at : at + 4 * n].view(torch.float32)
        view.copy_(torch.arange(n, dtype=torch.float32) + i)
        flat[f"m.t{i}"] = view
        at += 64
    arena = arena[:at]
    out, got = packs.pack(flat, {}, arena=arena, layout=object(), cache=packs.PackCache())
    [(name, members)] = got.items()
    assert out[name].data_ptr() == arena.data_ptr()  # a view, not a copy
    for m in members:
        raw = out[name][m.offset : m.offset + m.nbytes]
        assert torch.equal(raw.view(m.dtype).view(m.shape), flat[m.fqn])
    covered = torch.zeros(out[name].numel(), dtype=torch.bool)
    for m in members:
        covered[m.offset : m.offset + m.nbytes] = True
    assert not out[name][~covered].any()  # the alignment gaps are zero
    # One member elsewhere: the group is copied, at the same offsets
    flat["m.t7"] = flat["m.t7"].clone()
    out2, got2 = packs.pack(flat, {}, arena=arena, layout=object(), cache=packs.PackCache())
    [(name2, members2)] = got2.items()
    assert out2[name2].data_ptr() != arena.data_ptr()
    assert [m.offset for m in members2] == list(
        torch.cumsum(torch.tensor([0] + [m.nbytes for m in members2[:-1]]), 0).tolist()
    )
    assert name2 != name  # the offsets are part of the name: other bytes, other name
    for m in members2:
        raw = out2[name2][m.offset : m.offset + m.nbytes]
        assert torch.equal(raw.view(m.dtype).view(m.shape), flat[m.fqn])


def test_conj_and_neg_view_targets_load_the_saved_values(tmp_path):
    """A packed member is copied into its target as raw bytes; a target that is a conj
    or neg view goes through DCP instead, which honours the view (raw bytes would come
    back conjugated or negated)."""
    state = {f"c{i}": torch.randn(4, dtype=torch.complex64) for i in range(packs.PACK_FROM)}
    state["n0"] = torch.randn(5)
    state["big"] = torch.randn(40_000, dtype=torch.complex64)
    ckptstore.save(state, tmp_path / "c", codec="none")
    target = {k: torch.zeros_like(v).conj() for k, v in state.items() if v.is_complex()}
    target["n0"] = torch._neg_view(torch.zeros(5))
    ckptstore.load(target, tmp_path / "c")
    for k, v in state.items():
        assert torch.equal(target[k], v), k
