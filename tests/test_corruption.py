"""Damaged and hostile checkpoints: detected, named, refused; nothing runs."""

from __future__ import annotations

import io
import json
import os
import pickle

import damage
import pytest
import torch
from damage import SHARD, Boom, forge_manifest
from helpers import Randn, blank_like, build_state, train, train_state, zero_value

import ckptstore
from ckptstore.codecs import get_codec
from ckptstore.dcp.planner import SerializedValue
from ckptstore.dcp.spec import SaveSpec
from ckptstore.engine.ops import save_staged
from ckptstore.engine.stager import stage_in_place
from ckptstore.storage import LocalBackend


def make_state(seed: int = 0) -> dict[str, object]:
    return build_state(seed, w=Randn(50_000), b=Randn(10), step=seed)


def blank() -> dict[str, object]:
    return blank_like(make_state(), zero_value)


@pytest.fixture(params=["none", "zstd"])
def two_checkpoints(request, root):
    with ckptstore.Checkpointer(root, codec=request.param, chunk_bytes=64 * 1024) as ckpt:
        ckpt.save(make_state(1), 1)
        ckpt.save(make_state(2), 2)
    return root, os.path.join(root, "step_00000002")


def shard_path(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, SHARD)


def load_error(root: str, step: int) -> BaseException:
    with ckptstore.Checkpointer(root) as ckpt, pytest.raises(ckptstore.CkptStoreError) as info:
        ckpt.load(blank(), step)
    return info.value


def test_intact_checkpoints_verify(two_checkpoints):
    root, _ = two_checkpoints
    with ckptstore.Checkpointer(root) as ckpt:
        assert ckpt.verify(1) == []
        assert ckpt.verify(2) == []


def test_bit_flip_in_data_is_detected_and_named(two_checkpoints):
    root, ckpt_dir = two_checkpoints
    damage.xor(shard_path(ckpt_dir), 1000)
    err = load_error(root, 2)
    assert isinstance(err, ckptstore.CorruptCheckpointError)
    assert "step_00000002/__0_0.distcp" in str(err)
    assert "checksum mismatch" in str(err)
    assert "earlier checkpoint" in str(err)  # says what to do
    with ckptstore.Checkpointer(root) as ckpt:
        problems = ckpt.verify(2)
        assert len(problems) == 1
        assert "__0_0.distcp" in problems[0]
        target = blank()
        ckpt.load(target, 1)  # the previous checkpoint is unaffected
        assert torch.equal(target["w"], make_state(1)["w"])


def test_truncated_shard_is_detected(two_checkpoints):
    root, ckpt_dir = two_checkpoints
    damage.truncate(shard_path(ckpt_dir), by=100)
    err = load_error(root, 2)
    assert isinstance(err, ckptstore.CorruptCheckpointError)
    assert "truncated" in str(err)
    assert "__0_0.distcp" in str(err)


def test_zeroed_tail_is_detected(two_checkpoints):
    root, ckpt_dir = two_checkpoints
    damage.zero_tail(shard_path(ckpt_dir), 4096)
    assert isinstance(load_error(root, 2), ckptstore.CorruptCheckpointError)


def test_deleted_shard_is_detected(two_checkpoints):
    root, ckpt_dir = two_checkpoints
    os.remove(shard_path(ckpt_dir))
    err = load_error(root, 2)
    assert isinstance(err, ckptstore.CorruptCheckpointError)
    assert "missing" in str(err)
    assert "__0_0.distcp" in str(err)
    with ckptstore.Checkpointer(root) as ckpt:
        assert any("missing" in p for p in ckpt.verify(2))


def test_swapped_shards_between_checkpoints_are_detected(two_checkpoints):
    root, ckpt_dir = two_checkpoints
    other = os.path.join(root, "step_00000001")
    os.replace(shard_path(other), shard_path(ckpt_dir))
    assert isinstance(load_error(root, 2), ckptstore.CorruptCheckpointError)


@pytest.mark.parametrize("what", ["flip", "delete", "truncate"])
def test_damaged_dcp_metadata_is_detected(two_checkpoints, what):
    root, ckpt_dir = two_checkpoints
    path = os.path.join(ckpt_dir, ".metadata")
    if what == "flip":
        damage.xor(path, 30)
    elif what == "delete":
        os.remove(path)
    else:
        os.truncate(path, 10)
    err = load_error(root, 2)
    assert isinstance(err, ckptstore.CorruptCheckpointError)
    assert ".metadata" in str(err)


