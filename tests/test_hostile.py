"""Hostile checkpoints: nothing runs, nothing outside the root is read, nothing leaks.

``test_corruption.py`` covers damage and the first hostile cases (a pickled
``.metadata`` behind rewritten checksums, a code-running value pickle, escaping file
names in the manifest, absurd index sizes). This file adds:

* the optional manifest key: a signed manifest is required before anything else is read,
  so an attacker who rewrites manifest and checksums consistently is refused;
* nothing is unpickled before the manifest checks pass, and nothing the manifest does
  not list is ever read;
* names from DCP metadata and symlinks that lead out of the root;
* zstd frames that declare huge sizes, are cut short or carry trailing bytes, refused
  without allocating more than the index says;
* a canary secret and a canary manifest key that appear in no log, error, repr, manifest
  or written file, on local disk, directly on S3 and on the backup tier.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from damage import SHARD, Boom, forge_manifest, forged, replace_file, replace_shard, split_shard
from helpers import Randn, blank_like, build_state, train, train_state, zero_value

import ckptstore
from ckptstore import CheckpointManager, SaveEvery
from ckptstore.codecs import ElementKind, ZstdCodec
from ckptstore.config import MANIFEST_KEY_ENV
from ckptstore.dcp import metadata as md_format
from ckptstore.format.checksum import digest
from ckptstore.storage import RangeReader, StorageBackend, open_backend
from ckptstore.storage.testing import FaultyBackend
from ckptstore.storage.testing.s3server import SECRET_KEY

KEY = b"CANARY-MANIFEST-KEY-51d0c9e2"
MIB = 1 << 20


def make_state(seed: int = 0) -> dict[str, Any]:
    return build_state(seed, w=Randn(20_000), b=Randn(7), step=seed)


def blank() -> dict[str, Any]:
    return blank_like(make_state(), zero_value)


def save_two(root: str, **config: Any) -> str:
    with ckptstore.Checkpointer(root, codec="zstd", chunk_bytes=16 * 1024, **config) as ckpt:
        ckpt.save(make_state(1), 1)
        ckpt.save(make_state(2), 2)
    return os.path.join(root, "step_00000002")


def read_body(ckpt_dir: str) -> dict[str, Any]:
    with open(os.path.join(ckpt_dir, "manifest.json")) as f:
        return dict(json.load(f))


def plant_hostile_metadata(ckpt_dir: str, sentinel: str) -> None:
    """Replace ``.metadata`` with a code-running pickle and fix the manifest to match it."""
    # The HMAC, if any, cannot be recomputed without the key.
    replace_file(ckpt_dir, ".metadata", pickle.dumps(Boom(sentinel)), drop_hmac=True)


class ReadLog(FaultyBackend):
    """Records every name read through the backend."""

    def __init__(self, inner: StorageBackend) -> None:
        super().__init__(inner)
        self.reads: list[str] = []

    def read_bytes(self, name: str) -> bytes:
        self.reads.append(name)
        return self.inner.read_bytes(name)

    def open_reader(self, name: str) -> RangeReader:
        self.reads.append(name)
        return self.inner.open_reader(name)


@pytest.fixture
def unpickle_log(monkeypatch):
    """Every unpickling ckptstore does of DCP metadata, recorded (and still done)."""
    calls: list[str] = []
    real = md_format.loads

    def spy(data: bytes, where: str, **kwargs):
        calls.append(where)
        return real(data, where, **kwargs)

    monkeypatch.setattr(md_format, "loads", spy)
    return calls


# ---- the manifest key ----------------------------------------------------------------


def test_signed_checkpoints_save_load_and_verify_with_the_key(root):
    ckpt_dir = save_two(root, manifest_key=KEY)
    body = read_body(ckpt_dir)
    assert body["hmac"].startswith("hmac-sha256:") and len(body["hmac"]) == 12 + 64
    with ckptstore.Checkpointer(root, manifest_key=KEY) as ckpt:
        assert [i.step for i in ckpt.list()] == [1, 2]
        assert ckpt.verify(2) == []
        target = blank()
        ckpt.load(target)
        assert torch.equal(target["w"], make_state(2)["w"])
    # A reader without a key ignores the signature: signed checkpoints load anywhere.
    with ckptstore.Checkpointer(root) as ckpt:
        assert ckpt.verify(2) == []
        ckpt.load(blank(), 2)


def test_consistent_forgery_is_refused_with_the_key_before_anything_else_is_read(
    root, tmp_path, unpickle_log
):
    """The attacker rewrites .metadata, the manifest and its checksum consistently.

    Without a key only the unpickler's allowlist stands between the file and the
    process; with a key the manifest itself is refused and nothing else is read."""
    ckpt_dir = save_two(root, manifest_key=KEY)
    sentinel = str(tmp_path / "pwned")
    plant_hostile_metadata(ckpt_dir, sentinel)
    spy = ReadLog(open_backend(root))
    with ckptstore.Checkpointer(spy, manifest_key=KEY) as ckpt:
        spy.reads.clear()
        with pytest.raises(ckptstore.UnsafeCheckpointError, match="no HMAC") as info:
            ckpt.load(blank(), 2)
        assert "step_00000002/manifest.json" in str(info.value)
        assert spy.reads == ["step_00000002/manifest.json"]
        spy.reads.clear()
        problems = ckpt.verify(2)
        assert len(problems) == 1 and "HMAC" in problems[0]
        assert spy.reads == ["step_00000002/manifest.json"]
        assert [i.step for i in ckpt.list()] == [1]  # not listed, so never "latest"
        ckpt.load(blank())  # latest = step 1
    assert unpickle_log == [f"{root}/step_00000001/.metadata"]
    assert not os.path.exists(sentinel)
    # Without the key the forged manifest is believed, and the allowlist refuses the pickle.
    with ckptstore.Checkpointer(root) as ckpt, pytest.raises(ckptstore.UnsafeCheckpointError):
        ckpt.load(blank(), 2)
    assert not os.path.exists(sentinel)


@pytest.mark.parametrize("how", ["unsigned", "other key", "hmac edited", "hmac of other body"])
def test_manifests_not_signed_with_the_key_are_refused(root, how):
    ckpt_dir = save_two(root, manifest_key=b"other key" if how == "other key" else KEY)
    if how == "unsigned":
        shutil.rmtree(root)
        ckpt_dir = save_two(root)
        assert "hmac" not in read_body(ckpt_dir)
    elif how == "hmac edited":
        # Change the last hex digit (to one it is not: a no-op edit would be 1 run in 16).
        forge_manifest(
            ckpt_dir,
            lambda b: b.update(hmac=b["hmac"][:-1] + ("1" if b["hmac"][-1] == "0" else "0")),
        )
    elif how == "hmac of other body":
        # A valid signature, but of another manifest (step 1's), spliced in.
        other = read_body(os.path.join(root, "step_00000001"))["hmac"]
        forge_manifest(ckpt_dir, lambda b: b.update(hmac=other))
    with ckptstore.Checkpointer(root, manifest_key=KEY) as ckpt:
        with pytest.raises(ckptstore.UnsafeCheckpointError, match="HMAC"):
            ckpt.load(blank(), 2)
        with pytest.raises(ckptstore.UnsafeCheckpointError):
            ckpt.read_metadata(2)
        assert ckpt.verify(2) != []
        assert 2 not in [i.step for i in ckpt.list()]


def test_an_attacker_who_edits_any_field_is_refused(root):
    """The HMAC covers the whole body: shapes of files, step, metadata, everything."""
    ckpt_dir = save_two(root, manifest_key=KEY)
    edits: list[Callable[[dict[str, Any]], None]] = [
        lambda b: b.update(step=3),
        lambda b: b["metadata"].update(evil=1),
        lambda b: b["files"]["__0_0.distcp"].update(size_bytes=1),
        lambda b: b.update(world_size=2),
    ]
    original = Path(ckpt_dir, "manifest.json").read_bytes()
    for edit in edits:
        with open(os.path.join(ckpt_dir, "manifest.json"), "wb") as f:
            f.write(original)
        forge_manifest(ckpt_dir, edit)
        with (
            ckptstore.Checkpointer(root, manifest_key=KEY) as ckpt,
            pytest.raises(ckptstore.UnsafeCheckpointError, match="does not match"),
        ):
            ckpt.load(blank(), 2)


def test_the_key_can_come_from_the_environment(root, monkeypatch):
    monkeypatch.setenv(MANIFEST_KEY_ENV, KEY.decode())
    ckpt_dir = save_two(root)
    assert "hmac" in read_body(ckpt_dir)
    with ckptstore.Checkpointer(root) as ckpt:
        ckpt.load(blank(), 2)
    monkeypatch.setenv(MANIFEST_KEY_ENV, "another key")
    with ckptstore.Checkpointer(root) as ckpt:
        assert ckpt.list() == []
        with pytest.raises(ckptstore.UnsafeCheckpointError):
            ckpt.load(blank(), 2)
    # ckptstore.load (one checkpoint by path) honours it too.
    with pytest.raises(ckptstore.UnsafeCheckpointError):
        ckptstore.load(blank(), ckpt_dir)


def test_verify_and_ls_under_a_wrong_key_do_not_call_the_checkpoints_damaged(
    root, monkeypatch, capsys
):
    """Under another key every checkpoint is refused, but its bytes are intact: verify
    said "2 of 2 checkpoint(s) damaged ... or delete the damaged ones", and ls "manifest
    damaged or unreadable"; both now say the manifests are not signed with that key."""
    from ckptstore.cli import _common, main

    save_two(root, manifest_key=KEY)
    monkeypatch.setenv(MANIFEST_KEY_ENV, "another key")
    _common.manifest_key.cache_clear()  # (read once per process)
    assert main(["verify", root]) == 1
    out = capsys.readouterr().out
    assert "2 of 2 checkpoint(s) not signed with the key in CKPTSTORE_MANIFEST_KEY" in out, out
    assert "damaged" not in out.splitlines()[-1] and "delete" not in out, out
    assert main(["ls", root]) == 0
    out = capsys.readouterr().out
    assert "manifest not signed with the key in CKPTSTORE_MANIFEST_KEY" in out, out
    monkeypatch.delenv(MANIFEST_KEY_ENV)
    _common.manifest_key.cache_clear()
    assert main(["verify", root]) == 0  # (without the key: its bytes, intact)


