"""Incremental saves (issue 19): tensors byte-identical to the last save are linked into
the new checkpoint, not written again; every checkpoint still loads and verifies alone,
and deleting the one that first wrote them leaves the later ones whole."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import time
from typing import Any

import pytest
import torch

import ckptstore
import ckptstore.storage._direct_io as direct_io_mod
from ckptstore.format.manifest import Part
from ckptstore.format.shard import ShardWriter
from ckptstore.units import format_bytes

FROZEN = 8  # tensors of 1 MiB each that never change


def frozen_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {f"frozen.{i}": torch.randn(256, 1024, generator=g) for i in range(FROZEN)}


def state_at(step: int, frozen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {**frozen, "adapter": torch.randn(64, 64, generator=g), "step": torch.tensor(step)}


def files_of(root: str, step: int) -> dict[str, os.stat_result]:
    d = os.path.join(root, f"step_{step:08d}")
    return {f: os.stat(os.path.join(d, f)) for f in os.listdir(d)}


def load_equal(ckpt: ckptstore.Checkpointer, step: int, want: dict[str, torch.Tensor]) -> None:
    got = {k: torch.zeros_like(v) for k, v in want.items()}
    ckpt.load(got, step)
    for k, v in want.items():
        assert torch.equal(got[k], v), f"step {step}: {k} differs"
    assert ckpt.verify(step) == []


def save_chain(ckpt: ckptstore.Checkpointer, frozen: dict[str, torch.Tensor], steps: int):
    """Saves 1..``steps`` of :func:`state_at`: what each holds, and each save's result."""
    saved, results = {}, []
    for step in range(1, steps + 1):
        saved[step] = {k: v.clone() for k, v in state_at(step, frozen).items()}
        results.append(ckpt.save(state_at(step, frozen), step=step))
    return saved, results


def test_unchanged_tensors_are_linked_not_written(root):
    frozen = frozen_state()
    with ckptstore.Checkpointer(root, codec="zstd", incremental=True) as ckpt:
        saved, results = save_chain(ckpt, frozen, 4)
        full = results[0].stored_bytes
        for r in results[1:]:
            # only the adapter and the step counter are written again
            assert r.stored_bytes < 0.01 * full, (r.stored_bytes, full)
        first = files_of(root, 1)["__0_0.distcp"]
        for step in (2, 3, 4):
            info = ckpt.list()[step - 1]
            linked = info.manifest.linked
            assert linked == {"__0_0-step_00000001.distcp": "step_00000001"}, linked
            shared = files_of(root, step)["__0_0-step_00000001.distcp"]
            assert (shared.st_ino, shared.st_dev) == (first.st_ino, first.st_dev)
            assert info.manifest.owned_bytes < 0.01 * full
            load_equal(ckpt, step, saved[step])


def test_the_save_line_says_what_the_whole_checkpoint_links(root):
    """Stranger test: with two ranks every save line read "this rank's part ..." without
    "linked", since rank 0's own file linked nothing while rank 1's did. The line (the
    coordinator's, which holds the manifest) now says what the checkpoint links."""
    frozen = frozen_state()
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        _, results = save_chain(ckpt, frozen, 2)
    shared = results[1].manifest.files["__0_0-step_00000001.distcp"].size_bytes
    line = results[1].describe(0, ranks=2)
    assert "this rank's part" in line and "unchanged (linked)" not in line
    assert f"the checkpoint links 1 file ({format_bytes(shared)}) of earlier ones" in line
    assert "links" not in results[0].describe(0, ranks=2)  # the first save links nothing
    assert "the checkpoint links" not in results[1].describe(1, ranks=1)  # one rank: as before
    # on node-local disks rank 0's manifest is its own disk's part, not the checkpoint
    part = Part(disk="d0", coordinator="d0", elsewhere={})
    result = dataclasses.replace(
        results[1], manifest=dataclasses.replace(results[1].manifest, part=part)
    )
    assert "; this disk's part links 1 file" in result.describe(0, ranks=2)


def test_deleting_the_checkpoint_that_wrote_the_frozen_weights_keeps_the_later_ones(root):
    frozen = frozen_state()
    saved = {}
    with ckptstore.CheckpointManager(
        root, keep=ckptstore.KeepLast(2), incremental=True, codec="none"
    ) as mgr:
        for step in range(5):  # checkpoints of 1..5 steps done
            saved[step + 1] = {k: v.clone() for k, v in state_at(step, frozen).items()}
            mgr.save(step, state_at(step, frozen))
            mgr.wait()
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == [
        "step_00000004",
        "step_00000005",
    ]
    with ckptstore.Checkpointer(root) as ckpt:
        for step in (4, 5):
            assert ckpt.list()[step - 4].manifest.linked  # still sharing step 1's bytes
            load_equal(ckpt, step, saved[step])


def test_a_save_in_another_codec_still_links_what_did_not_change(root):
    """``codec="auto"`` changes its mind in a run's first saves (and a restarted run may
    choose otherwise): each item records its own codec, so the chain holds across."""
    frozen = frozen_state()
    with ckptstore.Checkpointer(root, codec="zstd", incremental=True) as ckpt:
        saved, _ = save_chain(ckpt, frozen, 2)
    for step, codec in ((3, "none"), (4, "zstd")):
        with ckptstore.Checkpointer(root, codec=codec, incremental=True) as ckpt:
            ckpt.load(state_at(step - 1, frozen))  # a restart: links from the one loaded
            saved[step] = {k: v.clone() for k, v in state_at(step, frozen).items()}
            assert ckpt.save(state_at(step, frozen), step=step).raw_bytes < (1 << 20)
            linked = ckpt.latest().manifest.linked
            assert linked == {"__0_0-step_00000001.distcp": "step_00000001"}, (step, linked)
    with ckptstore.Checkpointer(root) as ckpt:
        for step in (1, 2, 3, 4):
            load_equal(ckpt, step, saved[step])


def test_a_state_that_changes_entirely_links_nothing(root):
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        sizes = []
        for step in range(1, 4):
            state = state_at(step, {f"w{i}": torch.randn(1000) for i in range(4)})
            sizes.append(ckpt.save(state, step=step).stored_bytes)
            assert not ckpt.latest().manifest.linked
        assert len(set(sizes)) == 1  # every save is a full one


def test_every_full_every_saves_one_writes_everything(root):
    frozen = frozen_state()
    with ckptstore.Checkpointer(root, codec="none", incremental=True, full_every=3) as ckpt:
        linked = []
        for step in range(1, 8):
            ckpt.save(state_at(step, frozen), step=step)
            linked.append(bool(ckpt.latest().manifest.linked))
    assert linked == [False, True, True, False, True, True, False]


def test_full_every_1_saves_as_without_incremental(root, tmp_path):
    """Every save writes everything, and nothing is hashed or noted for a next save to
    link from: the bytes are those of a save without incremental (a note was written)."""
    frozen = frozen_state()
    with (
        ckptstore.Checkpointer(root, codec="none", incremental=True, full_every=1) as each,
        ckptstore.Checkpointer(str(tmp_path / "plain"), codec="none") as plain,
    ):
        for step in range(1, 4):
            state = state_at(step, frozen)
            assert each.save(state, step=step).stored_bytes == plain.save(state, step).stored_bytes
            assert not each.latest().manifest.linked


def test_where_links_cannot_be_made_the_save_writes_everything(root, monkeypatch, caplog):
    frozen = frozen_state()
    want = {k: v.clone() for k, v in state_at(2, frozen).items()}

    def no_links(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(direct_io_mod, "_LINK_FAILURES_SAID", set())
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        full = ckpt.save(state_at(1, frozen), step=1).stored_bytes
        monkeypatch.setattr(direct_io_mod.os, "link", no_links)
        with caplog.at_level(logging.WARNING, logger="ckptstore"):
            result = ckpt.save(state_at(2, frozen), step=2)
            ckpt.save(state_at(2, frozen), step=3)
        # why it wrote everything, said once (stranger test: nothing said it)
        said = [r for r in caplog.records if "could not hard-link" in r.getMessage()]
        assert len(said) == 1 and "Invalid cross-device link" in said[0].getMessage()
        assert not ckpt.latest().manifest.linked
        assert result.stored_bytes == full
        monkeypatch.undo()
        load_equal(ckpt, 2, want)
        assert sorted(files_of(root, 2)) == [".metadata", "__0_0.distcp", "manifest.json"]


def test_a_symlink_in_place_of_a_linked_file_is_not_linked_and_the_save_writes_everything(
    root, monkeypatch, caplog
):
    """Stranger test: a symbolic link to the step before in place of the file a save
    links from was itself hard-linked (os.link does not follow a symlink on Linux), so
    the new checkpoint held a relative link into another directory, and retention's
    deletion of that one broke it. A link is made only from a regular file."""
    frozen = frozen_state()
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        full = ckpt.save(state_at(1, frozen), step=1).stored_bytes
        ckpt.save(state_at(2, frozen), step=2)
        shared = os.path.join(root, "step_00000002", "__0_0-step_00000001.distcp")
        os.unlink(shared)
        os.symlink(os.path.join("..", "step_00000001", "__0_0.distcp"), shared)
        assert ckpt.verify(2) == []  # (through the symlink: intact)
        want = {k: v.clone() for k, v in state_at(3, frozen).items()}
        monkeypatch.setattr(direct_io_mod, "_LINK_FAILURES_SAID", set())
        with caplog.at_level(logging.WARNING, logger="ckptstore"):
            result = ckpt.save(state_at(3, frozen), step=3)
        assert result.stored_bytes == full and not ckpt.latest().manifest.linked
        assert "(not a regular file): its bytes are written instead of linked" in caplog.text
    third = os.path.join(root, "step_00000003")
    assert not any(os.path.islink(os.path.join(third, f)) for f in os.listdir(third))
    for step in (1, 2):
        shutil.rmtree(os.path.join(root, f"step_{step:08d}"))
    with ckptstore.Checkpointer(root) as ckpt:
        load_equal(ckpt, 3, want)


def test_a_failed_save_is_not_what_the_next_one_links_from(root, monkeypatch):
    frozen = frozen_state()
    want = {k: v.clone() for k, v in state_at(4, frozen).items()}
    real_finish = ShardWriter.finish
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        ckpt.save(state_at(1, frozen), step=1)
        ckpt.save(state_at(2, frozen), step=2)

        def failing(self):
            self.abort()
            raise ckptstore.errors.StorageError(errno.EIO, "injected")

        monkeypatch.setattr(ShardWriter, "finish", failing)
        with pytest.raises(ckptstore.CkptStoreError):
            ckpt.save(state_at(3, frozen), step=3)
        monkeypatch.setattr(ShardWriter, "finish", real_finish)
        ckpt.save(state_at(4, frozen), step=4)
        assert [i.step for i in ckpt.list()] == [1, 2, 4]
        assert ckpt.latest().manifest.linked == {"__0_0-step_00000001.distcp": "step_00000001"}
        load_equal(ckpt, 4, want)


def test_incremental_saves_to_s3_copy_inside_the_store(s3_server, s3_bucket):
    """Object stores have no hard links: the unchanged file is copied by the store
    (CopyObject), nothing uploaded again."""
    frozen = frozen_state()
    url = f"s3://{s3_bucket}/run"
    with ckptstore.Checkpointer(url, codec="none", incremental=True) as ckpt:
        saved, results = save_chain(ckpt, frozen, 3)
        assert results[2].stored_bytes < 0.01 * results[0].stored_bytes
        linked = ckpt.latest().manifest.linked
        assert list(linked.values()) == ["step_00000001"], linked
        for step in (1, 2, 3):
            load_equal(ckpt, step, saved[step])


def test_the_option_is_checked():
    with pytest.raises(ckptstore.InvalidArgumentError, match="incremental"):
        ckptstore.CheckpointerConfig(incremental="yes")
    with pytest.raises(ckptstore.InvalidArgumentError, match="full_every"):
        ckptstore.CheckpointerConfig(full_every=-1)


def test_the_backup_uploads_only_what_the_remote_lacks_and_a_fresh_machine_restores(
    tmp_path, s3_server, s3_bucket, monkeypatch, caplog
):
    """The backup tier copies a linked file inside the store from the checkpoint there
    that holds it (nothing uploaded again); a new machine with an empty disk restores
    the newest checkpoint bit-exact, and later pulls link what it already has."""
    from ckptstore import transfer

    uploaded: list[str] = []
    real_copy = transfer.CopyJob.copy

    def counting(self, fname, *args):
        where = "local" if self.dst.capabilities.local else "s3"
        uploaded.append(f"{where}:{self.dst_name}/{fname}")
        return real_copy(self, fname, *args)

    monkeypatch.setattr(transfer.CopyJob, "copy", counting)
    frozen = frozen_state()
    url = f"s3://{s3_bucket}/run"
    saved = {}
    caplog.set_level(logging.INFO, logger="ckptstore")
    with incremental_backup(tmp_path / "a", url) as mgr:
        for step in range(4):
            saved[step + 1] = {k: v.clone() for k, v in state_at(step, frozen).items()}
            mgr.save(step, state_at(step, frozen))
            mgr.wait()
            assert mgr.wait_backup() == []
    backed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("backup: step")]
    assert len(backed) == 4 and " linked, in " not in backed[0], backed
    assert all(
        re.search(r"\(\d+\.\d\d KB copied, 8\.\d\d MB linked, in ", m) for m in backed[1:]
    ), backed
    to_s3 = [u for u in uploaded if u.startswith("s3:")]
    shards = sorted(u for u in to_s3 if u.endswith(".distcp"))
    # step 1's shard once; after it, only each save's own small file
    assert shards == [f"s3:step_{s:08d}/__0_0.distcp" for s in range(1, 5)], to_s3
    remote = ckptstore.storage.open_backend(url)
    with ckptstore.Checkpointer(remote) as on_s3:
        assert on_s3.latest().manifest.linked == {"__0_0-step_00000001.distcp": "step_00000001"}
        load_equal(on_s3, 4, saved[4])
    # A fresh machine: nothing on its disk; restore comes from the backup.
    uploaded.clear()
    target = {k: torch.zeros_like(v) for k, v in saved[4].items()}
    with ckptstore.CheckpointManager(tmp_path / "b", backup=url) as mgr:
        assert mgr.restore(target) == 4
    for k, v in saved[4].items():
        assert torch.equal(target[k], v), k
    # A later pull of another checkpoint of the chain links what that disk already has.
    uploaded.clear()
    local_b = ckptstore.storage.open_backend(str(tmp_path / "b"))
    transfer.copy_checkpoint(remote, local_b, "step_00000003")
    assert [u for u in uploaded if u.endswith(".distcp")] == ["local:step_00000003/__0_0.distcp"]
    with ckptstore.Checkpointer(local_b) as here:
        load_equal(here, 3, saved[3])


