"""S3, for real: a moto server process on 127.0.0.1, reached by s3fs over HTTP.

Direct mode (the checkpoint root is an ``s3://`` URL), multipart uploads that never
publish a partial object, sweeping stale uploads, failing fast on a missing bucket or
wrong credentials, the backup tier (replication, retention on both tiers, restore on a
fresh machine, restore when the local copy is damaged), and two ranks saving straight
to S3. Faults between client and server are in ``test_s3_faults.py``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import assert_same, blank_like, realistic_state
from test_distributed import run_ranks
from test_manager import make_state, train

import ckptstore
from ckptstore import CheckpointManager, KeepLast, SaveEvery
from ckptstore.errors import CheckpointExistsError, CorruptCheckpointError, StorageError
from ckptstore.manager.replicate import Replicator
from ckptstore.storage import S3Backend, open_backend
from ckptstore.storage.s3 import MIN_PART_BYTES
from ckptstore.storage.testing.s3server import S3Server
from ckptstore.transfer import copy_checkpoint

MIB = 1 << 20


def s3(server: S3Server, bucket: str, prefix: str = "run", **kw) -> S3Backend:
    b = open_backend(f"s3://{bucket}/{prefix}", storage_options=server.options(**kw))
    assert isinstance(b, S3Backend)
    return b


def keys(server: S3Server, bucket: str) -> list[str]:
    out = server.call("list_objects_v2", Bucket=bucket).get("Contents", [])
    return sorted(o["Key"] for o in out)


def big_state() -> dict:
    """Larger than two 5 MiB parts after compression, so saves go multipart."""
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(3 * MIB, generator=g), "step": 1, "note": "hello"}


# ---- direct mode -------------------------------------------------------------------
def test_direct_save_and_load_multipart(s3_server, s3_bucket):
    backend = s3(s3_server, s3_bucket)
    backend.part_bytes = MIN_PART_BYTES
    state = big_state()
    with ckptstore.Checkpointer(backend, codec="none") as ckpt:
        ckpt.save(state, 1)
        target = {"w": torch.zeros(3 * MIB), "step": 0, "note": ""}
        ckpt.load(target)
        assert_same(target, state)
        assert ckpt.verify(1) == []
    assert "run/step_00000001/manifest.json" in keys(s3_server, s3_bucket)
    assert s3_server.open_uploads(s3_bucket) == []


def test_copies_inside_the_store_of_multipart_files_read_back(s3_server, s3_bucket):
    """An incremental save links (copies inside the store) a shard uploaded in parts,
    and a damaged checkpoint moved aside is copied too: every copy reads back. Without
    a checksum algorithm on the copy, moto gave it the source's composite checksum and
    every GET of it failed (FlexibleChecksumError; found by the S3 crash stress)."""
    backend = s3(s3_server, s3_bucket)
    backend.part_bytes = MIN_PART_BYTES
    frozen = big_state()["w"]
    with ckptstore.Checkpointer(backend, codec="none", incremental=True) as ckpt:
        for step in (1, 2):
            ckpt.save({"w": frozen, "step": torch.tensor(step)}, step)
        assert ckpt.latest().manifest.linked, "nothing linked: the test tests nothing"
        assert ckpt.verify(2) == []
        target = {"w": torch.zeros_like(frozen), "step": torch.tensor(0)}
        ckpt.load(target, step=2)
        assert torch.equal(target["w"], frozen) and int(target["step"]) == 2
    backend.move_aside("step_00000001", "step_00000001.damaged-test")
    moved = backend.fs.ls(backend.store_path("step_00000001.damaged-test"))
    shards = [p.rsplit("/", 1)[1] for p in moved if p.endswith(".distcp")]
    assert shards, moved
    for name in shards:
        with backend.open_reader(f"step_00000001.damaged-test/{name}") as reader:
            assert len(reader.read(0, reader.size)) == reader.size


def test_a_store_that_refuses_a_checksum_on_copies_is_copied_without(s3_server, s3_bucket, caplog):
    """An S3-compatible store that refuses the checksum algorithm on CopyObject still
    gets its incremental links (copied without), with a warning once."""
    from botocore.exceptions import ClientError

    backend = s3(s3_server, s3_bucket)
    real_copy, asked = backend.fs.copy, []

    def copy(src, dst, recursive=False, **kw):
        asked.append(sorted(kw))
        if kw:
            raise ClientError({"Error": {"Code": "InvalidArgument"}}, "CopyObject")
        return real_copy(src, dst, recursive=recursive)

    backend.fs.copy = copy
    frozen = torch.randn(300_000)
    with (
        caplog.at_level(logging.WARNING, logger="ckptstore"),
        ckptstore.Checkpointer(backend, codec="none", incremental=True) as ckpt,
    ):
        for step in (1, 2, 3):
            ckpt.save({"w": frozen, "step": torch.tensor(step)}, step)
        assert ckpt.latest().manifest.linked
        assert ckpt.verify(3) == []
    assert asked == [["ChecksumAlgorithm"], [], []], asked  # refused once, never asked again
    assert "refused a checksum algorithm on a copy" in caplog.text


def test_copies_above_s3fs_part_copy_size_and_half_refused_moves(s3_server, s3_bucket, monkeypatch):
    """Above s3fs's MANAGED_COPY_THRESHOLD a copy goes in parts, completed without the
    parts' checksums (AWS refuses that for an upload created with an algorithm): no
    algorithm is asked there. And a store that refuses it for some files only still
    moves a checkpoint aside whole, file for file, nothing nested or left half."""
    import s3fs.core
    from botocore.exceptions import ClientError

    backend = s3(s3_server, s3_bucket)
    backend.part_bytes = MIN_PART_BYTES
    real_copy, asked = backend.fs.copy, []

    def copy(src, dst, recursive=False, **kw):
        asked.append((src.rsplit("/", 1)[1], sorted(kw)))
        if kw and src.endswith(".distcp") and refuse:
            raise ClientError({"Error": {"Code": "InvalidArgument"}}, "CopyObject")
        return real_copy(src, dst, recursive=recursive, **kw)

    backend.fs.copy, refuse = copy, False
    monkeypatch.setattr(s3fs.core, "MANAGED_COPY_THRESHOLD", 6 << 20)
    frozen = big_state()["w"]  # 12 MiB: above the threshold as patched
    with ckptstore.Checkpointer(backend, codec="none", incremental=True) as ckpt:
        for step in (1, 2):
            ckpt.save({"w": frozen, "step": torch.tensor(step)}, step)
        assert ckpt.latest().manifest.linked
        assert ckpt.verify(2) == []
    assert [a for a in asked if a[0].endswith(".distcp")] == [(asked[0][0], [])], asked
    monkeypatch.setattr(s3fs.core, "MANAGED_COPY_THRESHOLD", 5 << 30)
    asked.clear()
    refuse = True
    before = sorted(
        p.rsplit("/", 1)[1] for p in backend.fs.find(backend.store_path("step_00000001"))
    )
    backend.move_aside("step_00000001", "step_00000001.damaged-test")
    moved = backend.fs.find(backend.store_path("step_00000001.damaged-test"))
    top = backend.fs._strip_protocol(backend.store_path("step_00000001.damaged-test"))
    assert sorted(p[len(top) + 1 :] for p in moved) == before, moved
    assert any(kw for _, kw in asked) and any(not kw for _, kw in asked), asked


def test_direct_save_through_the_public_url_api(s3_server, s3_bucket):
    """Credentials and endpoint from the AWS environment variables, as for AWS itself."""
    state = realistic_state()
    url = f"s3://{s3_bucket}/plain"
    ckptstore.save(state, url, step=3, codec="zstd")
    target = blank_like(state)
    ckptstore.load(target, url)
    assert_same(target, state)


def test_manager_directly_on_s3_resumes(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/exp"
    state = make_state()
    with CheckpointManager(url, save=SaveEvery(steps=3), keep=KeepLast(2)) as mgr:
        train(mgr, state, 9)
        assert [c.step for c in mgr.list()] == [6, 9]
    fresh = make_state(seed=1)
    with CheckpointManager(url) as mgr:
        assert mgr.restore(fresh) == 9
    assert_same(fresh.model.state_dict(), state.model.state_dict())
    assert_same(fresh.optimizer.state_dict(), state.optimizer.state_dict())
    assert keys(s3_server, s3_bucket)[-1] == "exp/step_00000009/manifest.json"


def test_failed_upload_publishes_nothing_and_leaves_no_upload(s3_server, s3_bucket):
    backend = s3(s3_server, s3_bucket)
    backend.part_bytes = MIN_PART_BYTES
    pending = backend.begin("step_00000001")
    sink = pending.create_file("__0_0.distcp")
    sink.write(os.urandom(12 * MIB))  # two parts are on their way
    assert s3_server.open_uploads(s3_bucket) != []
    sink.abort()  # what the shard writer does when encoding or staging fails
    pending.abort()
    assert keys(s3_server, s3_bucket) == []
    assert s3_server.open_uploads(s3_bucket) == []


def test_sweep_aborts_stale_uploads_but_not_live_ones(s3_server, s3_bucket):
    backend = s3(s3_server, s3_bucket)
    backend.part_bytes = MIN_PART_BYTES
    # A dead writer's upload (another process: this one never saw it).
    s3_server.call(
        "create_multipart_upload", Bucket=s3_bucket, Key="run/step_00000002/__0_0.distcp"
    )
    pending = backend.begin("step_00000003")
    sink = pending.create_file("__0_0.distcp")
    sink.write(os.urandom(6 * MIB))  # a live upload, ours
    removed = backend.sweep(grace_s=0)
    assert any("step_00000002" in r for r in removed)
    open_keys = [u["Key"] for u in s3_server.open_uploads(s3_bucket)]
    assert open_keys == ["run/step_00000003/__0_0.distcp"]
    sink.close()
    pending.commit(b'{"files": {}}')
    assert s3_server.open_uploads(s3_bucket) == []


def test_conditional_commit_refuses_a_second_writer(s3_server, s3_bucket):
    backend = s3(s3_server, s3_bucket)
    p1, p2 = backend.begin("step_00000004"), backend.begin("step_00000004")
    p1.write_file("a", b"1")
    p2.write_file("b", b"2")
    p1.commit(b'{"files": {"a": {}}}')
    with pytest.raises(CheckpointExistsError):
        p2.commit(b'{"files": {"b": {}}}')
    assert backend.read_bytes("step_00000004/manifest.json") == b'{"files": {"a": {}}}'
    assert not backend.exists("step_00000004/b")


def test_missing_bucket_fails_fast_with_a_clear_message(s3_server, root):
    with pytest.raises(StorageError, match=r"does not exist.*create it first"):
        CheckpointManager(root, backup="s3://no-such-bucket-here/run")


def test_direct_mode_on_a_missing_bucket_fails_at_construction(s3_server):
    with pytest.raises(StorageError, match="does not exist"):
        ckptstore.Checkpointer("s3://no-such-bucket-either/run")


def test_wrong_credentials_fail_fast_with_a_clear_message(root):
    # A server that checks credentials (moto with authentication on).
    server = S3Server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}).start()
    try:
        with pytest.raises(StorageError, match=r"denied.*check the credentials") as info:
            CheckpointManager(root, backup="s3://somebucket/run", backup_options=server.options())
        assert "CANARY" not in str(info.value)
    finally:
        server.stop()


def test_the_test_server_is_not_fooled_by_another_listener_on_its_port():
    """The server reports the port it bound. Tests run on several workers, each starting
    servers: a start-up check that only connects to a chosen port would take another
    process's listener there for its own server."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(RuntimeError, match="exited at start-up"):
            S3Server(port=other.getsockname()[1]).start()
    server = S3Server().start()  # (port 0, the default: the kernel picks a free one)
    try:
        assert server.port != 0
        bucket = server.new_bucket()
        server.fs().pipe(f"{bucket}/x", b"hello")
        assert server.fs().cat(f"{bucket}/x") == b"hello"
    finally:
        server.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_test_server_ends_with_the_process_that_started_it():
    """A test run stopped by SIGTERM or SIGKILL (no fixture teardown) leaves no moto
    server behind; one started from a thread outlives the thread."""
    started = []
    starter_thread = threading.Thread(target=lambda: started.append(S3Server().start()))
    starter_thread.start()
    starter_thread.join()
    try:
        time.sleep(1.0)  # (PR_SET_PDEATHSIG would have ended it with the thread)
        assert started[0].proc.poll() is None
        socket.create_connection(("127.0.0.1", started[0].port), 2).close()
    finally:
        started[0].stop()
    starter = (
        "import sys, time\n"
        "from ckptstore.storage.testing.s3server import S3Server\n"
        "print(S3Server().start().proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    for sig in (signal.SIGTERM, signal.SIGKILL):
        parent = subprocess.Popen(
            [sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True
        )
        server = int(parent.stdout.readline())
        parent.send_signal(sig)
        parent.wait(30)
        parent.stdout.close()
        deadline = time.monotonic() + 10
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(server):
            os.kill(server, signal.SIGKILL)
            pytest.fail(f"the moto server outlived its starter ({sig.name})")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_two_ranks_save_straight_to_s3_and_one_loads(s3_server, s3_bucket, tmp_path, monkeypatch):
    from dist_worker import full_state

    url = f"s3://{s3_bucket}/sharded"
    monkeypatch.setenv("CKPTSTORE_TEST_S3_URL", url)
    run_ranks("s3_sharded", str(tmp_path), 2)
    target = {"model": {k: torch.zeros_like(v) for k, v in full_state().items()}, "step": 0}
    with ckptstore.Checkpointer(url) as ckpt:
        ckpt.load(target)
        manifest = ckpt.latest().manifest
    assert manifest.world_size == 2
    assert_same(target["model"], full_state())
    assert s3_server.open_uploads(s3_bucket) == []


# ---- backup tier -------------------------------------------------------------------
def test_backup_replicates_with_its_own_retention_and_a_fresh_machine_resumes(
    s3_server, s3_bucket, tmp_path, caplog
):
    url = f"s3://{s3_bucket}/backup"
    state = make_state()
    caplog.set_level(logging.INFO, logger="ckptstore")
    with CheckpointManager(
        tmp_path / "local",
        save=SaveEvery(steps=2),
        keep=KeepLast(1),
        backup=url,
        backup_keep=KeepLast(3),
    ) as mgr:
        train(mgr, state, 12)
        mgr.wait_backup()
        status = mgr.backup_status()
        assert status is not None and status.newest_backed_up == "step_00000012"
        assert [c.step for c in mgr.list()] == [12]  # the local tier keeps 1
    remote = open_backend(url)
    on_remote = [i.manifest.step for i in ckptstore.Checkpointer(remote).list()]
    # The remote keeps up to 3; with a backlog of 1 some saves may have been skipped, and
    # then said so. The newest is always there.
    assert on_remote[-1] == 12 and 1 <= len(on_remote) <= 3
    assert set(on_remote) <= {2, 4, 6, 8, 10, 12}
    assert set(status.skipped).isdisjoint({f"step_{s:08d}" for s in on_remote[-1:]})
    for name in status.skipped:
        assert f"skipping {name}" in caplog.text
    assert remote.read_bytes("latest") == b"step_00000012\n"

    # A fresh machine: an empty local directory, the same backup.
    fresh = make_state(seed=5)
    with CheckpointManager(tmp_path / "elsewhere", backup=url) as mgr:
        assert mgr.restore(fresh) == 12
    assert_same(fresh.model.state_dict(), state.model.state_dict())
    assert_same(fresh.optimizer.state_dict(), state.optimizer.state_dict())
    assert os.path.exists(tmp_path / "elsewhere" / "step_00000012" / "manifest.json")
    assert s3_server.open_uploads(s3_bucket) == []


def test_restore_uses_the_backup_when_the_local_copy_is_damaged(
    s3_server, s3_bucket, tmp_path, caplog
):
    url = f"s3://{s3_bucket}/b2"
    local = tmp_path / "local"
    state = make_state()
    with CheckpointManager(local, save=SaveEvery(steps=4), backup=url) as mgr:
        train(mgr, state, 4)
    shard = local / "step_00000004" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    fresh = make_state(seed=9)
    with CheckpointManager(local, backup=url) as mgr:
        assert mgr.restore(fresh) == 4
    assert_same(fresh.model.state_dict(), state.model.state_dict())
    assert "loaded the backup's copy" in caplog.text
    assert ckptstore.Checkpointer(local).verify(4) == []  # the local copy was replaced


def test_local_retention_spares_checkpoints_not_yet_backed_up(s3_server, s3_bucket, tmp_path):
    local = open_backend(tmp_path / "l")
    remote = s3(s3_server, s3_bucket, "r")
    with ckptstore.Checkpointer(local) as ckpt:
        ckpt.save(realistic_state(), 1)
    rep = Replicator(local, remote, catch_up=False)
    try:
        rep.submit("step_00000001")
        assert "step_00000001" in rep.busy() or rep.status().newest_backed_up == "step_00000001"
        assert rep.wait(timeout_s=60) == []
        assert rep.busy() == set()
    finally:
        rep.close()


def test_catch_up_at_start_uploads_what_the_remote_lacks(s3_server, s3_bucket, tmp_path):
    local = open_backend(tmp_path / "l")
    with ckptstore.Checkpointer(local) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(realistic_state(), step)
    remote = s3(s3_server, s3_bucket, "r")
    rep = Replicator(local, remote, max_queued=2)
    try:
        assert rep.wait(timeout_s=60) == []
    finally:
        rep.close()
    # The two newest (the backlog bound); the oldest is left local-only.
    assert [i.manifest.step for i in ckptstore.Checkpointer(remote).list()] == [2, 3]


def test_a_damaged_local_checkpoint_is_never_uploaded(s3_server, s3_bucket, tmp_path, caplog):
    local = open_backend(tmp_path / "l")
    with ckptstore.Checkpointer(local) as ckpt:
        ckpt.save(realistic_state(), 1)
    shard = tmp_path / "l" / "step_00000001" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    remote = s3(s3_server, s3_bucket, "r")
    with pytest.raises(CorruptCheckpointError):
        copy_checkpoint(local, remote, "step_00000001")
    assert keys(s3_server, s3_bucket) == []
    assert s3_server.open_uploads(s3_bucket) == []


def test_restore_with_nothing_anywhere_starts_from_scratch(s3_server, s3_bucket, tmp_path):
    with CheckpointManager(tmp_path / "x", backup=f"s3://{s3_bucket}/none") as mgr:
        assert mgr.restore(make_state()) == 0


def test_backup_clears_what_a_dead_uploader_left_behind(s3_server, s3_bucket, tmp_path):
    local = open_backend(tmp_path / "l")
    with ckptstore.Checkpointer(local) as ckpt:
        ckpt.save(realistic_state(), 1)
    remote = s3(s3_server, s3_bucket, "r")
    # A process killed mid-upload: some files, no manifest.
    s3_server.call("put_object", Bucket=s3_bucket, Key="r/step_00000001/.metadata", Body=b"x")
    rep = Replicator(local, remote)
    try:
        assert rep.wait(timeout_s=60) == []
        assert rep.status().failures == 0
    finally:
        rep.close()
    with ckptstore.Checkpointer(remote) as ckpt:
        assert ckpt.verify(1) == []


def test_reads_share_windows_across_threads(s3_server, s3_bucket, monkeypatch):
    """Small reads from many threads come from a few window GETs, byte-exact."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from ckptstore.storage.objectstore import ObjectStoreReader
    from ckptstore.storage.s3 import S3Reader

    backend = s3(s3_server, s3_bucket)
    W = S3Reader.WINDOW
    data = os.urandom(2 * W + 12345)
    s3_server.fs().pipe_file(f"{s3_bucket}/run/blob", data)
    fetched: list[tuple[int, int]] = []
    ranged_get = ObjectStoreReader.read

    def counting(self, offset, length):
        fetched.append((offset, length))
        return ranged_get(self, offset, length)

    monkeypatch.setattr(ObjectStoreReader, "read", counting)
    reader = backend.open_reader("blob")
    rng = random.Random(0)
    reads = [
        (o, min(rng.randrange(1, 4 << 20), len(data) - o)) for o in range(0, len(data), 1 << 20)
    ]
    rng.shuffle(reads)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: bytes(reader.read(*r)), reads))
    assert got == [data[o : o + n] for o, n in reads]
    # 3 windows cover the object: each fetched once, whatever the order and the threads.
    assert sorted(fetched) == [(0, W), (W, W), (2 * W, 12345)], fetched
    with pytest.raises(StorageError, match="past the end"):
        reader.read(len(data) - 10, 20)
    reader.close()


def test_parts_grow_so_that_large_files_take_few_requests(s3_server, s3_bucket):
    """Parts double every two parts up to max_part_bytes; a copy, which knows the size,
    uses equal parts of half that or more; a file that grows past an estimate (an
    incremental save's) doubles again. Counted in the multipart ETag ("-N")."""
    backend = s3(s3_server, s3_bucket)
    backend.part_bytes, backend.max_part_bytes = MIN_PART_BYTES, 4 * MIN_PART_BYTES
    backend.parts_in_flight = 2
    data = os.urandom(8 * MIN_PART_BYTES)
    pending = backend.begin("step_00000001")
    # Streamed: 5, 5, 10, 10, 10 MiB (8 parts at a fixed 5 MiB); sized: 4 x 10 MiB.
    cases = (("streamed", None, 5), ("sized", len(data), 4), ("estimated-too-small", 1000, 5))
    for name, hint, parts in cases:
        sink = pending.create_file(name, size_hint=hint)
        for i in range(0, len(data), MIB):
            sink.write(data[i : i + MIB])
        sink.close()
        head = s3_server.call("head_object", Bucket=s3_bucket, Key=f"run/step_00000001/{name}")
        assert head["ETag"].strip('"').endswith(f"-{parts}"), (name, head["ETag"])
        assert head["ContentLength"] == len(data)
        with backend.open_reader(f"step_00000001/{name}") as reader:
            assert bytes(reader.read(0, len(data))) == data
    pending.abort()


def test_a_probe_for_a_file_is_one_head_and_no_listing(s3_server, s3_bucket, monkeypatch):
    """s3fs's ``exists`` follows a missing key with a LIST (a "directory" of that name?);
    ckptstore asks about files only, with one HEAD (issue 17: probes per save)."""
    backend = s3(s3_server, s3_bucket)
    backend.put_atomic("step_1/there.bin", b"x")
    calls: list[str] = []
    original = type(backend.fs)._call_s3

    async def counted(self, method, *args, **kwargs):
        calls.append(method)
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(type(backend.fs), "_call_s3", counted)
    assert backend.exists("step_1/there.bin")
    assert not backend.exists("step_1/missing.bin")
    assert not backend.exists("step_1")  # a prefix is not a file
    assert calls == ["head_object"] * 3, calls