def test_damaged_manifest_is_not_listed_and_not_loaded(two_checkpoints):
    root, ckpt_dir = two_checkpoints
    damage.xor(os.path.join(ckpt_dir, "manifest.json"), 40)
    with ckptstore.Checkpointer(root) as ckpt:
        assert [i.step for i in ckpt.list()] == [1]
        target = blank()
        info = ckpt.load(target)  # "latest" is now the newest that is listed
        assert info.step == 1
        with pytest.raises(ckptstore.CorruptCheckpointError, match=r"manifest\.json"):
            ckpt.load(blank(), 2)


def test_manifest_from_the_future_is_refused(two_checkpoints):
    root, ckpt_dir = two_checkpoints
    path = os.path.join(ckpt_dir, "manifest.json")
    with open(path) as f:
        body = json.load(f)
    body["format_version"] = 99
    with open(path, "w") as f:
        json.dump(body, f)
    err = load_error(root, 2)
    assert isinstance(err, ckptstore.IncompatibleCheckpointError)
    assert "upgrade ckptstore" in str(err)


def test_missing_checkpoint(root):
    with ckptstore.Checkpointer(root) as ckpt:
        with pytest.raises(ckptstore.CheckpointNotFoundError, match="no committed checkpoint"):
            ckpt.load(blank())
        with pytest.raises(FileNotFoundError):  # the builtin it means
            ckpt.load(blank(), 3)


def test_plain_load_of_a_root_points_to_its_checkpoints(two_checkpoints):
    root, _ = two_checkpoints
    with pytest.raises(ckptstore.CheckpointNotFoundError, match="looks like a checkpoint root"):
        ckptstore.load(blank(), root)


def test_mismatched_state_lists_the_differences(two_checkpoints):
    root, _ = two_checkpoints
    with ckptstore.Checkpointer(root) as ckpt:
        with pytest.raises(ckptstore.IncompatibleCheckpointError) as info:
            ckpt.load(
                {"w": torch.zeros(7), "b": torch.zeros(10), "extra": torch.zeros(2), "step": 0}
            )
        msg = str(info.value)
        assert "w: checkpoint [50000], target [7]" in msg
        assert "missing from the checkpoint (extra)" in msg
        assert isinstance(info.value, ValueError)
        partial = {"b": torch.zeros(10), "extra": torch.ones(2)}
        ckpt.load(partial, allow_partial=True)
        assert torch.equal(partial["b"], make_state(2)["b"])
        assert torch.equal(partial["extra"], torch.ones(2))


# ---- hostile input ---------------------------------------------------------------


def test_hostile_dcp_metadata_is_refused_before_running_anything(two_checkpoints, tmp_path):
    root, ckpt_dir = two_checkpoints
    sentinel = tmp_path / "pwned"
    # An attacker rewrites the manifest's checksums to match.
    damage.replace_file(ckpt_dir, ".metadata", pickle.dumps(Boom(str(sentinel))))
    err = load_error(root, 2)
    assert isinstance(err, ckptstore.UnsafeCheckpointError), err
    assert "builtins" in str(err) or "io" in str(err)
    assert not sentinel.exists()


def test_hostile_value_pickle_is_refused(root, tmp_path):
    """A checkpoint with intact checksums whose Python value is a code-running pickle."""
    sentinel = tmp_path / "pwned"
    staged = stage_in_place({"w": torch.ones(3), "v": 1})
    payload = io.BytesIO()
    torch.save(Boom(str(sentinel)), payload)  # what a forged torch.save file looks like
    staged.flat["v"] = SerializedValue(payload.getvalue())
    backend = LocalBackend(root)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        save_staged(
            staged,
            backend,
            "step_00000001",
            SaveSpec(get_codec("none"), step=1, chunk_bytes=1 << 20, window=4),
            pool=pool,
            group=None,
        )
    with ckptstore.Checkpointer(root) as ckpt:
        assert ckpt.verify(1) == []  # intact, as far as checksums go
        with pytest.raises(ckptstore.UnsafeCheckpointError, match="'v'"):
            ckpt.load({"w": torch.zeros(3), "v": 0})
    assert not sentinel.exists()


