"""Issue 14: the backup tier tells checkpoints apart by content and run, not by name.

A checkpoint counts as backed up only when the remote holds the same one (same files
and checksums, same run); a different one of that name (a branch retired by
``restore(newer="discard")``, another run sharing the backup prefix) is replaced, never
leaving the remote without a complete checkpoint; and the remote's retention only counts
this run's checkpoints, so another run's newer-looking steps never push this run's out.
S3 through the moto server of ``conftest.py``.
"""

from __future__ import annotations

import pytest
import torch

import ckptstore
from ckptstore.engine.ops import read_manifest, verify
from ckptstore.errors import StorageError
from ckptstore.layout import checkpoint_name
from ckptstore.storage import open_backend
from ckptstore.storage.testing.faulty import FaultyBackend
from ckptstore.transfer import copy_checkpoint, replace_checkpoint


def small(seed: int) -> dict:
    return {"w": torch.randn(1000, generator=torch.Generator().manual_seed(seed))}


def same_on_both(local, remote, step: int) -> bool:
    """The remote's checkpoint ``step`` is the local one: the same files and checksums."""
    name = checkpoint_name(step)
    return read_manifest(remote, name).files == read_manifest(local, name).files


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