def test_a_few_unchanged_tensors_do_not_pin_a_whole_earlier_shard(root):
    """Linking a file keeps all of it on disk: it is linked only when what is used from
    it is at least half of it. A small unchanged buffer beside weights that all change
    is written again; no bytes beyond a full save."""
    buffer = torch.arange(1000.0)
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        sizes = [
            ckpt.save({"buffer": buffer, "w": torch.randn(100_000)}, step=s).stored_bytes
            for s in (1, 2, 3)
        ]
        assert not ckpt.latest().manifest.linked
    assert len(set(sizes)) == 1


def test_ls_counts_identical_full_saves_twice_on_disk(root, capsys):
    """Checkpoints holding the same bytes in files of their own take the disk twice:
    ``ls`` counted them once (by size and checksum) and said "incremental saves share
    files"; beside a linking save it counts by inode."""
    from ckptstore.cli.main import main

    frozen = frozen_state()
    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        for step in (1, 2):
            ckpt.save(frozen, step=step)
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        for step in (3, 4):  # 3 writes in full (nothing remembered), 4 links it
            ckpt.save(frozen, step=step)
    assert main(["ls", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    each = {c["name"]: c["stored_bytes"] for c in listed["checkpoints"]}
    full = each["step_00000001"] + each["step_00000002"] + each["step_00000003"]
    # 4 lists 3's shard file (linked) and adds only its note, .metadata and manifest
    assert full < listed["disk_bytes"] < full + 0.05 * each["step_00000001"], (listed, each)


def test_ls_and_info_say_what_is_shared(root, capsys):
    from ckptstore.cli.main import main

    frozen = frozen_state()
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(state_at(step, frozen), step=step)
    assert main(["ls", root]) == 0
    out = capsys.readouterr().out
    # What deleting each alone frees: the first's file is shared by all three
    own = re.findall(r"(step_0000000\d) .* (\d+\.\d\d) (MB|KB)(?: \((\S+) (KB|MB) its own\))?", out)
    assert [(n, u, o is not None and ou) for n, _, u, o, ou in own] == [
        ("step_00000001", "MB", "KB"),
        ("step_00000002", "MB", "KB"),
        ("step_00000003", "MB", "KB"),
    ], out
    assert (
        "3 committed checkpoint(s), 25.2" in out
        and "MB on disk: incremental saves share files" in out
    ), out
    assert main(["ls", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["stored_bytes"] == sum(c["stored_bytes"] for c in listed["checkpoints"])
    assert 0 < listed["disk_bytes"] < 0.5 * listed["stored_bytes"], listed
    frees = [c["frees_bytes"] for c in listed["checkpoints"]]
    assert all(0 < f < 0.1 * listed["disk_bytes"] for f in frees), frees
    ratios = [c["ratio"] for c in listed["checkpoints"]]  # linked files hold stale items
    assert ratios[0] == pytest.approx(1.0, abs=0.01) and ratios[1:] == [None, None], ratios
    assert main(["info", root]) == 0
    out = capsys.readouterr().out
    assert "is in files first written by step_00000001, linked" in out, out
    ratio = re.search(r"ratio (\d\.\d+) \(of the items it uses\)", out)
    assert ratio and 0.99 < float(ratio.group(1)) < 1.01, out  # codec none
    shutil.rmtree(os.path.join(root, "step_00000001"))
    shutil.rmtree(os.path.join(root, "step_00000002"))
    assert main(["ls", root]) == 0
    out = capsys.readouterr().out  # the shared file lives on in step 3 alone: all its own
    assert "its own" not in out and "on disk" not in out, out
    assert main(["info", root]) == 0
    out = capsys.readouterr().out
    assert "first written by step_00000001 (no longer there: the file lives on here)" in out, out
    ckpt = ckptstore.Checkpointer(root, codec="none")
    ckpt.save({"other": torch.zeros(4)}, step=1)  # another checkpoint under that name
    ckpt.close()
    assert main(["info", root]) == 0
    out = capsys.readouterr().out
    assert "first written by step_00000001 (no longer there: the file lives on here)" in out, out


def test_a_full_save_on_demand_links_nothing(root):
    frozen = frozen_state()
    with ckptstore.CheckpointManager(root, incremental=True, codec="none") as mgr:
        mgr.save(0, state_at(0, frozen)).wait()
        mgr.save(1, state_at(1, frozen), full=True).wait()
        mgr.save(2, state_at(2, frozen)).wait()
    with ckptstore.Checkpointer(root) as ckpt:
        linked = [i.manifest.linked for i in ckpt.list()]
    assert linked == [{}, {}, {"__0_0-step_00000002.distcp": "step_00000002"}], linked


def test_tensors_whose_version_moved_are_written_without_hashing_and_the_hash_decides_the_rest(
    root,
):
    """Cheap detection first: a tensor changed in place (its version counter moved) is
    written without being hashed. The hash is the truth for the rest: a change that
    bypasses the version counter (through ``.data``) is still caught."""
    w = torch.randn(100_000)
    frozen = torch.randn(100_000)
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        inc = ckpt._save_cache.incremental
        ckpt.save({"w": w, "frozen": frozen}, step=1)
        assert inc.hashed_bytes == 800_000  # the first save hashes everything
        w.add_(1.0)  # in place: its version counter moves
        ckpt.save({"w": w, "frozen": frozen}, step=2)
        # frozen was hashed where it lies while staging (engine.unchanged): its arena
        # slot held those bytes already, so it was neither copied nor hashed again
        assert inc.hashed_bytes == 0
        assert set(inc.given) == {"frozen"}
        assert ckpt.latest().manifest.linked
        frozen.data.add_(1.0)  # no version bump
        w.add_(1.0)
        ckpt.save({"w": w, "frozen": frozen}, step=3)
        assert inc.given == {}  # staging's hash saw frozen change: copied
        assert inc.hashed_bytes == 400_000  # and hashed by the writer, as any other
        assert not ckpt.latest().manifest.linked  # the hash saw frozen change
        load_equal(ckpt, 3, {"w": w.clone(), "frozen": frozen.clone()})


def test_small_items_share_a_hash_job_and_keep_their_digests():
    """Hundreds of small items are hashed a few jobs at a time, not one job each, and
    every digest is the item's own xxh3-128 (an item above one piece: of its pieces')."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import xxhash

    from ckptstore.dcp.hashing import PIECE as _PIECE
    from ckptstore.dcp.hashing import start_hashing

    rng = np.random.default_rng(0)
    sizes = [0, 10] + [5000] * 300 + [2 << 20] * 3  # 1.5 MB of small ones, 3 of 2 MiB
    raws = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    raws.append(rng.integers(0, 256, 2 * _PIECE + 4096, dtype=np.uint8))  # 3 pieces
    with ThreadPoolExecutor(2) as pool:
        result, jobs = start_hashing(raws, pool)
        got = result()
    pieces = [xxhash.xxh3_128_hexdigest(raws[-1][k : k + _PIECE]) for k in (0, _PIECE, 2 * _PIECE)]
    want = [xxhash.xxh3_128_hexdigest(r) for r in raws[:-1]]
    want.append(xxhash.xxh3_128_hexdigest("".join(pieces).encode()))
    assert got == want
    # the small ones together (1.5 MB); each piece of 1 MiB or more alone (2 MiB items,
    # the 8 MiB pieces), so a host's every thread gets one; the 4 KiB tail after them
    assert len(jobs) == 1 + 3 + 2 + 1


def test_the_thread_waiting_for_hashes_runs_the_jobs_no_pool_thread_has_started(monkeypatch):
    """A waiter never waits for a job that no pool thread has started (a pool thread
    held by other work, or starved of CPU): it runs those itself. A job a pool thread
    runs is waited for, not run twice, and its error reaches the waiter; an interrupt
    is raised before an ordinary error."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import wait as futures_wait

    import numpy as np
    import xxhash

    import ckptstore.dcp.hashing as hashing_mod

    raws = [np.full(n, n % 251, dtype=np.uint8) for n in (10, 3 << 20, 2 << 20)]
    want = [xxhash.xxh3_128_hexdigest(r) for r in raws]
    real = hashing_mod._hash_all
    with ThreadPoolExecutor(1) as pool:
        busy = threading.Event()
        try:
            pool.submit(busy.wait, 30)  # the pool's only thread is taken
            result, tasks = hashing_mod.start_hashing(raws, pool)
            assert result() == want
            assert not any(t.done() for t in tasks)  # none ran: the waiter hashed them all
        finally:
            busy.set()
        futures_wait(tasks)

        # the pool's thread takes the first job and holds it; the waiter runs the rest
        ran: list[str] = []
        started, go = threading.Event(), threading.Event()

        def counted(pieces):
            ran.append(threading.current_thread().name)
            if len(ran) == 1:
                started.set()
                assert go.wait(30)
                raise MemoryError("no memory for a hash")
            return real(pieces)

        monkeypatch.setattr(hashing_mod, "_hash_all", counted)
        result, tasks = hashing_mod.start_hashing(raws, pool)
        assert started.wait(30)
        waiter = threading.Thread(target=lambda: ran.append(repr(_raises(result))))
        waiter.start()
        deadline = time.monotonic() + 30
        while len(ran) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(ran) == 3 and waiter.is_alive()  # the rest done, the held one awaited
        go.set()
        waiter.join(30)
        futures_wait(tasks)
        assert ran[0] != ran[1] == ran[2] and "MemoryError" in ran[3] and len(ran) == 4

        def interrupted(pieces):  # an ordinary error first, then an interrupt
            if len(pieces[0]) == 10:
                raise MemoryError("no memory for a hash")
            raise KeyboardInterrupt

        monkeypatch.setattr(hashing_mod, "_hash_all", interrupted)
        busy = threading.Event()
        try:
            pool.submit(busy.wait, 30)
            result, tasks = hashing_mod.start_hashing(raws, pool)
            with pytest.raises(KeyboardInterrupt):
                result()
        finally:
            busy.set()
        futures_wait(tasks)


def _raises(fn: Any) -> BaseException | None:
    try:
        fn()
    except BaseException as exc:
        return exc
    return None


def test_a_tensor_is_taken_from_the_arenas_arrays_only_if_it_is_the_one_noted():
    """An id in the map that now belongs to another tensor (the noted one gone, its id
    reused) gives that tensor's own bytes, not the noted ones."""
    from ckptstore.dcp.incremental import IncrementalCache

    noted, other = torch.zeros(4), torch.ones(4)
    cache = IncrementalCache()
    cache.raws = {id(other): (noted, noted.numpy().view("uint8"))}  # as if id reused
    assert bytes_of_equal(cache.bytes_of(other), other)
    cache.raws = {id(noted): (noted, "noted")}
    assert cache.bytes_of(noted) == "noted"


def bytes_of_equal(raw: Any, t: torch.Tensor) -> bool:
    return bytes(raw) == t.numpy().tobytes()


DTENSOR_SAVES = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, init_device_mesh
import ckptstore, ckptstore.dcp.incremental as inc_mod
work = sys.argv[1]
dist.init_process_group("gloo", store=dist.FileStore(os.path.join(work, "store"), 1), rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
state = {"w": DTensor.from_local(torch.randn(100_000), mesh, [Replicate()]), "b": torch.randn(70_000)}
with ckptstore.Checkpointer(os.path.join(work, "c"), codec="none", incremental=True) as ckpt:
    ckpt.save(state, step=1)
    made = []
    real = inc_mod.tensor_bytes
    inc_mod.tensor_bytes = lambda t: made.append(t) or real(t)
    ckpt.save(state, step=2)
    target = {"w": DTensor.from_local(torch.zeros(100_000), mesh, [Replicate()]), "b": torch.zeros(70_000)}
    ckpt.load(target, 2)
assert torch.equal(target["w"].to_local(), state["w"].to_local()) and torch.equal(target["b"], state["b"])
print("made", len(made))
dist.destroy_process_group()
"""


def test_a_staged_dtensor_is_found_in_the_arenas_arrays_too(tmp_path):
    """A DTensor's local tensor is its arena view itself while the writer resolves it
    (no autograd there), so it too is looked up, not made again."""
    import subprocess
    import sys

    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(
        [sys.executable, "-c", DTENSOR_SAVES, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "made 0" in done.stdout


def test_the_writer_takes_the_staged_tensors_arrays_from_the_arena(tmp_path, monkeypatch):
    """White-box: from the second save into an arena, the writer looks each staged
    tensor's bytes up (made once per arena) instead of making them again, and keeps
    nothing of the arena past the save; what it writes and links loads back exactly."""
    import ckptstore.dcp.incremental as inc_mod

    state = {"frozen": torch.randn(300_000), "w": torch.randn(200_000)}
    with ckptstore.Checkpointer(str(tmp_path), codec="none", incremental=True) as ckpt:
        ckpt.save(state, step=1)
        made: list[Any] = []
        real = inc_mod.tensor_bytes
        monkeypatch.setattr(inc_mod, "tensor_bytes", lambda t: made.append(t) or real(t))
        with torch.no_grad():
            state["w"].add_(1.0)
        ckpt.save(state, step=2)
        assert made == []
        assert ckpt._save_cache.incremental.raws == {}
        load_equal(ckpt, 2, {k: v.clone() for k, v in state.items()})


# ---- tensors the staging arena holds already are not copied (engine.unchanged) ----------


def test_a_tensor_the_arena_holds_is_not_copied_and_a_bypassing_change_is_copied():
    """White-box, on the stager alone: a slot noted as holding a digest is not copied
    into when the tensor hashes to it (proven by a slot whose bytes differ from what
    its note says: they stay), and is copied when the tensor's hash differs (a write
    through ``.data``, which leaves the version counter alone)."""
    from concurrent.futures import ThreadPoolExecutor

    from ckptstore.dcp.hashing import start_hashing
    from ckptstore.dcp.raw import tensor_bytes
    from ckptstore.engine.stager import StagingPool

    def digest(t):
        with ThreadPoolExecutor(2) as pool:
            return start_hashing([tensor_bytes(t)], pool)[0]()[0]

    big, small = torch.randn(200_000), torch.randn(100)  # 800 KB: noted; 400 B: not
    with ThreadPoolExecutor(2) as pool:
        staging = StagingPool()
        staging.track_versions, staging.hash_pool = True, pool
        first = staging.stage({"big": big, "small": small})
        assert first.found.verified == {}
        staging.note_hashed(first, {"big": (digest(big), big.nbytes), "small": ("0", 400)})
        staging.release(first)
        second = staging.stage({"big": big, "small": small})  # nothing changed
        assert second.found.verified == {"big": (digest(big), big.nbytes)}
        assert torch.equal(second.flat["big"], big)
        # A note that lies (the slot's bytes are not what it says): the slot is not
        # copied into, which is how one sees the copy skipped. Staging trusts only
        # notes the writer made from the arena's own bytes.
        second.flat["big"].zero_()
        staging.release(second)
        third = staging.stage({"big": big, "small": small})
        assert set(third.found.verified) == {"big"} and not third.flat["big"].any()
        staging.release(third)
        big.data.add_(1.0)  # bypasses the version counter: hashed, differs, copied
        fourth = staging.stage({"big": big, "small": small})
        assert fourth.found.verified == {} and torch.equal(fourth.flat["big"], big)
        staging.release(fourth)
        fifth = staging.stage({"big": big, "small": small})  # the slot's note is gone
        assert fifth.found.verified == {} and torch.equal(fifth.flat["big"], big)
        staging.release(fifth)
        staging.close()


def test_ctrl_c_while_staging_waits_for_hashes_is_not_swallowed():
    """A KeyboardInterrupt while the caller waits for the in-place hashes ends the
    staging (after the hash jobs stop reading the tensors), not turned into copies."""
    from concurrent.futures import Future

    from ckptstore.engine.unchanged import Check, Held

    def interrupted():
        raise KeyboardInterrupt

    done: Future[str] = Future()
    done.set_result("x")
    held = Held(slots={3: ("d", (0, 0))})
    t = torch.zeros(2)
    check = Check([(3, "d")], interrupted, [done], {3: ["t"]}, [t], set())
    with pytest.raises(KeyboardInterrupt):
        check.finish(held)

    def failed():
        raise RuntimeError("a hash job failed")

    untrusted: set[str] = set()
    found, same = Check([(3, "d")], failed, [done], {3: ["t"]}, [t], untrusted).finish(held)
    assert (found.verified, same, held.slots) == ({}, frozenset(), {})  # copied, forgotten
    assert untrusted == set()  # a failed hash says nothing of the counter


@pytest.mark.parametrize("full", [False, True], ids=["linked", "full"])
def test_a_change_after_staging_returns_never_reaches_the_save(root, full):
    """The hash that spares a copy is taken while the caller waits: a write that
    bypasses the version counter after ``save_async`` returned is not in the save,
    linked or (a full save on demand) written from the arena."""
    frozen = torch.randn(400_000)
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        inc = ckpt._save_cache.incremental
        ckpt.save({"frozen": frozen, "w": torch.zeros(8)}, step=1)
        before = frozen.clone()
        pending = ckpt.save_async({"frozen": frozen, "w": torch.ones(8)}, step=2, full=full)
        frozen.data.mul_(2.0)  # after staging returned: not part of step 2
        pending.wait()
        assert set(inc.given) == {"frozen"}  # not copied: the arena held it
        assert bool(ckpt.latest().manifest.linked) is not full
        load_equal(ckpt, 2, {"frozen": before, "w": torch.ones(8)})
        ckpt.save({"frozen": frozen, "w": torch.ones(8)}, step=3)  # now it is
        assert inc.given == {}
        load_equal(ckpt, 3, {"frozen": frozen.clone(), "w": torch.ones(8)})


def _hold_hashes(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> Any:
    """Hashes of pieces ``nbytes`` long (a trusted tensor's) wait until the returned
    event is set, whichever thread runs them: a pool's, or the one that waits for them
    (dcp.hashing)."""
    import threading

    import ckptstore.dcp.hashing as hashing_mod

    release, real = threading.Event(), hashing_mod._hash_all

    def held(pieces: list[Any]) -> list[str]:
        if any(len(p) == nbytes for p in pieces):
            release.hits += 1
            assert release.wait(30)
        return real(pieces)

    release.hits = 0  # the test checks that the hold held something
    monkeypatch.setattr(hashing_mod, "_hash_all", held)
    return release


def test_trusting_version_counters_hashes_after_returning_and_a_bypassing_write_fails_the_save(
    root, monkeypatch
):
    """trust_version_counters: once a tensor's hash matched with its counter unmoved,
    later saves do not wait for its hash; it is checked before the commit. A write
    through ``.data`` (no counter move) then fails that save (StateChangedError, stale
    bytes never committed) and the tensor is hashed before returning from then on."""
    frozen, w = torch.randn(400_000), torch.zeros(8)
    cfg = {"codec": "none", "incremental": True, "trust_version_counters": True}
    with ckptstore.Checkpointer(root, **cfg) as ckpt:
        inc = ckpt._save_cache.incremental
        arena_held = []

        def later(step: int) -> bool:
            pending = ckpt.save_async({"frozen": frozen, "w": w}, step=step)
            pending.wait()
            held = next(a.held for a in ckpt._staging._free)
            arena_held.append(held)
            return bool(held.trusted)

        assert not later(1)  # copied whole
        w.add_(1.0)
        assert later(2)  # hashed in place, matched: trusted from now on
        assert set(inc.given) == {"frozen"} and ckpt.latest().manifest.linked
        w.add_(1.0)
        release = _hold_hashes(monkeypatch, frozen.nbytes)
        pending = ckpt.save_async({"frozen": frozen, "w": w}, step=3)
        assert not pending.committed.done()  # returned before frozen was hashed
        release.set()
        pending.wait()
        assert release.hits == 1  # the hold held the trusted hash
        assert set(inc.given) == {"frozen"} and ckpt.latest().manifest.linked
        load_equal(ckpt, 3, {"frozen": frozen.clone(), "w": w.clone()})
        assert ckpt._save_cache.confirm is None  # its tensors are not held past the save

        before = frozen.clone()
        frozen.data.add_(1.0)  # before the save, behind the counter
        w.add_(1.0)
        with pytest.raises(ckptstore.StateChangedError, match="frozen") as err:
            ckpt.save({"frozen": frozen, "w": w}, step=4)
        assert err.value.names == ["frozen"]
        assert ckpt.latest().step == 3 and not ckpt.exists(4)
        load_equal(ckpt, 3, {"frozen": before, "w": w - 1.0})
        ckpt.save({"frozen": frozen, "w": w}, step=4)  # hashed in place: differs, copied
        load_equal(ckpt, 4, {"frozen": frozen.clone(), "w": w.clone()})
        w.add_(1.0)
        assert not later(5)  # unchanged again, but never trusted again
        assert set(inc.given) == {"frozen"}
        load_equal(ckpt, 5, {"frozen": frozen.clone(), "w": w.clone()})


def test_trusting_version_counters_the_metadata_is_written_while_the_trusted_hash_runs(
    root, monkeypatch
):
    """The coordinator checks the trusted hash only just before it commits: ``.metadata``
    is written meanwhile (it does not depend on that hash), and a hash that differs
    still fails the save with nothing of it left behind."""
    import time

    frozen, w = torch.randn(400_000), torch.zeros(8)
    cfg = {"codec": "none", "incremental": True, "trust_version_counters": True}
    with ckptstore.Checkpointer(root, **cfg) as ckpt:
        for step in (1, 2):  # copied, then hashed in place and trusted
            w.add_(1.0)
            ckpt.save({"frozen": frozen, "w": w}, step=step)
        for step, bypass in ((3, False), (4, True)):
            w.add_(1.0)
            if bypass:
                frozen.data.add_(1.0)  # behind the counter: the trusted hash differs
            release = _hold_hashes(monkeypatch, frozen.nbytes)
            pending = ckpt.save_async({"frozen": frozen, "w": w}, step=step)
            deadline = time.monotonic() + 10
            while not list(pathlib.Path(root).glob(".tmp-*/.metadata")):
                assert time.monotonic() < deadline, "no .metadata while the hash was held"
                time.sleep(0.005)
            assert not pending.committed.done() and not ckpt.exists(step)
            release.set()
            if bypass:
                with pytest.raises(ckptstore.StateChangedError, match="frozen"):
                    pending.wait()
            else:
                pending.wait()
            assert release.hits == 1  # the hold held the trusted hash
        assert [c.step for c in ckpt.list()] == [1, 2, 3]
        assert not list(pathlib.Path(root).glob(".tmp-*"))  # the failed save's is gone
        assert ckpt.verify(3) == []


def _trust_then_write_behind(ckpt: ckptstore.Checkpointer, frozen: Any, w: Any) -> None:
    """Three saves (``frozen`` copied, then hashed in place, then trusted), then a write
    to ``frozen`` behind its version counter."""
    for step in (1, 2, 3):
        w.add_(1.0)
        ckpt.save({"frozen": frozen, "w": w}, step=step)
    frozen.data.add_(1.0)


def test_trusting_version_counters_an_abandoned_save_still_settles_the_trusted_hash(root, caplog):
    """A save abandoned once staged (its guard raised) never reaches the commit that
    checks the trusted hash: releasing its staging buffer settles it, so a tensor changed
    behind its counter is not trusted again, and the next save works."""

    class Refuse:
        def snapshot(self) -> None:
            pass

        def check(self) -> None:
            raise RuntimeError("the state moved during the copy")

    frozen, w = torch.randn(400_000), torch.zeros(8)
    cfg = {"codec": "none", "incremental": True, "trust_version_counters": True}
    with ckptstore.Checkpointer(root, **cfg) as ckpt:
        _trust_then_write_behind(ckpt, frozen, w)
        pending = ckpt.save_async(
            {"frozen": frozen, "w": w}, step=4, block_until_staged=False, guard=Refuse()
        )
        with pytest.raises(RuntimeError, match="moved"):
            pending.wait()
        ckpt.wait()
        assert ckpt._staging.untrusted == {"frozen"}
        ckpt.save({"frozen": frozen, "w": w}, step=5)
        load_equal(ckpt, 5, {"frozen": frozen.clone(), "w": w.clone()})
        assert [c.step for c in ckpt.list()] == [1, 2, 3, 5]
    assert "hashing them after a failed save: frozen changed" in caplog.text


def test_trusting_version_counters_a_save_that_fails_settles_the_trusted_hash_first(
    root, monkeypatch, caplog
):
    """A save that fails before its commit (here: its shard's fsync) never checks the
    trusted hash there: it is settled before the caller hears of the failure, so by
    then a tensor changed behind its counter is never trusted again (logged), no hash
    of the save still reads the state, and the save's own error is the one raised."""
    import threading

    frozen, w = torch.randn(400_000), torch.zeros(8)
    cfg = {"codec": "none", "incremental": True, "trust_version_counters": True}
    with ckptstore.Checkpointer(root, **cfg) as ckpt:
        _trust_then_write_behind(ckpt, frozen, w)
        w.add_(1.0)
        real = direct_io_mod.os.fdatasync
        calls: list[int] = []

        def fdatasync(fd: int) -> None:
            calls.append(fd)
            if len(calls) == 1:  # the first file's (its shard's)
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real(fd)

        monkeypatch.setattr(direct_io_mod.os, "fdatasync", fdatasync)
        # Giving the staging buffer back settles too: held until checked, so that only
        # the save's own failure path can have settled it by then
        checked, give_back = threading.Event(), ckpt._staging.release
        monkeypatch.setattr(
            ckpt._staging, "release", lambda staged: (checked.wait(10), give_back(staged))
        )
        pending = ckpt.save_async({"frozen": frozen, "w": w}, step=4)
        with pytest.raises(ckptstore.StorageError, match="Input/output error"):
            pending.wait()
        try:
            assert ckpt._staging.untrusted == {"frozen"}
            assert "hashing them after a failed save: frozen changed" in caplog.text
        finally:
            checked.set()
        monkeypatch.setattr(direct_io_mod.os, "fdatasync", real)
        ckpt.wait()
        ckpt.save({"frozen": frozen, "w": w}, step=5)
        load_equal(ckpt, 5, {"frozen": frozen.clone(), "w": w.clone()})
        assert [c.step for c in ckpt.list()] == [1, 2, 3, 5]


def test_trusting_version_counters_hashes_the_trusted_only_once_the_copy_is_done(root, monkeypatch):
    """The trusted tensors' hashes start once the rest is copied, not alongside the
    copy (on two cores the two slowed each other down, and the caller waits for the
    copy), and before ``save_async`` returns."""
    import ckptstore.engine.stager as stager_mod

    frozen, w = torch.randn(400_000), torch.zeros(70_000)  # w: copied every save
    cfg = {"codec": "none", "incremental": True, "trust_version_counters": True}
    with ckptstore.Checkpointer(root, **cfg) as ckpt:
        ckpt.save({"frozen": frozen, "w": w}, step=1)
        w.add_(1.0)
        ckpt.save({"frozen": frozen, "w": w}, step=2)  # matched: trusted
        w.add_(1.0)
        pool = ckpt._staging.hash_pool
        submitted: list[str] = []
        real_submit, real_copy = pool.submit, stager_mod._copy

        def submit(fn, *args, **kwargs):
            submitted.append("hash")
            return real_submit(fn, *args, **kwargs)

        def copy(*args, **kwargs):
            submitted.append("copy")
            return real_copy(*args, **kwargs)

        monkeypatch.setattr(pool, "submit", submit)
        monkeypatch.setattr(stager_mod, "_copy", copy)
        pending = ckpt.save_async({"frozen": frozen, "w": w}, step=3)
        assert submitted[0] == "copy" and submitted.count("hash") >= 1, submitted
        pending.wait()
        assert ckpt.latest().manifest.linked
        load_equal(ckpt, 3, {"frozen": frozen.clone(), "w": w.clone()})


@pytest.mark.parametrize("through", ["torch", "data"])
def test_trusting_version_counters_a_write_after_returning(root, through, monkeypatch):
    """A trusted tensor written after ``save_async`` returned, before its hash, through
    torch or ``.data``: the bytes at the save cannot be known (a ``.data`` write before
    the save looks the same), so the save fails rather than guess; the next one, hashed
    before returning, holds the new bytes."""
    frozen, w = torch.randn(400_000), torch.zeros(8)
    cfg = {"codec": "none", "incremental": True, "trust_version_counters": True}
    with ckptstore.Checkpointer(root, **cfg) as ckpt:
        ckpt.save({"frozen": frozen, "w": w}, step=1)
        ckpt.save({"frozen": frozen, "w": w + 1}, step=2)  # matched: trusted
        release = _hold_hashes(monkeypatch, frozen.nbytes)
        pending = ckpt.save_async({"frozen": frozen, "w": w + 2}, step=3)
        (frozen if through == "torch" else frozen.data).mul_(2.0)
        release.set()
        with pytest.raises(ckptstore.StateChangedError, match="frozen") as err:
            pending.wait()
        assert ("version counter moved" in str(err.value)) is (through == "torch")
        # (stranger test: the message says what to do instead)
        assert ("wait for pending.committed" in str(err.value)) is (through == "torch")
        assert release.hits == 1  # the hold held the trusted hash
        assert not ckpt.exists(3)
        ckpt.save({"frozen": frozen, "w": w + 2}, step=3)  # hashed in place now
        load_equal(ckpt, 3, {"frozen": frozen.clone(), "w": w + 2})


def test_trusting_version_counters_a_data_write_before_and_a_torch_write_after_fail_the_save(
    root, monkeypatch
):
    """A ``.data`` write before the save, then a tracked one after it returned: the
    counter moved, but not for the first change. The save fails; nothing stale (the
    arena's bytes from before the ``.data`` write) is committed."""
    frozen, w = torch.randn(400_000), torch.zeros(8)
    cfg = {"codec": "none", "incremental": True, "trust_version_counters": True}
    with ckptstore.Checkpointer(root, **cfg) as ckpt:
        ckpt.save({"frozen": frozen, "w": w}, step=1)
        ckpt.save({"frozen": frozen, "w": w + 1}, step=2)  # trusted
        frozen.data.add_(1.0)
        release = _hold_hashes(monkeypatch, frozen.nbytes)
        pending = ckpt.save_async({"frozen": frozen, "w": w + 2}, step=3)
        frozen.add_(0.0)  # the counter moves; the bytes are those of the save
        release.set()
        with pytest.raises(ckptstore.StateChangedError, match="frozen"):
            pending.wait()
        assert release.hits == 1  # the hold held the trusted hash
        assert not ckpt.exists(3)


def test_trusting_version_counters_never_trusts_a_state_built_anew_each_save(root):
    """Tensors cloned for each save are new ones: one may land at the address of the
    last with its counter at 0 again, which says nothing. Only the storage whose hash
    matched is trusted, so a change is copied, not reported as a failure."""
    frozen = torch.randn(400_000)
    cfg = {"codec": "none", "incremental": True, "trust_version_counters": True}
    with ckptstore.Checkpointer(root, **cfg) as ckpt:
        for step in range(1, 7):
            if step == 5:
                frozen.add_(1.0)
            ckpt.save({"frozen": frozen.clone(), "w": torch.full((8,), float(step))}, step)
            held = next(a.held for a in ckpt._staging._free)
            assert all(ref() is None for ref in held.trusted.values())  # the clone is gone
            load_equal(ckpt, step, {"frozen": frozen.clone(), "w": torch.full((8,), float(step))})


def test_trusting_version_counters_a_failure_untrusts_the_tensor_in_every_arena(root):
    """With two saves in flight the arenas alternate; a tensor one of them found
    changed behind its counter is not trusted by the other either: one failed save."""
    frozen, w = torch.randn(400_000), torch.zeros(8)
    cfg = {"codec": "none", "incremental": True, "trust_version_counters": True}
    with ckptstore.Checkpointer(root, max_inflight=2, **cfg) as ckpt:
        first = ckpt.save_async({"frozen": frozen, "w": w + 1}, step=1)
        ckpt.save_async({"frozen": frozen, "w": w + 2}, step=2).wait()  # the second arena
        first.wait()
        for step in (3, 4, 5, 6):  # the arenas alternate: both trust frozen
            ckpt.save({"frozen": frozen, "w": w + step}, step=step)
        assert [len(a.held.trusted) for a in ckpt._staging._free] == [1, 1]
        frozen.data.add_(1.0)
        failed = []
        for step in range(7, 11):
            try:
                ckpt.save({"frozen": frozen, "w": w + step}, step=step)
                load_equal(ckpt, step, {"frozen": frozen.clone(), "w": w + step})
            except ckptstore.StateChangedError:
                failed.append(step)
        assert failed == [7], failed
        assert ckpt._staging.untrusted == {"frozen"}


def test_trusting_version_counters_two_entries_sharing_memory_each_with_a_counter(root):
    """Two entries over the same memory with counters of their own (from_numpy twice)
    share a staging slot: a write through one moves only its counter, so the slot is
    copied, not trusted on the other's counter (and the save does not fail)."""
    import numpy as np

    arr = np.random.default_rng(0).random(100_000, dtype=np.float32)
    a, b = torch.from_numpy(arr), torch.from_numpy(arr)
    cfg = {"codec": "none", "incremental": True, "trust_version_counters": True}
    with ckptstore.Checkpointer(root, **cfg) as ckpt:
        for step in range(1, 7):
            if step == 5:
                b.add_(1.0)
            state = {"a": a, "b": b, "w": torch.full((4,), float(step))}
            ckpt.save(state, step)
            load_equal(ckpt, step, {k: v.clone() for k, v in state.items()})


def test_trust_version_counters_must_be_a_bool(root):
    with pytest.raises(ckptstore.InvalidArgumentError, match="trust_version_counters"):
        ckptstore.Checkpointer(root, incremental=True, trust_version_counters="yes")
    with pytest.raises(ckptstore.InvalidArgumentError, match="incremental=True"):
        ckptstore.CheckpointManager(root, trust_version_counters=True)


def expectations(monkeypatch) -> list[int | None]:
    """The size each shard file is created expecting (``size_hint``), in order."""
    import ckptstore.storage.local as local_mod

    expected: list[int | None] = []

    class Spy(local_mod.DirectFileSink):
        def __init__(self, path, direct=True, expect=None):
            if path.endswith(".distcp"):
                expected.append(expect)
            super().__init__(path, direct, expect)

    monkeypatch.setattr(local_mod, "DirectFileSink", Spy)
    return expected


def test_the_shard_file_is_created_expecting_what_staging_did_not_find_unchanged(root, monkeypatch):
    """The writer tells the store how much it expects to write (a local disk can write a
    small file through the page cache: storage._direct_io.BUFFERED_BYTES)."""
    expected = expectations(monkeypatch)
    frozen, w = torch.randn(400_000), torch.randn(1000)
    with ckptstore.Checkpointer(root, codec="none", incremental=True, full_every=3) as ckpt:
        for step in range(1, 6):
            w.add_(1.0)
            ckpt.save_async({"frozen": frozen, "w": w}, step=step, full=step == 5).wait()
            load_equal(ckpt, step, {"frozen": frozen.clone(), "w": w.clone()})
    # Nothing to link from, then w alone twice, then the save full_every=3 makes full,
    # then one full on demand: a save that writes everything says nothing
    assert expected == [None, 4_000, 4_000, None, None], expected


def test_full_training_writes_its_shard_as_a_full_save_does(root, monkeypatch):
    """Where nothing was worth linking the last time and staging found nothing unchanged
    (everything changes: full training), the shard is created as a full save's (size
    unknown: direct I/O on local disk); where the last save linked, it expects what it
    may write. (On this project's VM the page cache path took 2x as long for a 40 MB
    shard of 40,000 changing tensors: 218 against 109 ms.)"""
    expected = expectations(monkeypatch)
    # small tensors: staging copies them, so only the writer's hash finds them unchanged
    state = {f"p{i}": torch.randn(100) for i in range(300)}
    with ckptstore.Checkpointer(root, codec="none", incremental=True, full_every=3) as ckpt:
        for step in range(1, 9):
            if step <= 3 or step == 8:
                for t in state.values():
                    t.add_(1.0)
            else:
                state["p0"].add_(1.0)  # the rest frozen
            ckpt.save(state, step=step)
            load_equal(ckpt, step, {k: v.clone() for k, v in state.items()})
    # 1-3 and after them 4: the last save found nothing worth linking; 5: it linked; 6:
    # the save full_every=3 makes full; 7: that one found what it could have linked; 8:
    # everything changed, but the last save linked: it cannot know before hashing
    want = [None, None, None, None, 120_000, None, 120_000, 120_000]
    assert expected == want, expected


def test_a_save_that_fails_at_its_commit_leaves_the_guess_to_the_last_committed_one(
    root, monkeypatch
):
    """Whether the last save found anything worth linking is taken from the last save
    that committed: one that failed after its shard was written (at the manifest) does
    not count."""
    import ckptstore.storage.local as local_mod

    expected = expectations(monkeypatch)
    state = {f"p{i}": torch.randn(100) for i in range(300)}
    real_commit = local_mod._LocalPending.commit

    def failing(self, manifest):
        raise ckptstore.errors.StorageError(errno.EIO, "injected")

    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        for step in range(1, 6):
            for t in state.values() if step <= 2 else [state["p0"]]:
                t.add_(1.0)
            if step == 3:  # would link (the rest is frozen from here), but fails
                monkeypatch.setattr(local_mod._LocalPending, "commit", failing)
                with pytest.raises(ckptstore.CkptStoreError):
                    ckpt.save(state, step=step)
                monkeypatch.setattr(local_mod._LocalPending, "commit", real_commit)
                continue
            ckpt.save(state, step=step)
            load_equal(ckpt, step, {k: v.clone() for k, v in state.items()})
        assert [i.step for i in ckpt.list()] == [1, 2, 4, 5]
    # 3 failed: 4 goes by 2 (nothing worth linking), 5 by 4 (linked)
    assert expected == [None, None, None, None, 120_000], expected


def test_only_the_counters_of_tensors_too_large_to_pack_are_read(root, monkeypatch):
    """A save reads no version counter of a tensor small enough to pack: it is hashed
    whatever its counter says (reading 40,000 of them took 26 ms of the caller's time)."""
    import ckptstore.engine.stager as stager_mod

    read = []
    version = stager_mod._version
    monkeypatch.setattr(stager_mod, "_version", lambda t: read.append(t.numel()) or version(t))
    state = {f"p{i}": torch.randn(100) for i in range(300)}
    state["big"] = torch.randn(100_000)
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        for step in (1, 2):
            state["big"].add_(1.0)
            ckpt.save(state, step=step)
            load_equal(ckpt, step, {k: v.clone() for k, v in state.items()})
    assert read == [100_000, 100_000]


# ---- bit rot in a shared file, and random sequences -------------------------------------


def test_bit_rot_in_a_shared_file_is_named_in_every_checkpoint_that_links_it(root, caplog):
    """A linked file is one file: damage in it is damage in each checkpoint holding
    it, and verify says so for each; a restore falls back past all of them to a full
    save (full_every bounds how far back that is)."""
    import logging

    import damage

    frozen = frozen_state()
    with ckptstore.CheckpointManager(root, incremental=True, full_every=3, codec="none") as mgr:
        for step in range(5):  # steps 1 (full), 2, 3 (linked), 4 (full), 5 (linked)
            mgr.save(step, state_at(step, frozen)).wait()
    damage.xor(os.path.join(root, "step_00000004", "__0_0.distcp"), 1 << 20)
    with ckptstore.Checkpointer(root) as ckpt:
        linked = {i.step: i.manifest.linked for i in ckpt.list()}
        assert linked[5] == {"__0_0-step_00000004.distcp": "step_00000004"}
        problems = {step: ckpt.verify(step) for step in range(1, 6)}
    assert problems[1] == problems[2] == problems[3] == []
    assert problems[4] and problems[5], problems
    with (
        caplog.at_level(logging.WARNING, logger="ckptstore"),
        ckptstore.CheckpointManager(root) as mgr,
    ):
        target = {k: torch.zeros_like(v) for k, v in state_at(2, frozen).items()}
        assert mgr.restore(target) == 3
    for k, v in state_at(2, frozen).items():
        assert torch.equal(target[k], v), k


def _random_sequence(
    root: str, ops: list[tuple[str, int]], tally: dict[str, int], trust: bool = False
) -> None:
    """Saves (some tensors changed, some not), deletions, retention, failed saves and
    restarts of the checkpointer, in random order; after each step every listed
    checkpoint verifies and loads bit-exact. ``trust``: trust_version_counters, with
    the same tensors from save to save (changed in place), and writes behind their
    counters ("bypass"): the next save then either fails with StateChangedError (the
    tensor was trusted; it is not listed, and saving again works) or holds the new bytes."""
    from ckptstore.manager import retention
    from ckptstore.storage import LocalBackend

    n = 100_000 if trust else 20_000  # trusted: large enough to be hashed in place
    base = {f"w{i}": torch.randn(n, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    live = {k: v.clone() for k, v in base.items()}
    cfg = {"codec": "none", "incremental": True, "full_every": 4, "trust_version_counters": trust}
    expected: dict[int, dict[str, torch.Tensor]] = {}
    step, fresh = 0, False
    ckpt = ckptstore.Checkpointer(root, **cfg)
    try:
        for op, arg in ops:
            if op == "save":
                step += 1
                if trust:
                    for i in range(arg):  # the first ``arg`` tensors change, in place
                        live[f"w{i}"].add_(1.0)
                    state = live
                else:
                    state = {k: v.clone() for k, v in base.items()}
                    for i in range(arg):
                        state[f"w{i}"] += step
                try:
                    ckpt.save(state, step=step)
                except ckptstore.StateChangedError:
                    assert trust
                    tally["refused"] += 1
                    assert not ckpt.exists(step)
                    ckpt.save(state, step=step)  # hashed before returning now: copied
                expected[step] = {k: v.clone() for k, v in state.items()}
                tally["linked"] += bool(ckpt.latest().manifest.linked)
                tally["linked_after_restart"] += fresh and bool(ckpt.latest().manifest.linked)
                fresh = False
            elif op == "bypass" and trust:
                live[f"w{arg}"].data.add_(1.0)  # behind its version counter
            elif op == "fail":
                step += 1
                real = ShardWriter.finish

                def failing(self):
                    self.abort()
                    raise ckptstore.errors.StorageError(errno.EIO, "injected")

                ShardWriter.finish = failing  # type: ignore[method-assign]
                try:
                    with pytest.raises(ckptstore.CkptStoreError):
                        ckpt.save(live if trust else dict(base), step=step)
                finally:
                    ShardWriter.finish = real  # type: ignore[method-assign]
            elif op == "delete" and expected:
                victim = sorted(expected)[arg % len(expected)]
                origin = f"step_{victim:08d}"
                tally["origins_deleted"] += any(
                    origin in i.manifest.linked.values() for i in ckpt.list() if i.step != victim
                )
                LocalBackend(root).delete(origin)
                del expected[victim]
            elif op == "prune" and expected:
                retention.prune(LocalBackend(root), ckptstore.KeepLast(1 + arg % 3))
                listed = {i.step for i in ckpt.list()}
                expected = {s: v for s, v in expected.items() if s in listed}
            elif op == "restart":  # it then loads every checkpoint: links from the last
                ckpt.close()
                ckpt = ckptstore.Checkpointer(root, **cfg)
                fresh = True
            assert sorted(i.step for i in ckpt.list()) == sorted(expected)
            for s, want in expected.items():
                load_equal(ckpt, s, want)
    finally:
        ckpt.close()


def _run_random_sequences(tmp_path: Any, trust: bool) -> dict[str, int]:
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    kinds = ["delete", "prune", "fail", "restart"] + (["bypass"] if trust else [])
    op = st.one_of(
        st.tuples(st.just("save"), st.integers(0, 6)),
        st.tuples(st.sampled_from(kinds), st.integers(0, 5)),
    )
    # sequences that do what the tallies below ask for, whatever else is drawn: links
    # right after a restart, origins deleted while later checkpoints link them, and (when
    # trusting) a write behind the counter of a tensor two saves trusted on each arena
    linking = [("save", 0), ("save", 2), ("delete", 0), ("save", 2), ("restart", 0)]
    linking += [("save", 2), ("delete", 0), ("save", 3), ("prune", 0), ("save", 3)]
    behind = [("save", 0)] * 4 + [("bypass", 3), ("save", 1), ("save", 1), ("fail", 0)]

    counter = [0]
    tally = {
        "linked": 0, "origins_deleted": 0, "linked_after_restart": 0, "refused": 0
    }  # fmt: skip

    @settings(
        max_examples=int(os.environ.get("CKPTSTORE_INCREMENTAL_EXAMPLES", "25")),
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @example(ops=linking)
    @example(ops=behind if trust else linking[::-1])
    @given(ops=st.lists(op, min_size=3, max_size=12))
    def run(ops):
        counter[0] += 1
        _random_sequence(str(tmp_path / f"run{counter[0]}"), ops, tally, trust)

    run()
    # the sequences did what they are for: saves that link (some right after a
    # restart), and deletions of checkpoints whose files later ones still hold
    assert tally["linked"] >= 10 and tally["origins_deleted"] >= 2, tally
    assert tally["linked_after_restart"] >= 1, tally
    return tally


def test_random_sequences_of_saves_deletions_retention_and_failures(tmp_path):
    _run_random_sequences(tmp_path, trust=False)


def test_random_sequences_trusting_version_counters_with_writes_behind_them(tmp_path):
    tally = _run_random_sequences(tmp_path, trust=True)
    assert tally["refused"] >= 1, tally  # a trusted tensor written behind its counter


# ---- found in review ----------------------------------------------------------------


def test_a_step_deleted_and_saved_again_gets_link_names_of_its_own(root):
    """Deleting step 1 and saving it again while step 2 links step 1's first file: the
    new file must not take the name the old one has in the chain."""
    import shutil

    def full(v):
        return torch.full((256, 1024), float(v))

    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        state = {f"t{i}": full(i) for i in range(4)}
        ckpt.save(state, step=1)
        ckpt.save(state, step=2)
        shutil.rmtree(os.path.join(root, "step_00000001"))
        again = {"t0": state["t0"], "t1": state["t1"], "t2": full(20), "t3": full(30)}
        ckpt.save(again, step=1)
        ckpt.save(again, step=3)
        assert len(ckpt.latest().manifest.linked) == 2
        load_equal(ckpt, 3, again)


def test_a_checkpoint_replaced_under_its_name_is_not_linked_from(root):
    frozen = frozen_state()
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        ckpt.save({**frozen, "a": torch.zeros(4)}, step=1)
        other = {k: v + 1 for k, v in frozen.items()}
        ckptstore.save(
            {**other, "a": torch.zeros(4)}, os.path.join(root, "step_00000001"), overwrite=True
        )
        want = {**frozen, "a": torch.ones(4)}
        ckpt.save(want, step=2)
        assert not ckpt.latest().manifest.linked
        load_equal(ckpt, 2, want)


def test_inference_tensors_have_no_version_counter_and_are_hashed(root):
    with torch.inference_mode():
        frozen = torch.randn(100_000)
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        ckpt.save({"frozen": frozen, "a": torch.zeros(4)}, step=1)
        ckpt.save({"frozen": frozen, "a": torch.ones(4)}, step=2)
        assert ckpt.latest().manifest.linked
        load_equal(ckpt, 2, {"frozen": frozen.clone(), "a": torch.ones(4)})


def test_a_copy_never_links_over_a_file_another_copy_made():
    """On an object store a copy keeps the source's names: a name another attempt
    already wrote is not linked over, so a failed attempt cannot remove it."""
    from ckptstore.storage import open_backend

    dst = open_backend("memory://incremental-links/run")
    dst.fs.pipe_file(dst.store_path("step_00000001/a.distcp"), b"source")
    dst.fs.pipe_file(dst.store_path("step_00000002/a.distcp"), b"the other copy's")
    pending = dst.begin("step_00000002")
    assert not pending.link_files({"a.distcp": "step_00000001/a.distcp"})
    pending.abort()
    assert dst.fs.cat_file(dst.store_path("step_00000002/a.distcp")) == b"the other copy's"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_dry_run_sync_says_what_the_copy_will_send_and_link(
    root, tmp_path, capsys, request, where
):
    from ckptstore.cli.main import main

    frozen = frozen_state()
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        for step in range(1, 4):
            ckpt.save(state_at(step, frozen), step=step)
    if where == "s3":
        request.getfixturevalue("s3_server")
        dst = f"s3://{request.getfixturevalue('s3_bucket')}/mirror"
    else:
        dst = str(tmp_path / "mirror")
    assert main(["sync", root, dst, "--dry-run"]) == 0
    planned = re.findall(r"would copy (step_\d+) \((.*)\)", capsys.readouterr().out)
    assert where == "s3" or not os.path.exists(dst)  # a dry run creates nothing
    assert main(["sync", root, dst]) == 0
    done = re.findall(
        r"copied +(step_\d+) \((.*), in [\d.]+ s, verified\)", capsys.readouterr().out
    )
    assert [n for n, _ in planned] == [n for n, _ in done] == [f"step_{s:08d}" for s in (1, 2, 3)]
    for (_, plan), (_, did) in zip(planned, done, strict=True):
        assert plan.replace(" to copy", " copied").replace(" to link", " linked") == did
    assert " linked" in done[1][1] and " linked" not in done[0][1], done


def test_prune_counts_only_the_bytes_deleting_frees(root, capsys):
    """Deleting checkpoints whose files later ones link frees only what no kept one
    shares: the dry run says so, not the sum of their sizes."""
    from ckptstore.cli.main import main

    frozen = frozen_state()
    with ckptstore.Checkpointer(root, codec="none", incremental=True) as ckpt:
        for step in range(1, 6):
            ckpt.save(state_at(step, frozen), step=step)
    assert main(["prune", root, "--keep-last", "2"]) == 0
    out = capsys.readouterr().out
    assert "would delete 3 checkpoint(s), freeing " in out and " KB: step_00000001" in out, out
    # a copy of step 2 set aside (hard links) keeps its files: they are not freed
    two = os.path.join(root, "step_00000002")
    shutil.copytree(two, two + ".damaged-x", copy_function=os.link)
    before = unique_bytes(root)
    assert main(["prune", root, "--keep-last", "1", "--yes"]) == 0
    out = capsys.readouterr().out
    number, unit = re.search(r"\(freed ([\d.]+) (B|KB|MB)\)", out).groups()
    freed = float(number) * {"B": 1, "KB": 1e3, "MB": 1e6}[unit]
    assert abs((before - unique_bytes(root)) - freed) <= 10, out  # (shown to 10 B)
    with ckptstore.Checkpointer(root) as ckpt:
        assert [i.step for i in ckpt.list()] == [5]
        load_equal(ckpt, 5, state_at(5, frozen))


def unique_bytes(root: str) -> int:
    """The bytes of the files under ``root``, each inode once."""
    seen: dict[int, int] = {}
    for top, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(top, name))
            seen[st.st_ino] = st.st_size
    return sum(seen.values())


# ---- after a restart ------------------------------------------------------------------


def test_after_a_restart_the_first_save_links_from_the_checkpoint_it_restored(root):
    """A rank's memory of its last save is also a note in that save's shard: a new
    process that restored a checkpoint (through a manager, or a checkpointer's load)
    links its first save from it; one that restored nothing saves in full. The note is
    not state: loads and verify ignore it. A save that links from nothing (the first;
    full training) has no note: there, it would be bytes for nothing."""
    frozen = frozen_state()
    blank = {k: torch.zeros_like(v) for k, v in state_at(0, frozen).items()}
    # mgr.save(step, ...) names the checkpoint after the steps done: step + 1
    with ckptstore.CheckpointManager(root, incremental=True) as mgr:
        for step in (1, 2):
            mgr.save(step - 1, state_at(step, frozen)).wait()
    with ckptstore.CheckpointManager(root, incremental=True) as mgr:
        assert mgr.restore(dict(blank)) == 2
        mgr.save(2, state_at(3, frozen)).wait()
    with ckptstore.CheckpointManager(root, incremental=True) as mgr:  # restored nothing
        mgr.save(3, state_at(4, frozen)).wait()
    with ckptstore.Checkpointer(root, incremental=True) as ckpt:
        assert [bool(i.manifest.linked) for i in ckpt.list()] == [False, True, True, False]
        ckpt.load(dict(blank), 3)  # not the newest: links from what it loaded
        ckpt.save(state_at(5, frozen), step=5)
        assert ckpt.latest().manifest.linked == {"__0_0-step_00000001.distcp": "step_00000001"}
    with ckptstore.Checkpointer(root) as ckpt:
        for step in range(1, 6):
            load_equal(ckpt, step, state_at(step, frozen))
    assert files_of(root, 5)["__0_0-step_00000001.distcp"].st_ino == (
        files_of(root, 1)["__0_0.distcp"].st_ino
    )


def _flip_note_byte(root: str, step: int) -> None:
    from ckptstore.dcp.incremental import NOTE_KEY

    _flip_item_byte(root, step, lambda key: key == NOTE_KEY)


def _flip_item_byte(root: str, step: int, which: Any) -> str:
    """Flip a byte in the first item of step's own shard whose key ``which`` accepts."""
    from ckptstore.storage import LocalBackend

    name = f"step_{step:08d}"
    with ckptstore.Checkpointer(root) as ckpt:
        entry = next(i for i in ckpt.list() if i.step == step).manifest.files["__0_0.distcp"]
    backend = LocalBackend(root)
    with backend.open_reader(f"{name}/__0_0.distcp") as reader:
        shard = ckptstore.format.shard.ShardReader(
            reader, name, size_bytes=entry.size_bytes, index_xxh3=entry.xxh3_64
        )
        item = next(i for i in shard.items if which(i.key))
    path = os.path.join(root, name, "__0_0.distcp")
    with open(path, "r+b") as f:
        f.seek(item.chunks[0].offset + 3)
        byte = f.read(1)
        f.seek(item.chunks[0].offset + 3)
        f.write(bytes([byte[0] ^ 0x20]))
    return item.key


def test_the_items_a_checkpoint_uses_skip_malformed_storage_entries():
    """A storage entry that is not a {file: str, item: int} is not counted (a load of
    it says what is wrong); verify must not fail on it (it did: a list is unhashable)."""
    from types import SimpleNamespace

    from ckptstore.dcp.metadata import StoredItem
    from ckptstore.engine.ops import items_used

    storage = {
        "a": StoredItem(file="f", item=3),
        "b": StoredItem(file=["f"], item=0),
        "c": {"file": "f", "item": [1]},
        "d": "junk",
        "e": {"file": "g", "item": 5},
        "f": {"item": 7},
    }
    assert items_used(SimpleNamespace(storage_data=storage), ["f"]) == {"f": {3}}


def test_rot_in_what_a_linked_file_holds_but_no_longer_uses_damages_only_its_first_writer(root):
    """A linked file keeps its first save's items that changed since: rot there damages
    that save, not the checkpoints that link the file for its other items."""
    from ckptstore.dcp.incremental import NOTE_KEY

    frozen = frozen_state()
    with ckptstore.Checkpointer(root, incremental=True, codec="none") as ckpt:
        saved, _ = save_chain(ckpt, frozen, 3)
        assert ckpt.latest().manifest.linked == {"__0_0-step_00000001.distcp": "step_00000001"}
        key = _flip_item_byte(root, 1, lambda k: not k.startswith("frozen.") and k != NOTE_KEY)
        assert ckpt.verify(1) != [], key
        for step in (2, 3):
            load_equal(ckpt, step, saved[step])  # verify() == [] included
        frozen_key = _flip_item_byte(root, 1, lambda k: k.startswith("frozen."))
        assert all(ckpt.verify(step) != [] for step in (1, 2, 3)), frozen_key


def test_a_damaged_note_means_a_full_save_never_a_wrong_link(root):
    frozen = frozen_state()
    with ckptstore.Checkpointer(root, incremental=True) as ckpt:
        save_chain(ckpt, frozen, 2)
    _flip_note_byte(root, 2)
    with ckptstore.Checkpointer(root, incremental=True) as ckpt:
        intact = {k: torch.zeros_like(v) for k, v in state_at(2, frozen).items()}
        ckpt.load(intact, 2)  # the state itself is intact: it loads
        ckpt.save(state_at(3, frozen), step=3)
        assert not ckpt.latest().manifest.linked  # the note could not be read: in full
        load_equal(ckpt, 3, state_at(3, frozen))
        assert ckpt.verify(2), "the damaged note is damage like any other"


def test_an_item_not_where_the_memory_says_is_not_linked(root):
    """Before linking, each item used is checked at its position in the file (its key
    and size), whatever said where it lies (this process's memory or a note)."""
    import dataclasses

    frozen = frozen_state()
    with ckptstore.Checkpointer(root, incremental=True) as ckpt:
        save_chain(ckpt, frozen, 1)
        inc = ckpt._save_cache.incremental
        held = inc._items["frozen.0@0,0"]
        other = inc._items["frozen.1@0,0"].item
        inc._items["frozen.0@0,0"] = dataclasses.replace(held, item=other)
        ckpt.save(state_at(2, frozen), step=2)
        assert not ckpt.latest().manifest.linked
        load_equal(ckpt, 2, state_at(2, frozen))


def _note_files_as_a_list(body):
    body["files"] = list(body["files"].values())
    return json.dumps(body).encode()


def _note_since_full_infinite(body):
    body["since_full"] = float("inf")
    return json.dumps(body).encode()


def _note_with_unsafe_names(body):
    body["files"] = {k: ["../elsewhere/" + v[0], *v[1:]] for k, v in body["files"].items()}
    return json.dumps(body).encode()


def _note_with_negative_items(body):
    body["items"] = [[k, f, i - 1000, d, kind] for k, f, i, d, kind in body["items"]]
    return json.dumps(body).encode()


def _note_of_another_version(body):
    body["v"] = 2
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "damage",
    [
        _note_files_as_a_list,
        _note_since_full_infinite,
        _note_with_unsafe_names,
        _note_with_negative_items,
        _note_of_another_version,
        lambda body: b"[" * 100_000 + b"]" * 100_000,  # nested past the recursion limit
        lambda body: b"\xff\x00 not json",
    ],
    ids=["files-list", "infinite", "unsafe-names", "negative-items", "version-2", "deep", "bytes"],
)
def test_a_note_that_makes_no_sense_means_a_full_save_not_a_failed_one(root, monkeypatch, damage):
    """The note is read from disk: whatever it says (a checkpoint written by another
    version, or by hand), the save after a restart goes through, in full if in doubt."""
    from ckptstore.dcp.incremental import IncrementalCache

    frozen = frozen_state()
    real = IncrementalCache.note
    monkeypatch.setattr(
        IncrementalCache, "note", lambda self, *a: damage(json.loads(real(self, *a)))
    )
    with ckptstore.Checkpointer(root, incremental=True) as ckpt:
        save_chain(ckpt, frozen, 2)
        assert ckpt.latest().manifest.linked
    monkeypatch.undo()
    with ckptstore.Checkpointer(root, incremental=True) as ckpt:
        ckpt.load({k: torch.zeros_like(v) for k, v in state_at(2, frozen).items()}, 2)
        ckpt.save(state_at(3, frozen), step=3)
        assert not ckpt.latest().manifest.linked
        load_equal(ckpt, 3, state_at(3, frozen))
        load_equal(ckpt, 2, state_at(2, frozen))


def test_a_run_that_restarts_after_every_save_links_from_the_second_on(root):
    """A preemptible job: each process restores, saves once and is gone. The save of a
    process that restored a checkpoint without a note notes itself anyway."""
    frozen = frozen_state()
    blank = {k: torch.zeros_like(v) for k, v in state_at(0, frozen).items()}
    for step in (1, 2, 3, 4):
        with ckptstore.Checkpointer(root, incremental=True) as ckpt:
            if step > 1:
                ckpt.load(dict(blank), step - 1)
            ckpt.save(state_at(step, frozen), step=step)
    with ckptstore.Checkpointer(root) as ckpt:
        assert [bool(i.manifest.linked) for i in ckpt.list()] == [False, False, True, True]
        for step in (1, 2, 3, 4):
            load_equal(ckpt, step, state_at(step, frozen))


def test_the_note_is_not_counted_as_state(tmp_path):
    frozen = frozen_state()
    raw = []
    for incremental in (True, False):
        with ckptstore.Checkpointer(tmp_path / str(incremental), incremental=incremental) as ckpt:
            save_chain(ckpt, frozen, 2)
            raw.append(ckpt.latest().manifest.raw_bytes)
    assert raw[0] == raw[1]


def test_sync_replace_damaged_on_s3_never_links_from_the_damaged_copy(
    tmp_path, capsys, s3_server, s3_bucket
):
    """On an object store each checkpoint of a chain holds its own copy of the shared
    file. Replacing the damaged copy must not take it from the checkpoint it replaces
    (the oldest holder, which linking prefers), nor the copy under its name from the
    one beside it if that were damaged: the repaired checkpoint verifies."""
    from ckptstore.cli.main import main

    src, remote = str(tmp_path / "src"), f"s3://{s3_bucket}/mirror"
    with ckptstore.Checkpointer(src, codec="none", incremental=True) as ckpt:
        saved, _ = save_chain(ckpt, frozen_state(), 4)
    assert main(["prune", src, "--keep-last", "3", "--yes"]) == 0  # 2 links 1's file first
    assert main(["sync", src, remote]) == 0
    fs = s3_server.fs()
    key = f"{s3_bucket}/mirror/step_00000002/__0_0-step_00000001.distcp"
    fs.pipe_file(key, fs.cat_file(key)[:-10])
    capsys.readouterr()
    assert main(["verify", remote]) == 1
    assert main(["sync", src, remote, "--replace-damaged"]) == 0
    out = capsys.readouterr().out
    # (no rename on S3: its own file is sent beside the damaged copy, then in its place)
    assert re.search(r"replaced step_00000002 \(.*linked; sent twice: beside the old copy, then in its place, in ", out), out  # fmt: skip
    assert main(["verify", remote]) == 0, capsys.readouterr().out
    with ckptstore.Checkpointer(remote) as ckpt:
        load_equal(ckpt, 2, saved[2])


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_a_copy_to_s3_never_copies_a_damaged_remote_file_inside_the_store(
    tmp_path, capsys, s3_server, s3_bucket, how
):
    """A later checkpoint of a chain needs the file the first one wrote. On S3 a copy
    takes it from a checkpoint already there, inside the store (nothing sent from here);
    if every copy there is damaged, the new checkpoint must not be built from one: the
    file is sent from the source instead, and the new checkpoint verifies. (Before, it
    committed damaged and `sync` said "verified".) The checkpoints there that hold the
    damaged copies are named, and the exit status says so: a check of their sizes alone
    would call them present."""
    from ckptstore.cli.main import main

    src, remote = str(tmp_path / "src"), f"s3://{s3_bucket}/mirror"
    with ckptstore.Checkpointer(src, codec="none", incremental=True) as ckpt:
        saved, _ = save_chain(ckpt, frozen_state(), 3)
    assert main(["sync", src, remote, "--step", "1", "--step", "2"]) == 0
    fs = s3_server.fs()
    for key in ("step_00000001/__0_0.distcp", "step_00000002/__0_0-step_00000001.distcp"):
        data = bytearray(fs.cat_file(f"{s3_bucket}/mirror/{key}"))
        if how == "flipped":  # same size: only the bytes can tell
            data[len(data) // 3] ^= 0x40
        else:
            del data[len(data) // 2 :]
        fs.pipe_file(f"{s3_bucket}/mirror/{key}", bytes(data))
    capsys.readouterr()
    assert main(["sync", src, remote, "--step", "3"]) == 1
    out, err = capsys.readouterr()
    assert "__0_0.distcp is damaged (" in err, err
    assert "--verify-existing --replace-damaged` repairs them" in err, err
    assert re.search(r"copied +step_00000003 \(8\.\d\d MB, in ", out), out  # none linked
    for step in (1, 2):
        assert f"DAMAGED  step_0000000{step}: {remote}/step_0000000{step}/__0_0" in out, out
    assert "1 copied, 0 already there, 2 damaged there, 0 failed" in out, out
    # the repair, with the steps named (this run copied --step 3 only)
    assert (
        f"damaged there: step_00000001, step_00000002; to replace them with the copies from "
        f"{src}: ckptstore sync {src} {remote} --step 1 --step 2 --verify-existing "
        "--replace-damaged"
    ) in out, out
    with ckptstore.Checkpointer(remote) as ckpt:
        assert ckpt.verify(3) == []
        load_equal(ckpt, 3, saved[3])
    # and the repair it advises repairs the damaged ones there
    assert main(["verify", remote]) == 1
    assert main(["sync", src, remote, "--verify-existing", "--replace-damaged"]) == 0
    assert main(["verify", remote]) == 0, capsys.readouterr().out


def s3_files_opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names S3 roots open for reading from now on (a download each), in order."""
    opened: list[str] = []
    real_open = ckptstore.storage.s3.S3Backend.open_reader

    def spy(self, name):
        opened.append(name)
        return real_open(self, name)

    monkeypatch.setattr(ckptstore.storage.s3.S3Backend, "open_reader", spy)
    return opened


def test_a_copy_to_s3_takes_the_shared_file_from_the_next_checkpoint_that_holds_it_intact(
    tmp_path, capsys, s3_server, s3_bucket, monkeypatch
):
    """A review found it: with the oldest copy of a chain's shared file damaged on the
    store, every later copy sent the whole file again although a newer checkpoint there
    holds it intact. Now the next holder is checked and copied from, and the damaged one
    is not downloaded again while it is not written again."""
    from ckptstore import linking
    from ckptstore.cli.main import main

    src, remote = str(tmp_path / "src"), f"s3://{s3_bucket}/mirror"
    with ckptstore.Checkpointer(src, codec="none", incremental=True) as ckpt:
        saved, _ = save_chain(ckpt, frozen_state(), 4)
    monkeypatch.setattr(linking, "_checked", {})
    assert main(["sync", src, remote, "--step", "1", "--step", "2"]) == 0
    fs = s3_server.fs()
    key = f"{s3_bucket}/mirror/step_00000001/__0_0.distcp"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 3] ^= 0x40
    fs.pipe_file(key, bytes(data))
    opened = s3_files_opened(monkeypatch)
    capsys.readouterr()
    assert main(["sync", src, remote, "--step", "3"]) == 1  # names the damaged one
    out, err = capsys.readouterr()
    assert "step_00000001/__0_0.distcp is damaged (" in err, err
    assert "DAMAGED  step_00000001: " in out and "DAMAGED  step_00000002" not in out, out
    assert re.search(r"copied +step_00000003 \(\d+\.\d\d KB copied, 8\.\d\d MB linked", out), out
    opened.clear()
    assert main(["sync", src, remote, "--step", "4"]) == 1
    out, err = capsys.readouterr()
    assert "step_00000001/__0_0.distcp" not in " ".join(opened), opened  # known damaged
    assert "DAMAGED  step_00000001: " in out, out  # (known, not read again: still named)
    assert re.search(r"copied +step_00000004 \(\d+\.\d\d KB copied, 8\.\d\d MB linked", out), out
    with ckptstore.Checkpointer(remote) as ckpt:
        for step in (3, 4):
            assert ckpt.verify(step) == []
            load_equal(ckpt, step, saved[step])


def test_a_copy_to_s3_checks_a_file_there_once_while_it_is_not_written_again(
    tmp_path, s3_server, s3_bucket, monkeypatch
):
    """The check before a copy inside the store downloads the file; a file this
    process uploaded (and read back) or checked, whose ETag has not changed since, is
    not downloaded again: each later copy of a chain sends only what changed and reads
    nothing back but that."""
    from ckptstore import linking
    from ckptstore.cli.main import main

    src, remote = str(tmp_path / "src"), f"s3://{s3_bucket}/mirror"
    with ckptstore.Checkpointer(src, codec="none", incremental=True) as ckpt:
        saved, _ = save_chain(ckpt, frozen_state(), 4)
    opened = s3_files_opened(monkeypatch)
    monkeypatch.setattr(linking, "_checked", {})  # nothing checked yet in this process
    assert main(["sync", src, remote, "--step", "1"]) == 0  # uploaded, read back
    opened.clear()
    assert main(["sync", src, remote, "--step", "2", "--step", "3"]) == 0
    assert not [n for n in opened if n.startswith("step_00000001/")], opened
    linking._checked.clear()  # another process: checks the file once
    opened.clear()
    assert main(["sync", src, remote, "--step", "4"]) == 0
    assert [n for n in opened if n.endswith("__0_0.distcp") and "step_00000001" in n] == [
        "step_00000001/__0_0.distcp"
    ], opened
    with ckptstore.Checkpointer(remote) as ckpt:
        assert ckpt.latest().manifest.linked  # linked, not sent
        load_equal(ckpt, 4, saved[4])


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_pull_replace_damaged_repairs_a_chain_whose_shared_file_is_damaged(tmp_path, capsys, how):
    """A pulled chain links one file from its first checkpoint into the later ones (hard
    links): damage to it is every checkpoint's. `pull --replace-damaged` finds it by
    reading every byte (a local destination) and replaces each checkpoint, copying the
    file again where the one it would link is the damaged one."""
    import damage

    from ckptstore.cli.main import main

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    with ckptstore.Checkpointer(src, codec="none", incremental=True) as ckpt:
        saved, _ = save_chain(ckpt, frozen_state(), 3)
    assert main(["pull", src, dst]) == 0
    shard = os.path.join(dst, "step_00000001", "__0_0.distcp")
    linked = os.path.join(dst, "step_00000003", "__0_0-step_00000001.distcp")
    assert os.stat(shard).st_ino == os.stat(linked).st_ino  # one file, three checkpoints
    if how == "flipped":  # bit rot: sizes still match the manifests
        damage.xor(shard, os.path.getsize(shard) // 2)
    else:
        os.truncate(shard, os.path.getsize(shard) // 2)
    capsys.readouterr()
    assert main(["verify", dst]) == 1
    out = capsys.readouterr().out
    assert (
        "note: step_00000001, step_00000002, step_00000003 share one damaged file, "
        "step_00000001/__0_0.distcp (incremental saves link one file into each)"
    ) in out, out
    assert "verify ROOT" not in out, out  # (the advice load errors give)
    assert main(["verify", dst, "--json"]) == 1
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("share one damaged file" in n for n in notes), notes
    assert main(["pull", src, dst, "--replace-damaged"]) == 0
    out = capsys.readouterr().out
    assert out.count("replaced step_0000000") == 3, out
    assert main(["verify", dst]) == 0
    with ckptstore.Checkpointer(dst) as ckpt:
        for step in (1, 2, 3):
            load_equal(ckpt, step, saved[step])
    # Still one file: each replaced checkpoint linked the one replaced before it
    assert os.stat(shard).st_ino == os.stat(linked).st_ino


def test_a_sync_to_a_local_disk_names_the_checkpoints_whose_shared_file_it_found_damaged(
    tmp_path, capsys
):
    """On a local destination a copy links a chain's file unchecked and reads the new
    checkpoint back: a damaged link is found there, and the file sent again. The
    checkpoints there that hold the damaged file are named, and the exit status is 1,
    where a check of their sizes alone would call them present (a re-test found it)."""
    import damage

    from ckptstore.cli.main import main

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    with ckptstore.Checkpointer(src, codec="none", incremental=True) as ckpt:
        saved, _ = save_chain(ckpt, frozen_state(), 4)
    assert main(["sync", src, dst, "--step", "1", "--step", "2"]) == 0
    shard = os.path.join(dst, "step_00000001", "__0_0.distcp")
    damage.xor(shard, os.path.getsize(shard) // 2)  # the same file in both there
    capsys.readouterr()
    assert main(["sync", src, dst]) == 1
    out, err = capsys.readouterr()
    assert re.search(r"present +step_00000001\n", out), out  # (sizes match)
    assert re.search(r"copied +step_00000003 \(8\.\d\d MB, in ", out), out  # sent again
    # the next copy of the run does not link from them again (read back, deleted, redone):
    # it links from step 3's copy, sent just now
    assert re.search(r"copied +step_00000004 \(\d+\.\d\d KB copied, 8\.\d\d MB linked", out), out
    assert err.count("a file linked from another checkpoint there is damaged") == 1, err
    assert err.count("__0_0.distcp is damaged (") == 1, err  # one read of the shared file
    assert f"DAMAGED  step_00000001: {dst}/step_00000001/__0_0.distcp is damaged" in out, out
    assert f"DAMAGED  step_00000002: {dst}/step_00000002/__0_0-step_00000001" in out, out
    assert "2 copied, 0 already there, 2 damaged there, 0 failed" in out, out  # once each
    assert out.count("DAMAGED") == 2, out
    assert f"ckptstore sync {src} {dst} --verify-existing --replace-damaged" in out, out
    # found by the check too (--verify-existing): each named once, and the copy that
    # links from them is not stopped by them
    shutil.rmtree(os.path.join(dst, "step_00000003"))
    assert main(["sync", src, dst, "--verify-existing"]) == 1
    out = capsys.readouterr().out
    assert out.count("DAMAGED") == 2 and "ckptstore verify" not in out, out
    assert "1 copied, 1 already there, 2 damaged there, 0 failed" in out, out
    assert main(["sync", src, dst, "--replace-damaged"]) == 0  # the repair it advises
    out = capsys.readouterr().out
    assert "0 copied, 2 replaced, 2 already there, 0 failed" in out, out
    assert main(["verify", dst]) == 0
    with ckptstore.Checkpointer(dst) as ckpt:
        for step in (1, 2, 3):
            load_equal(ckpt, step, saved[step])


def incremental_backup(root, url: str) -> ckptstore.CheckpointManager:
    """A manager saving incremental checkpoints (codec none) to ``root``, backed up to
    ``url``."""
    return ckptstore.CheckpointManager(root, backup=url, incremental=True, codec="none")


def save_backed_up(mgr, steps, frozen, at=None) -> None:
    """Save ``steps`` (state_at each, or at ``at``) and wait until each is backed up."""
    for step in steps:
        mgr.save(step, state_at(step if at is None else at, frozen))
        mgr.wait()
        assert mgr.wait_backup() == [], step


def rot_on_s3(s3_server, key: str) -> None:
    """Flip a byte of object ``key`` (bit rot on the store, same size), and forget that
    this process checked it (it uploaded and read it back: it would trust it)."""
    from ckptstore import linking

    fs = s3_server.fs()
    data = bytearray(fs.cat_file(key))
    data[len(data) // 3] ^= 0x40
    fs.pipe_file(key, bytes(data))
    linking._checked.clear()


def test_the_backup_replaces_its_checkpoint_in_which_an_upload_found_a_damaged_file(
    tmp_path, s3_server, s3_bucket, monkeypatch
):
    """An incremental backup copies a chain's shared file inside the store, from a
    checkpoint there, after checking it. One found damaged there was only passed over
    (the file sent again) and left damaged: a backup that knows its copy is damaged,
    with the intact one still on the local disk. Now the checkpoint is replaced from
    the local copy after that upload, and said so in backup_status()."""
    from ckptstore import linking

    monkeypatch.setattr(linking, "_checked", {})
    frozen = frozen_state()
    url = f"s3://{s3_bucket}/run"
    with incremental_backup(tmp_path / "a", url) as mgr:
        save_backed_up(mgr, range(2), frozen)
        rot_on_s3(s3_server, f"{s3_bucket}/run/step_00000001/__0_0.distcp")
        save_backed_up(mgr, [2], frozen)
        status = mgr.backup_status()
    assert status is not None
    assert status.repaired == ("step_00000001",) and status.damaged == (), status
    with ckptstore.Checkpointer(ckptstore.storage.open_backend(url)) as on_s3:
        for step in (1, 2, 3):
            assert on_s3.verify(step) == [], step
            load_equal(on_s3, step, state_at(step - 1, frozen))


def test_a_backup_repair_that_keeps_failing_stops_and_is_not_counted_as_behind(
    tmp_path, s3_server, s3_bucket, monkeypatch
):
    """A review found it: a failed repair went back into the queue as an upload, was
    'backed up' at once (the manifest there is the same), reset the failure count, and
    was tried again after every later save, without end; a newer checkpoint could evict
    it into `skipped`. Now a repair is tried after REPAIR_TRIES uploads at most, then
    the checkpoint is listed damaged; repairs are never counted as not backed up."""
    from ckptstore import linking
    from ckptstore.errors import StorageError
    from ckptstore.manager import backup_repair, replicate

    monkeypatch.setattr(linking, "_checked", {})
    tried: list[str] = []
    real_replace = replicate.replace_checkpoint

    def refused(src, dst, name, **kw):
        if name == "step_00000001":
            tried.append(name)
            raise StorageError("delete refused (Access Denied)")
        return real_replace(src, dst, name, **kw)

    monkeypatch.setattr(replicate, "replace_checkpoint", refused)
    frozen = frozen_state()
    url = f"s3://{s3_bucket}/run"
    with incremental_backup(tmp_path / "a", url) as mgr:
        save_backed_up(mgr, range(2), frozen)
        rot_on_s3(s3_server, f"{s3_bucket}/run/step_00000001/__0_0.distcp")
        for step in range(2, 7):
            mgr.save(step, state_at(step, frozen))
            mgr.wait()
            assert mgr.wait_backup() == [], step  # (a repair is not a missing backup)
            status = mgr.backup_status()
            assert status is not None and not status.skipped and not status.queued, status
        assert tried == ["step_00000001"] * backup_repair.REPAIR_TRIES, tried
        assert status.damaged == ("step_00000001",) and status.repaired == (), status
        assert status.failures == 0 and status.repairing == (), status
    with ckptstore.Checkpointer(ckptstore.storage.open_backend(url)) as on_s3:
        for step in range(2, 8):  # every later one verifies (none built from the damage)
            assert on_s3.verify(step) == [], step


def test_a_damaged_checkpoint_of_another_run_on_the_backup_is_not_called_this_runs(
    tmp_path, s3_server, s3_bucket, monkeypatch, caplog
):
    """The same prefix holds another run's chain with the same bytes; its damaged file is
    passed over when this run's backup links, but it is not this run's to repair or to
    list as damaged."""
    from ckptstore import linking

    monkeypatch.setattr(linking, "_checked", {})
    frozen = frozen_state()
    url = f"s3://{s3_bucket}/run"
    with incremental_backup(tmp_path / "b", url) as mgr:
        save_backed_up(mgr, [0], frozen)
    rot_on_s3(s3_server, f"{s3_bucket}/run/step_00000001/__0_0.distcp")
    with incremental_backup(tmp_path / "a", url) as mgr:
        save_backed_up(mgr, (4, 5), frozen, at=0)  # the same bytes as the other run's
        status = mgr.backup_status()
    assert status is not None and status.damaged == () and status.repaired == (), status
    # (its file was found damaged: the same bytes as this run's first save)
    assert "step_00000001/__0_0.distcp is damaged (" in caplog.text, caplog.text[-3000:]


def test_a_backup_that_restarts_finishes_a_replace_a_kill_interrupted(
    tmp_path, s3_server, s3_bucket
):
    """A stranger test found it: a kill -9 during a repair's replace, after the damaged
    checkpoint there was deleted, left only its complete new copy beside the name
    (`step_N.replacing`), which ls, verify and restore do not list; a rerun did nothing.
    The backup now finishes such a replace at start-up, and deletes a leftover copy
    whose name is committed there."""
    frozen = frozen_state()
    url = f"s3://{s3_bucket}/run"
    with incremental_backup(tmp_path / "a", url) as mgr:
        save_backed_up(mgr, range(3), frozen)
    fs = s3_server.fs()
    base = f"{s3_bucket}/run"
    # As the kill left it: step 1's new copy beside it, the old one deleted; step 2's
    # new copy beside it, the old one still there
    fs.copy(f"{base}/step_00000001", f"{base}/step_00000001.replacing", recursive=True)
    fs.rm(f"{base}/step_00000001", recursive=True)
    fs.copy(f"{base}/step_00000002", f"{base}/step_00000002.replacing", recursive=True)
    fs.invalidate_cache()
    with incremental_backup(tmp_path / "a", url) as mgr:
        assert mgr.wait_backup() == []
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base))
    assert [n for n in names if n.startswith("step_")] == [
        "step_00000001", "step_00000002", "step_00000003"
    ], names  # fmt: skip
    with ckptstore.Checkpointer(ckptstore.storage.open_backend(url)) as on_s3:
        for step in (1, 2, 3):
            assert on_s3.verify(step) == [], step
            load_equal(on_s3, step, state_at(step - 1, frozen))


def test_the_training_summary_names_what_the_backup_repaired_and_what_it_could_not():
    """A stranger test: a run whose backup was left damaged ended with exit 0 and a
    summary that said nothing of it."""
    from types import SimpleNamespace

    from ckptstore.manager.backup_status import BackupStatus
    from ckptstore.train.report import backup_summary

    said: list[str] = []
    run = SimpleNamespace(rank=0, say=said.append, args=SimpleNamespace(ckpt_dir="ck"))
    status = BackupStatus(
        remote="s3://b/run", newest_backed_up="step_00000009", in_progress=None, queued=(),
        skipped=(), failures=0, last_error=None, behind_s=0.0,
        repaired=("step_00000002",), damaged=("step_00000001",),
    )  # fmt: skip
    mgr = SimpleNamespace(backup_status=lambda: status)
    assert backup_summary(run, mgr, "step_00000009") == 0  # type: ignore[arg-type]
    assert said[0].startswith(
        "Backup s3://b/run holds damaged checkpoints it could not repair: step_00000001;"
    ), said
    assert said[1] == (
        "Backup s3://b/run: newest step_00000009, repaired step_00000002 (a damaged file there)"
    ), said