@pytest.mark.parametrize("bad", [b"", "a string", 7])
def test_a_bad_key_is_refused_without_echoing_it(root, bad):
    with pytest.raises(ValueError, match="manifest_key must be") as info:
        ckptstore.Checkpointer(root, manifest_key=bad)
    assert repr(bad) not in str(info.value) or bad == b""


def test_manager_restore_skips_a_forged_newest_checkpoint(root, tmp_path, caplog):
    state = train_state()
    with CheckpointManager(root, save=SaveEvery(steps=2), manifest_key=KEY) as mgr:
        train(mgr, state, 4)
    plant_hostile_metadata(os.path.join(root, "step_00000004"), str(tmp_path / "pwned"))
    with (
        caplog.at_level(logging.WARNING, logger="ckptstore"),
        CheckpointManager(root, manifest_key=KEY) as mgr,
    ):
        assert mgr.restore(train_state(seed=5)) == 2
        # It was moved aside (issue 14); restoring it by path is refused too.
        (aside,) = [n for n in os.listdir(root) if n.startswith("step_00000004.damaged-")]
        with pytest.raises(ckptstore.UnsafeCheckpointError):
            mgr.restore(train_state(), os.path.join(root, aside))
    assert not (tmp_path / "pwned").exists()


def test_the_key_never_appears_in_what_is_written_shown_or_logged(root, caplog):
    caplog.set_level(logging.DEBUG, logger="ckptstore")
    shown: list[str] = []
    with CheckpointManager(root, save=SaveEvery(steps=1), manifest_key=KEY) as mgr:
        train(mgr, train_state(), 2)
        ckpt = mgr.checkpointer
        assert ckpt is not None
        shown += [repr(ckpt), repr(ckpt.config), str(ckpt.config), repr(mgr.list())]
    forge_manifest(os.path.join(root, "step_00000002"), lambda b: b["metadata"].update(x=1))
    with ckptstore.Checkpointer(root, manifest_key=KEY) as ckpt:
        try:
            ckpt.load({}, 2)
        except ckptstore.CkptStoreError as exc:
            shown.append(f"{exc!r} {exc}")
        else:
            raise AssertionError("a forged manifest loaded")
    haystack = [caplog.text, *shown, *_files_under(root)]
    for text in haystack:
        assert KEY.decode() not in text


