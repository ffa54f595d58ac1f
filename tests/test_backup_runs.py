"""Issue 14: the backup tier tells checkpoints apart by content and run, not by name.

A checkpoint counts as backed up only when the remote holds the same one (same files
and checksums, same run); a different one of that name (a branch retired by
``restore(newer="discard")``, another run sharing the backup prefix) is replaced, never
leaving the remote without a complete checkpoint; and the remote's retention only counts
this run's checkpoints, so another run's newer-looking steps never push this run's out.
S3 through the moto server of ``conftest.py``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import realistic_state, train
from helpers import train_state as make_state

import ckptstore
from ckptstore import CheckpointManager, SaveEvery
from ckptstore.engine.ops import read_manifest, verify
from ckptstore.errors import CorruptCheckpointError, StorageError
from ckptstore.format.manifest import Manifest
from ckptstore.layout import MANIFEST_FILE, checkpoint_name
from ckptstore.storage import open_backend
from ckptstore.storage.testing.faulty import FaultyBackend
from ckptstore.transfer import copy_checkpoint, replace_checkpoint


def small(seed: int) -> dict:
    return {"w": torch.randn(1000, generator=torch.Generator().manual_seed(seed))}


def same_on_both(local, remote, step: int) -> bool:
    """The remote's checkpoint ``step`` is the local one: the same files and checksums."""
    name = checkpoint_name(step)
    return read_manifest(remote, name).files == read_manifest(local, name).files


# ---- the manifest records the run ----------------------------------------------------
def test_run_id_is_optional_in_the_manifest_and_round_trips(tmp_path):
    local = open_backend(tmp_path / "l")
    with ckptstore.Checkpointer(local) as ckpt:
        ckpt.save(realistic_state(), 1)
        ckpt.save_async(realistic_state(), 2, run_id="run-A_1").wait()
        with pytest.raises(ValueError, match="run_id"):
            ckpt.save_async(realistic_state(), 3, run_id="a/b")
    plain = local.read_bytes(f"step_00000001/{MANIFEST_FILE}")
    assert "run_id" not in json.loads(plain)  # a plain save's manifest is as before
    assert read_manifest(local, "step_00000001").run_id is None
    assert read_manifest(local, "step_00000002").run_id == "run-A_1"
    m = read_manifest(local, "step_00000002")
    assert Manifest.from_json(m.to_json(), "x").run_id == "run-A_1"
    forged = dataclasses.replace(m, run_id="../etc").to_json()
    with pytest.raises(CorruptCheckpointError, match="run_id"):
        Manifest.from_json(forged, "x")


def test_a_fresh_run_gets_a_new_run_id_and_a_resumed_run_keeps_it(tmp_path):
    root = tmp_path / "run"
    with CheckpointManager(root, save=SaveEvery(steps=2)) as mgr:
        train(mgr, make_state(), 2)
    local = open_backend(root)
    first = read_manifest(local, "step_00000002").run_id
    assert first
    state = make_state()
    with CheckpointManager(root, save=SaveEvery(steps=2)) as mgr:
        assert mgr.restore(state) == 2
        train(mgr, state, 2, start=2)
    assert read_manifest(local, "step_00000004").run_id == first
    with CheckpointManager(tmp_path / "other", save=SaveEvery(steps=2)) as mgr:
        train(mgr, make_state(), 2)
    other = read_manifest(open_backend(tmp_path / "other"), "step_00000002").run_id
    assert other and other != first


# ---- replacing without a window ------------------------------------------------------
def test_replace_keeps_a_complete_checkpoint_on_the_destination_throughout(tmp_path):
    """Failing at the worst moment (old deleted, new not yet under its name) leaves the
    complete new one beside it; a second call finishes the job."""
    old, new = open_backend(tmp_path / "old"), open_backend(tmp_path / "new")
    with ckptstore.Checkpointer(old) as ckpt:
        ckpt.save(small(1), 1)
    with ckptstore.Checkpointer(new) as ckpt:
        ckpt.save(small(2), 1)
    name = "step_00000001"
    inner = open_backend(tmp_path / "dst")
    copy_checkpoint(old, inner, name)
    failing = {"on": True}

    def fault(op, what):
        if failing["on"] and op == "begin" and what == name:
            return StorageError("injected: the link went down")
        return None

    dst = FaultyBackend(inner, fault)
    with pytest.raises(StorageError, match="injected"):
        replace_checkpoint(new, dst, name)
    beside = f"{name}.replacing"
    assert read_manifest(inner, beside).same_checkpoint(read_manifest(new, name))
    assert verify(inner, beside, None) == []
    failing["on"] = False
    replace_checkpoint(new, dst, name)
    assert read_manifest(inner, name).same_checkpoint(read_manifest(new, name))
    assert verify(inner, name, None) == []
    assert beside not in inner.list_names()
    # Deleted before: writing the new one beside failed, the old one stays.
    inner2 = open_backend(tmp_path / "dst2")
    copy_checkpoint(old, inner2, name)
    dst2 = FaultyBackend(
        inner2,
        lambda op, what: StorageError("injected") if op == "begin" else None,
    )
    with pytest.raises(StorageError):
        replace_checkpoint(new, dst2, name)
    assert read_manifest(inner2, name).same_checkpoint(read_manifest(old, name))
