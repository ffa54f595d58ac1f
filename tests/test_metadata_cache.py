"""Issue 15: the pickled ``.metadata`` of the last save is reused while all but its
``storage_meta`` is the same (``MetadataCache``). The file stays one ordinary pickle:
stock ``pickle`` and ckptstore's allowlist read it, with this save's name and id."""

from __future__ import annotations

import pickle

import torch
from helpers import assert_same, blank_like
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

import ckptstore
from ckptstore.dcp import metadata as md_format


def metadata(n: int, dtype: torch.dtype = torch.float32) -> Metadata:
    items = {
        f"t{i}": TensorStorageMetadata(
            TensorProperties(dtype=dtype),
            torch.Size([i + 1]),
            [ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([i + 1]))],
        )
        for i in range(n)
    }
    storage = {
        MetadataIndex(f"t{i}", torch.Size([0])): md_format.StoredItem(
            {"file": "__0_0.distcp", "item": i, "range": [8 * i, 4]}
        )
        for i in range(n)
    }
    return Metadata(items, planner_data={"t0": ("t0",)}, storage_data=storage)


def test_the_same_metadata_is_pickled_once_and_read_back_with_each_saves_name():
    cache = md_format.MetadataCache()
    made = []

    def make(dtype=torch.float32):
        def build():
            made.append(dtype)
            return metadata(50, dtype)

        return build

    outs = []
    for step in (1, 2):
        meta = StorageMeta(checkpoint_id=f"step_{step}", save_id=f"id{step}")
        outs.append(cache.dumps("", ("k", 50), make(), meta))
    assert len(made) == 1  # the second save reused the first's pickle
    plain = metadata(50)
    for step, data in zip((1, 2), outs, strict=True):
        for got in (pickle.loads(data), md_format.loads(data, "test")):
            assert isinstance(got, Metadata)
            assert got.storage_meta == StorageMeta(
                checkpoint_id=f"step_{step}", save_id=f"id{step}"
            )
            assert got.state_dict_metadata == plain.state_dict_metadata
            assert got.storage_data == plain.storage_data
            assert got.planner_data == plain.planner_data
    # Another key (another layout, another part): made and pickled again.
    data = cache.dumps("", ("k", 51), make(torch.float16), StorageMeta(checkpoint_id="s3"))
    assert made == [torch.float32, torch.float16]
    got = md_format.loads(data, "test")
    assert got.state_dict_metadata["t0"].properties.dtype == torch.float16
    assert got.storage_meta.checkpoint_id == "s3"
    cache.dumps("other disk", ("k", 51), make(torch.float16), None)
    assert len(made) == 3  # each part keeps its own


def test_parts_share_one_pickled_body_and_differ_by_a_head_that_patches_their_table():
    """Node-local parts: one body pickled once, each part's head sets its own entries
    (more than one SETITEMS batch of them) in the item table, keeping its order, and
    is made once while its changes hold; stock pickle and the allowlist read each file
    as the whole table it stands for, and its digest is the file's."""
    from ckptstore.format.checksum import digest

    cache = md_format.MetadataCache()
    made = []

    def make():
        made.append(1)
        return metadata(3000)

    plain = metadata(3000)
    keys = list(plain.storage_data)
    patches = {
        "a": {},
        "b": {
            k: md_format.StoredItem({"file": "__2_0.distcp", "item": j})
            for j, k in enumerate(keys[::2])
        },
        "c": {keys[7]: md_format.StoredItem({"file": "__3_0.distcp", "item": 0})},
    }
    shared, idents = set(), {}
    for step in (1, 2):
        meta = StorageMeta(checkpoint_id=f"step_{step}")
        for part, patch in patches.items():
            pp = cache.dumps_part(("k",), make, meta, part, dict(patch))
            shared.add((pp.shared, pp.body))
            idents.setdefault(part, set()).add(pp.ident)
            data = pp.body + pp.head + pp.tail
            assert cache.digest_part(part, pp) == digest(data)
            want = {**plain.storage_data, **patch}
            for got in (pickle.loads(data), md_format.loads(data, "test")):
                assert got.storage_data == want
                assert list(got.storage_data) == keys
                assert got.storage_meta == meta
                assert got.state_dict_metadata == plain.state_dict_metadata
    assert len(made) == 1
    assert len(shared) == 1  # one body for every part and both saves
    assert all(len(i) == 1 for i in idents.values())  # each part's head made once
    assert len({i for ids in idents.values() for i in ids}) == 3
    # A part whose changes change gets a new head (and ident), the body stays.
    pp = cache.dumps_part(("k",), make, StorageMeta(), "c", {})
    assert pp.ident not in idents["c"] and pp.head == b"" and len(made) == 1


def test_saves_of_a_changing_state_each_write_their_own_metadata(tmp_path):
    """Saves of one layout, then of another (a dtype, then a shape changed): each
    checkpoint's .metadata describes its own state."""
    state = {"model": {f"w{i}": torch.randn(3 + i % 4) for i in range(300)}, "b": torch.ones(9)}
    want = {}
    with ckptstore.Checkpointer(tmp_path, codec="none") as ckpt:
        for step in range(1, 5):
            if step == 3:
                state["b"] = state["b"].double()
            if step == 4:
                state["model"]["w5"] = torch.randn(11)
            state["model"]["w0"].add_(step)
            ckpt.save_async(state, step).wait()
            want[step] = {
                "model": {k: v.clone() for k, v in state["model"].items()},
                "b": state["b"].clone(),
            }
        for step, saved in want.items():
            with open(tmp_path / f"step_{step:08d}" / ".metadata", "rb") as f:
                md = pickle.load(f)
            assert md.storage_meta.checkpoint_id == f"step_{step:08d}"
            assert md.state_dict_metadata["b"].properties.dtype == saved["b"].dtype
            assert md.state_dict_metadata["model.w5"].size == saved["model"]["w5"].shape
            got = blank_like(saved)
            ckpt.load(got, step=step)
            assert_same(got, saved)