# ---- nothing is unpickled before the checks, nothing unlisted is read ------------------


def test_hostile_metadata_behind_a_stale_checksum_is_never_unpickled(root, tmp_path, unpickle_log):
    ckpt_dir = save_two(root)
    sentinel = str(tmp_path / "pwned")
    with open(os.path.join(ckpt_dir, ".metadata"), "wb") as f:
        f.write(pickle.dumps(Boom(sentinel)))  # the manifest still lists the old one
    with ckptstore.Checkpointer(root) as ckpt:
        with pytest.raises(ckptstore.CorruptCheckpointError, match="metadata"):
            ckpt.load(blank(), 2)
        assert any(".metadata" in p for p in ckpt.verify(2))
    assert unpickle_log == []
    assert not os.path.exists(sentinel)


def test_files_the_manifest_does_not_list_are_never_read(root, tmp_path, unpickle_log):
    ckpt_dir = save_two(root)
    sentinel = str(tmp_path / "pwned")
    # A second metadata file under the per-attempt name object stores use, and strays.
    for name in (".metadata-0123456789ab", "__1_0.distcp", "evil.pkl"):
        with open(os.path.join(ckpt_dir, name), "wb") as f:
            f.write(pickle.dumps(Boom(sentinel)))
    spy = ReadLog(open_backend(root))
    with ckptstore.Checkpointer(spy) as ckpt:
        spy.reads.clear()
        target = blank()
        ckpt.load(target, 2)
        assert ckpt.verify(2) == []
    assert torch.equal(target["w"], make_state(2)["w"])
    assert sorted(set(spy.reads)) == [
        "step_00000002/.metadata",
        "step_00000002/__0_0.distcp",
        "step_00000002/manifest.json",
    ]
    assert len(unpickle_log) == 2 and not os.path.exists(sentinel)


