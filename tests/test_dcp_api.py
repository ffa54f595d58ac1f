"""Issue 16, DCP-native users (torchtitan, plain DCP code): ckptstore's format behind
``dcp.save`` / ``dcp.async_save`` / ``dcp.load`` through the public
``ckptstore.integrations.dcp.StorageWriter`` / ``StorageReader``: single process, two
gloo ranks, reused writers, ``checkpoint_id=``, an existing empty directory, non-tensor
values, compression, a process-based async save."""

from __future__ import annotations

import io
import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import assert_same
from test_distributed import run_ranks
from torch.distributed.checkpoint.api import CheckpointException

import ckptstore
from ckptstore.engine.ops import read_manifest, verify
from ckptstore.errors import InvalidArgumentError
from ckptstore.integrations.dcp import StorageReader, StorageWriter
from ckptstore.storage import open_backend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def model_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 32, generator=g),
        "b": torch.randn(32, generator=g).to(torch.bfloat16),
        "step": 7 + seed,
        "meta": {"name": "run", "lrs": [0.1, 0.01]},
    }


def blank() -> dict:
    return {
        "w": torch.zeros(64, 32),
        "b": torch.zeros(32, dtype=torch.bfloat16),
        "step": 0,
        "meta": {"name": "", "lrs": [0.0, 0.0]},
    }


def checked(path) -> None:
    """A ckptstore checkpoint: a manifest, and every byte verifies."""
    backend = open_backend(path.parent)
    assert read_manifest(backend, path.name).world_size == 1
    assert verify(backend, path.name, None) == []


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_dcp_save_and_load_through_the_public_writer_and_reader(tmp_path, codec):
    path = tmp_path / "ckpt" / "step-100"
    state = model_state()
    dcp.save(state, storage_writer=StorageWriter(path, codec=codec))
    checked(path)
    got = blank()
    dcp.load(got, storage_reader=StorageReader(path))
    assert_same(got, state)
    again = blank()  # and ckptstore's own load reads it too
    ckptstore.load(again, path)
    assert_same(again, state)


def test_one_writer_and_reader_serve_many_checkpoint_ids(tmp_path):
    writer, reader = StorageWriter(), StorageReader()
    for n in range(3):
        dcp.save(model_state(n), checkpoint_id=tmp_path / f"step-{n}", storage_writer=writer)
    for n in range(3):
        got = blank()
        dcp.load(got, checkpoint_id=tmp_path / f"step-{n}", storage_reader=reader)
        assert_same(got, model_state(n))


def test_an_existing_empty_directory_is_taken_a_committed_checkpoint_is_not(tmp_path):
    path = tmp_path / "made-for-it"
    path.mkdir()
    dcp.save(model_state(), storage_writer=StorageWriter(path))
    checked(path)
    # DCP reports a rank's failure as its CheckpointException, holding ckptstore's error.
    with pytest.raises(CheckpointException, match=r"CheckpointExistsError.*already committed"):
        dcp.save(model_state(1), storage_writer=StorageWriter(path))
    got = blank()
    dcp.load(got, storage_reader=StorageReader(path))
    assert_same(got, model_state())  # untouched


def test_overwrite_replaces_a_committed_checkpoint_and_leaves_nothing_beside(tmp_path):
    path = tmp_path / "last"
    dcp.save(model_state(0), storage_writer=StorageWriter(path))
    writer = StorageWriter(path, overwrite=True)
    for seed in (1, 2):  # reused, as DCP's writers are
        dcp.save(model_state(seed), storage_writer=writer)
        checked(path)
        got = blank()
        dcp.load(got, storage_reader=StorageReader(path))
        assert_same(got, model_state(seed))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    ckptstore.save(model_state(3), path, overwrite=True)  # the one-shot API too
    got = blank()
    ckptstore.load(got, path)
    assert_same(got, model_state(3))


def test_a_replace_cut_short_loses_neither_copy(tmp_path):
    """The two moments a killed replace can leave behind: the new copy committed beside
    the old (killed before the switch), and, where the storage cannot swap names, the new
    copy beside a deleted old one. Readers find a complete checkpoint in both; the next
    replace cleans up."""
    path, beside = tmp_path / "last", tmp_path / "last.replacing"
    ckptstore.save(model_state(0), path)
    ckptstore.save(model_state(1), beside)  # killed before the switch
    got = blank()
    ckptstore.load(got, path)
    assert_same(got, model_state(0))
    dcp.save(model_state(2), storage_writer=StorageWriter(path, overwrite=True))
    assert not beside.exists()
    shutil.rmtree(path)  # killed between deleting the old and moving the new in
    ckptstore.save(model_state(3), beside)
    for read in (
        lambda got: ckptstore.load(got, path),
        lambda got: dcp.load(got, storage_reader=StorageReader(path)),
    ):
        got = blank()
        read(got)
        assert_same(got, model_state(3))
    assert ckptstore.read(path)["step"] == 10