def test_values_that_could_not_load_safely_are_refused_at_save(root):
    import fractions

    with ckptstore.Checkpointer(root) as ckpt:
        for bad in (fractions.Fraction(1, 3), Boom("/nonexistent/x")):
            with pytest.raises(ckptstore.UnsupportedStateError, match="'bad'"):
                ckpt.save_async({"bad": bad}, 1)
        assert ckpt.list() == []


@pytest.mark.parametrize(
    "name",
    [
        "../escape",
        "/etc/passwd",
        "a/../../b",
        "bad\\name",
        "nul\x00byte",
        ".",
        "",
        "step_[12]",
        "*",
    ],
)
def test_manifest_file_names_that_escape_are_refused(two_checkpoints, name):
    root, ckpt_dir = two_checkpoints
    forge_manifest(
        ckpt_dir,
        lambda body: body["files"].update(
            {name: {"kind": "shard", "size_bytes": 1, "xxh3_64": "0" * 16}}
        ),
    )
    err = load_error(root, 2)
    assert isinstance(err, ckptstore.CorruptCheckpointError)


def test_manifest_with_absurd_numbers_is_corrupt_not_a_crash(two_checkpoints):
    root, ckpt_dir = two_checkpoints
    path = os.path.join(ckpt_dir, "manifest.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"step": 2', '"step": ' + "9" * 5000))
    with ckptstore.Checkpointer(root) as ckpt:
        assert [i.step for i in ckpt.list()] == [1]  # one bad manifest does not break listing
    assert isinstance(load_error(root, 2), ckptstore.CorruptCheckpointError)


def _rewrite_index(ckpt_dir: str, change) -> None:
    """Edit the shard's index and re-sign index and manifest, as an attacker could."""
    with open(shard_path(ckpt_dir), "rb") as f:
        chunks, index_json = damage.split_shard(f.read())
    index = json.loads(index_json)
    change(index)
    damage.replace_shard(ckpt_dir, chunks, json.dumps(index).encode())


@pytest.mark.parametrize("what", ["huge chunk", "stored larger than raw"])
def test_index_sizes_are_checked_before_anything_is_allocated(two_checkpoints, what):
    root, ckpt_dir = two_checkpoints

    def change(index):
        item = next(i for i in index["items"] if i["dtype"] == "float32" and i["chunks"])
        chunk = item["chunks"][0]
        if what == "huge chunk":
            chunk[2] = 4 << 30  # 4 GiB raw: more than any chunk ckptstore writes
            item["nbytes"] = sum(c[2] for c in item["chunks"])
        else:
            chunk[1] = chunk[2] + 1

    _rewrite_index(ckpt_dir, change)
    err = load_error(root, 2)
    assert isinstance(err, ckptstore.CorruptCheckpointError), err
    assert "malformed shard index" in str(err)
    with ckptstore.Checkpointer(root) as ckpt:
        problems = ckpt.verify(2)
    assert len(problems) == 1
    assert "__0_0.distcp" in problems[0]


# ---- bit rot: named by verify, and restore falls back past it -------------------------


@pytest.mark.parametrize(
    ("how", "victim"),
    [
        ("truncate", "__0_0.distcp"),
        ("zero tail", "__0_0.distcp"),
        ("delete", "__0_0.distcp"),
        ("swap", "__0_0.distcp"),
        ("flip", ".metadata"),
        ("delete", ".metadata"),
    ],
)
def test_bit_rot_is_named_by_verify_and_restore_falls_back(root, caplog, how, victim):
    import logging
    import shutil

    with ckptstore.CheckpointManager(root, save=ckptstore.SaveEvery(steps=2)) as mgr:
        train(mgr, train_state(), 4)
    path = os.path.join(root, "step_00000004", victim)
    if how == "truncate":
        damage.truncate(path, by=100)
    elif how == "zero tail":
        damage.zero_tail(path, 4096)
    elif how == "delete":
        os.remove(path)
    elif how == "swap":  # another checkpoint's (intact) shard in its place
        shutil.copy(os.path.join(root, "step_00000002", victim), path)
    else:
        damage.xor(path, 30)
    with ckptstore.Checkpointer(root) as ckpt:
        problems = ckpt.verify(4)
        assert len(problems) == 1 and f"step_00000004/{victim}" in problems[0], problems
    with (
        caplog.at_level(logging.WARNING, logger="ckptstore"),
        ckptstore.CheckpointManager(root) as mgr,
    ):
        assert mgr.restore(train_state(seed=5)) == 2
    assert "skipping step 4" in caplog.text