def test_a_manifest_listing_two_metadata_files_is_refused(root, unpickle_log):
    ckpt_dir = save_two(root)
    md = Path(ckpt_dir, ".metadata").read_bytes()
    shutil.copy(
        os.path.join(ckpt_dir, ".metadata"), os.path.join(ckpt_dir, ".metadata-0123456789ab")
    )
    forge_manifest(
        ckpt_dir,
        lambda b: b["files"].update(
            {
                ".metadata-0123456789ab": {
                    "kind": "file",
                    "size_bytes": len(md),
                    "xxh3_64": digest(md),
                }
            }
        ),
    )
    with (
        ckptstore.Checkpointer(root) as ckpt,
        pytest.raises(ckptstore.CorruptCheckpointError, match="more than once"),
    ):
        ckpt.load(blank(), 2)
    assert unpickle_log == []


# ---- names that lead out of the root -----------------------------------------------------


def _rewrite_dcp_metadata(ckpt_dir: str, change: Callable[[Any], None]) -> None:
    """Edit the (real) DCP metadata and fix the manifest's checksums, as an attacker can."""
    path = os.path.join(ckpt_dir, ".metadata")
    with open(path, "rb") as f:
        metadata = md_format.loads(f.read(), path)
    change(metadata)
    replace_file(ckpt_dir, ".metadata", md_format.dumps(metadata))


@pytest.mark.parametrize(
    "file",
    [
        "../step_00000001/__0_0.distcp",
        "/etc/passwd",
        "__0_0.distcp/../../step_00000001/__0_0.distcp",
        "..\\__0_0.distcp",
        "__0_0.distcp\x00",
        7,
        ["__0_0.distcp"],
        None,
    ],
    ids=repr,
)
def test_dcp_metadata_naming_a_file_outside_the_manifest_is_refused(root, file):
    ckpt_dir = save_two(root)

    def change(metadata: Any) -> None:
        for storage in metadata.storage_data.values():
            storage["file"] = file

    _rewrite_dcp_metadata(ckpt_dir, change)
    spy = ReadLog(open_backend(root))
    with ckptstore.Checkpointer(spy) as ckpt:
        spy.reads.clear()
        with pytest.raises(ckptstore.CorruptCheckpointError):
            ckpt.load(blank(), 2)
    assert set(spy.reads) <= {"step_00000002/manifest.json", "step_00000002/.metadata"}