def test_overwrite_on_an_object_store_moves_the_new_copy_in(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/last"
    ckptstore.save(model_state(0), url)
    for seed in (1, 2):
        dcp.save(model_state(seed), storage_writer=StorageWriter(url, overwrite=True))
        got = blank()
        ckptstore.load(got, url)
        assert_same(got, model_state(seed))
    assert open_backend(f"s3://{s3_bucket}").list_names() == ["last"]


def test_overwrite_never_deletes_what_is_not_a_checkpoint(
    tmp_path, monkeypatch, s3_server, s3_bucket
):
    """overwrite=True (Lightning's every save) deleted whatever directory the path
    named: a directory of the user's files, a checkpoint root (the path without its
    /step_N), the current directory. It replaces checkpoints and a dead save's files
    only."""
    from ckptstore.errors import CheckpointExistsError

    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "keep.txt").write_text("keep")
    root = tmp_path / "root"
    ckptstore.save(model_state(0), root / "step_00000010")
    monkeypatch.chdir(mine)
    for path in (mine, root, "."):
        with pytest.raises(CheckpointExistsError, match="is not a checkpoint: it holds"):
            ckptstore.save(model_state(1), path, overwrite=True)
        with pytest.raises(CheckpointException, match="is not a checkpoint"):
            dcp.save(model_state(1), storage_writer=StorageWriter(path, overwrite=True))
    assert (mine / "notes" / "keep.txt").read_text() == "keep"
    assert sorted(os.listdir(root)) == ["step_00000010"]
    got = blank()
    ckptstore.load(got, root / "step_00000010")
    assert_same(got, model_state(0))
    dead = tmp_path / "dead"  # a dead save's files, no manifest: replaced, as before
    dead.mkdir()
    (dead / "__0_0.distcp").write_bytes(b"half")
    ckptstore.save(model_state(2), dead, overwrite=True)
    got = blank()
    ckptstore.load(got, dead)
    assert_same(got, model_state(2))
    fs = s3_server.fs()  # on an object store: a prefix holding other objects
    fs.pipe_file(f"{s3_bucket}/data/train.csv", b"a,b")
    with pytest.raises(CheckpointExistsError, match=r"it holds train\.csv"):
        ckptstore.save(model_state(1), f"s3://{s3_bucket}/data", overwrite=True)
    assert fs.cat_file(f"{s3_bucket}/data/train.csv") == b"a,b"


def test_stock_dcp_pointed_at_a_ckptstore_checkpoint_says_what_to_use(tmp_path):
    ckptstore.save(model_state(), tmp_path / "c", codec="none")
    with pytest.raises(CheckpointException, match=r"ckptstore checkpoint.*StorageReader"):
        dcp.load(blank(), checkpoint_id=tmp_path / "c")  # DCP's own FileSystemReader


def test_bytesio_values_are_stored_raw(tmp_path):
    blob = io.BytesIO(b"\x00torchtitan train state\xff")
    dcp.save({"train_state": blob}, storage_writer=StorageWriter(tmp_path / "c"))
    got = {"train_state": io.BytesIO()}
    dcp.load(got, storage_reader=StorageReader(tmp_path / "c"))
    assert got["train_state"].getvalue() == blob.getvalue()


def test_async_save_in_a_thread_and_a_pickled_writer(tmp_path):
    fut = dcp.async_save(model_state(), storage_writer=StorageWriter(tmp_path / "a"))
    fut.result(timeout=120)
    checked(tmp_path / "a")
    writer = pickle.loads(pickle.dumps(StorageWriter(tmp_path / "p", codec="zstd", threads=2)))
    dcp.save(model_state(), storage_writer=writer)
    got = blank()
    dcp.load(got, storage_reader=pickle.loads(pickle.dumps(StorageReader(tmp_path / "p"))))
    assert_same(got, model_state())


def test_misuse_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="codec"):
        StorageWriter(tmp_path / "x", codec="lz77")
    with pytest.raises(CheckpointException, match="needs a path"):
        dcp.save(model_state(), storage_writer=StorageWriter())


def test_two_ranks_save_with_dcp_and_one_loads_with_ckptstore(tmp_path):
    run_ranks("dcp_api_save", str(tmp_path), 2)
    from dist_worker import full_state

    got = {k: torch.zeros_like(v) for k, v in full_state(0).items()}
    ckptstore.load(got, tmp_path / "ckpts" / "dcp-api")
    assert_same(got, full_state(0))
    assert read_manifest(open_backend(tmp_path / "ckpts"), "dcp-api").world_size == 2


def test_ckptstore_save_and_load_take_checkpoint_id_as_dcp_does(tmp_path):
    info = ckptstore.save(model_state(), checkpoint_id=tmp_path / "c")
    assert info.name == "c"
    got = blank()
    ckptstore.load(got, checkpoint_id=tmp_path / "c")
    assert_same(got, model_state())
    with pytest.raises(InvalidArgumentError, match="once"):
        ckptstore.save(model_state(), tmp_path / "d", checkpoint_id=tmp_path / "d")
    with pytest.raises(InvalidArgumentError, match="once"):
        ckptstore.load(blank())