@pytest.mark.parametrize("what", ["shard", "metadata", "checkpoint directory"])
def test_symlinks_out_of_the_root_are_refused(tmp_path, what):
    """A symlink inside the root that leads out of it is not followed, even when what it
    points at matches every checksum (an exact copy planted elsewhere)."""
    root = str(tmp_path / "ckpts")
    ckpt_dir = save_two(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    if what == "checkpoint directory":
        shutil.copytree(ckpt_dir, outside / "step_00000002")
        shutil.rmtree(ckpt_dir)
        os.symlink(outside / "step_00000002", ckpt_dir)
        victim = "step_00000002/manifest.json"
    else:
        name = "__0_0.distcp" if what == "shard" else ".metadata"
        shutil.copy(os.path.join(ckpt_dir, name), outside / name)
        os.remove(os.path.join(ckpt_dir, name))
        os.symlink(outside / name, os.path.join(ckpt_dir, name))
        victim = name
    with ckptstore.Checkpointer(root) as ckpt:
        with pytest.raises(ckptstore.CorruptCheckpointError, match="outside") as info:
            ckpt.load(blank(), 2)
        assert victim in str(info.value)
        assert ckpt.verify(2) != []
        ckpt.load(blank(), 1)  # the rest of the root is fine


def test_a_root_reached_through_a_symlink_still_works(tmp_path):
    real = tmp_path / "real"
    save_two(str(real))
    os.symlink(real, tmp_path / "link")
    with ckptstore.Checkpointer(str(tmp_path / "link")) as ckpt:
        assert ckpt.verify(2) == []
        ckpt.load(blank(), 2)


def test_s3_names_stay_under_the_prefix(s3_server, s3_bucket):
    """Keys outside the configured prefix are never asked for, whatever a manifest says."""
    url = f"s3://{s3_bucket}/run"
    opts = s3_server.options()
    fs = s3_server.fs()
    fs.pipe_file(f"{s3_bucket}/secret.bin", b"not yours")
    with ckptstore.Checkpointer(url, storage_options=opts) as ckpt:
        ckpt.save(make_state(1), 1)
        backend = ckpt.backend
        for bad in ("../secret.bin", "/secret.bin", "step_00000001/../../secret.bin", "a\\b"):
            for call in (backend.read_bytes, backend.open_reader, backend.exists, backend.delete):
                with pytest.raises(ValueError, match="refusing unsafe"):
                    call(bad)
    # A manifest (checksums fixed) that lists a file outside the prefix.
    key = f"{s3_bucket}/run/step_00000001/manifest.json"
    outside = {"kind": "shard", "size_bytes": 9, "xxh3_64": "0" * 16}
    fs.pipe_file(
        key, forged(fs.cat_file(key), lambda b: b["files"].update({"../../secret.bin": outside}))
    )
    with ckptstore.Checkpointer(url, storage_options=opts) as ckpt:
        with pytest.raises(ckptstore.CorruptCheckpointError, match="unsafe"):
            ckpt.load(blank(), 1)
        assert ckpt.list() == []
    assert fs.cat_file(f"{s3_bucket}/secret.bin") == b"not yours"


# ---- zstd frames that lie ----------------------------------------------------------------


def _bomb(nbytes: int) -> bytes:
    """A small zstd frame that declares (and really holds) ``nbytes`` of zeros."""
    return zstandard.ZstdCompressor(level=19).compress(bytes(nbytes))


def _decode_peak(stored: bytes, out_bytes: int) -> tuple[BaseException | None, int]:
    codec = ZstdCodec()
    out = np.empty(out_bytes, dtype=np.uint8)
    tracemalloc.start()
    err: BaseException | None = None
    try:
        codec.decode_into(memoryview(stored), [len(stored)], ElementKind(1, None), out)
    except BaseException as exc:
        err = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return err, peak


def test_measuring_allocations_catches_a_bomb():
    """The method the next tests rely on: tracemalloc sees what zstd allocates."""
    bomb = _bomb(64 * MIB)
    assert len(bomb) < 16 * 1024
    tracemalloc.start()
    try:
        zstandard.ZstdDecompressor().decompress(bomb, max_output_size=4096)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak >= 64 * MIB  # max_output_size did not stop it: the frame declares its size


@pytest.mark.parametrize(
    "what",
    ["declares 64 MiB", "declares 4097 B", "declares nothing", "truncated", "trailing bytes"],
)
def test_lying_zstd_frames_are_refused_without_allocating(what):
    n = 4096
    good = zstandard.ZstdCompressor().compress(bytes(range(256)) * 16)
    if what == "declares 64 MiB":
        stored = _bomb(64 * MIB)
    elif what == "declares 4097 B":
        stored = zstandard.ZstdCompressor().compress(bytes(n + 1))
    elif what == "declares nothing":
        stored = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(n))
    elif what == "truncated":
        stored = good[:-5]
    else:
        stored = good + b"\x00garbage"
    err, peak = _decode_peak(stored, n)
    assert isinstance(err, ckptstore.CorruptCheckpointError), err
    assert peak < 1 * MIB, peak


def test_a_bomb_inside_a_shard_is_refused_at_load_and_verify(root):
    """End to end: the attacker swaps a chunk for a bomb and fixes every checksum."""
    with ckptstore.Checkpointer(root, codec="zstd") as ckpt:
        ckpt.save({"v": torch.arange(16384, dtype=torch.int32)}, 1)
    ckpt_dir = os.path.join(root, "step_00000001")
    rest, index_json = split_shard(Path(ckpt_dir, SHARD).read_bytes())
    index = json.loads(index_json)
    bomb = _bomb(64 * MIB)
    item = next(i for i in index["items"] if i["dtype"] == "int32")
    assert item["nbytes"] == 65536 and len(item["chunks"]) == 1
    # One 64 KiB int32 chunk in 4 streams of 16 KiB: put the bomb in the first.
    layout = [len(bomb), -16384, -16384, -16384]
    body = bomb + bytes(3 * 16384)
    assert len(body) < 65536  # never stored larger than raw
    item["chunks"] = [[0, len(body), 65536, digest(body), layout]]
    for other in index["items"]:
        if other is not item:
            for c in other["chunks"]:
                c[0] += len(body)
    replace_shard(ckpt_dir, body + rest, json.dumps(index).encode())
    with ckptstore.Checkpointer(root) as ckpt:
        tracemalloc.start()
        try:
            with pytest.raises(ckptstore.CorruptCheckpointError, match="declares"):
                ckpt.load({"v": torch.zeros(16384, dtype=torch.int32)}, 1)
            problems = ckpt.verify(1)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    assert len(problems) == 1 and "__0_0.distcp" in problems[0] and "declares" in problems[0]
    assert peak < 16 * MIB, peak


# ---- canary credentials ------------------------------------------------------------------


def _files_under(path: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out.append(fh.read().decode("latin-1"))
    return out


def test_the_secret_key_never_leaks_in_direct_mode(s3_server, s3_bucket, tmp_path, caplog):
    """Straight to S3 (no local tier), failures included: the canary secret appears in
    no log line, exception, repr, manifest or object, nor in the pickled manifest."""
    caplog.set_level(logging.DEBUG, logger="ckptstore")
    opts = s3_server.options()
    url = f"s3://{s3_bucket}/direct"
    shown: list[str] = []
    with ckptstore.Checkpointer(url, storage_options=opts, codec="zstd") as ckpt:
        result = ckpt.save(make_state(1), 1)
        shown += [repr(ckpt), repr(ckpt.backend), repr(ckpt.config), repr(result)]
        shown.append(pickle.dumps(ckpt.latest()).decode("latin-1"))
        ckpt.load(blank(), 1)
        # A failed save: the step exists already.
        with pytest.raises(ckptstore.CkptStoreError) as info:
            ckpt.save(make_state(1), 1)
        shown.append(f"{info.value!r} {info.value} {info.value.__cause__!r}")
    # A missing bucket: a message that talks about credentials. (moto accepts any
    # secret, so a wrong one cannot be tried here.)
    with pytest.raises(ckptstore.CkptStoreError) as info:
        ckptstore.Checkpointer(f"s3://no-such-bucket-{s3_bucket}/x", storage_options=opts)
    shown.append(f"{info.value!r} {info.value} {info.value.__cause__!r}")
    fs = s3_server.fs()
    objects = s3_server.call("list_objects_v2", Bucket=s3_bucket).get("Contents", [])
    assert len(objects) >= 3
    for o in objects:
        shown.append(o["Key"])
        shown.append(fs.cat_file(f"{s3_bucket}/{o['Key']}").decode("latin-1"))
    for text in [caplog.text, *shown]:
        assert SECRET_KEY not in text


def test_the_secret_key_never_reaches_the_local_tier_or_its_logs(
    s3_server, s3_bucket, tmp_path, caplog
):
    """Backup tier: restore on a fresh machine (download), then a backup that fails."""
    caplog.set_level(logging.DEBUG, logger="ckptstore")
    opts = s3_server.options()
    url = f"s3://{s3_bucket}/tier"
    with CheckpointManager(
        tmp_path / "a", save=SaveEvery(steps=2), backup=url, backup_options=opts
    ) as mgr:
        train(mgr, train_state(), 4)
        assert mgr.wait_backup(timeout_s=60) == []
        shown = [repr(mgr.backup_status()), repr(mgr.checkpointer), repr(mgr.list())]
    with CheckpointManager(tmp_path / "b", backup=url, backup_options=opts) as mgr:
        assert mgr.restore(train_state()) == 4  # downloaded into tmp_path / "b"
    assert os.path.exists(tmp_path / "b" / "step_00000004" / "manifest.json")
    for text in [caplog.text, *shown, *_files_under(str(tmp_path))]:
        assert SECRET_KEY not in text


def test_the_backup_tier_carries_the_signature_and_refuses_forgeries(
    s3_server, s3_bucket, tmp_path, caplog
):
    """Signed checkpoints are uploaded signature and all; a fresh machine with the key
    restores from the backup, skipping a forged newer checkpoint planted there."""
    from ckptstore.transfer import fetch

    opts = s3_server.options()
    url = f"s3://{s3_bucket}/signed"
    with CheckpointManager(
        tmp_path / "a", save=SaveEvery(steps=2), backup=url, backup_options=opts, manifest_key=KEY
    ) as mgr:
        train(mgr, train_state(), 4)
        assert mgr.wait_backup(timeout_s=60) == []
    remote = open_backend(url, storage_options=opts)
    assert "hmac" in json.loads(remote.read_bytes("step_00000004/manifest.json"))
    # The attacker copies step 4 to step 6 on the remote, rewriting its manifest (step,
    # checksum) consistently; the HMAC cannot follow.
    fs = s3_server.fs()
    for key in fs.ls(f"{s3_bucket}/signed/step_00000004", detail=False):
        name = key.rsplit("/", 1)[1]
        data = fs.cat_file(key)
        if name == "manifest.json":
            data = forged(data, lambda b: b.update(step=6))
        fs.pipe_file(f"{s3_bucket}/signed/step_00000006/{name}", data)
    local = open_backend(tmp_path / "c")
    with pytest.raises(ckptstore.UnsafeCheckpointError):
        fetch(remote, local, "step_00000006", manifest_key=KEY, show_progress=False)
    assert local.list_names() == []
    with (
        caplog.at_level(logging.INFO, logger="ckptstore"),
        CheckpointManager(tmp_path / "b", backup=url, backup_options=opts, manifest_key=KEY) as mgr,
    ):
        assert mgr.restore(train_state()) == 4
    assert not os.path.exists(tmp_path / "b" / "step_00000006")
    # Without the key, the forgery is what a fresh machine would restore.
    with CheckpointManager(tmp_path / "d", backup=url, backup_options=opts) as mgr:
        assert mgr.restore(train_state()) == 6


def test_forged_newer_checkpoints_do_not_make_retention_delete_real_ones(root):
    """KeepLast(2) with a key: forgeries planted as steps 10 and 12 are invisible, so
    they neither count as "the last two" nor shield the newest real checkpoint."""
    from ckptstore import KeepLast

    state = train_state()
    with CheckpointManager(
        root, save=SaveEvery(steps=2), keep=KeepLast(2), manifest_key=KEY
    ) as mgr:
        train(mgr, state, 4)
    for step in (10, 12):
        forged = os.path.join(root, f"step_{step:08d}")
        shutil.copytree(os.path.join(root, "step_00000004"), forged)
        forge_manifest(forged, lambda b, s=step: (b.pop("hmac"), b.update(step=s)))
    with CheckpointManager(
        root, save=SaveEvery(steps=2), keep=KeepLast(2), manifest_key=KEY
    ) as mgr:
        assert mgr.restore(state) == 4  # the forgeries are not candidates either
        train(mgr, state, 2, start=4)  # saves step 6, then prunes
        assert [c.step for c in mgr.list()] == [4, 6]
    assert os.path.exists(os.path.join(root, "step_00000006", "manifest.json"))
