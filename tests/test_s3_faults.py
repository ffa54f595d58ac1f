"""S3 under network faults: a loopback TCP proxy between s3fs and the moto server.

Connection resets mid-upload, added latency, a remote that refuses connections, and one
that stops answering in the middle of an upload. In every case local saves go on,
replication eventually completes, every uploaded byte verifies, nothing partial is
ever listed, and no multipart upload is left open. The secret key (a canary) appears
in no log line, exception, manifest or file written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
import time

import damage
import pytest
import torch
from helpers import Randn, blank_like, build_state, train, train_state
from tcp_proxy import FaultProxy

import ckptstore
from ckptstore import CheckpointManager, KeepLast, SaveEvery
from ckptstore.manager.replicate import Replicator
from ckptstore.storage import S3Backend, open_backend
from ckptstore.storage.s3 import MIN_PART_BYTES
from ckptstore.storage.testing import FaultyBackend
from ckptstore.storage.testing.s3server import SECRET_KEY, S3Server

MIB = 1 << 20
# Fail fast instead of waiting a minute per request: short timeouts, no botocore retries
# (s3fs still retries a few times, and the replicator retries the whole file).
FAST = {"config_kwargs": {"connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 1}}}


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server.port) as p:
        yield p


def via(server: S3Server, proxy: FaultProxy, bucket: str, prefix: str) -> S3Backend:
    b = open_backend(f"s3://{bucket}/{prefix}", storage_options=server.options(proxy.url, **FAST))
    assert isinstance(b, S3Backend)
    b.part_bytes = MIN_PART_BYTES
    b.fs.retries = 2  # s3fs's own retries (5 by default) would take ~25 s per timed-out call
    return b


def direct(server: S3Server, bucket: str, prefix: str) -> S3Backend:
    b = open_backend(f"s3://{bucket}/{prefix}", storage_options=server.options())
    assert isinstance(b, S3Backend)
    return b


def local_checkpoint(path, step: int, mib: int = 12):
    backend = open_backend(path)
    g = torch.Generator().manual_seed(step)
    with ckptstore.Checkpointer(backend, codec="none") as ckpt:
        ckpt.save({"w": torch.randn(mib * MIB // 4, generator=g), "step": step}, step)
    return backend


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_connection_resets_mid_upload_then_backup_completes(s3_server, s3_bucket, proxy, tmp_path):
    local = local_checkpoint(tmp_path / "l", 1)
    proxy.set_latency(0.002)
    proxy.reset_after(3 * MIB, times=3)  # three uploads cut off a few MiB in
    rep = Replicator(local, via(s3_server, proxy, s3_bucket, "r"), retry_initial_s=0.2)
    try:
        assert rep.wait(timeout_s=120) == []
    finally:
        rep.close()
    assert proxy.resets >= 1
    remote = direct(s3_server, s3_bucket, "r")
    with ckptstore.Checkpointer(remote) as ckpt:
        assert [i.step for i in ckpt.list()] == [1]
        assert ckpt.verify(1) == []
    assert s3_server.open_uploads(s3_bucket) == []


def test_server_stops_answering_mid_upload(s3_server, s3_bucket, proxy, tmp_path):
    local = local_checkpoint(tmp_path / "l", 2, mib=24)
    proxy.set_latency(0.01)  # slow enough to be caught in the middle
    rep = Replicator(
        local, via(s3_server, proxy, s3_bucket, "r"), retry_initial_s=0.2, retry_max_s=1
    )
    try:
        wait_for(
            lambda: rep.status().in_progress is not None and proxy.connections > 2, what="upload"
        )
        proxy.blackhole(True)
        wait_for(lambda: rep.status().failures >= 1, what="a failed attempt")
        remote = direct(s3_server, s3_bucket, "r")
        assert ckptstore.Checkpointer(remote).list() == []  # nothing partial is listed
        proxy.clear()
        assert rep.wait(timeout_s=120) == []
    finally:
        rep.close()
    with ckptstore.Checkpointer(direct(s3_server, s3_bucket, "r")) as ckpt:
        assert ckpt.verify(2) == []
    assert s3_server.open_uploads(s3_bucket) == []


def test_unreachable_remote_never_stops_local_saves(s3_server, s3_bucket, proxy, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ckptstore")
    proxy.refuse(True)  # the remote is down from the start
    url = f"s3://{s3_bucket}/down"
    state = train_state()
    with CheckpointManager(
        tmp_path / "l",
        save=SaveEvery(steps=2),
        keep=KeepLast(2),
        backup=url,
        backup_options=s3_server.options(proxy.url, **FAST),
        backup_retry_max_s=1.0,
    ) as mgr:
        assert "cannot reach" in caplog.text or "did not answer" in caplog.text
        train(mgr, state, 6)
        # Local saves went on. Retention spares a checkpoint still waiting for its upload,
        # so step 2 is there or not depending on where the retries stood when it ran.
        steps = [c.step for c in mgr.list()]
        assert steps[-2:] == [4, 6] and set(steps) <= {2, 4, 6}, steps
        wait_for(lambda: mgr.backup_status().failures >= 1, what="a failed upload")
        status = mgr.backup_status()
        assert status.newest_backed_up is None and status.last_error
        assert "behind" in caplog.text
        proxy.clear()  # the remote comes back
        assert mgr.wait_backup(timeout_s=120) == []
        assert mgr.backup_status().newest_backed_up == "step_00000006"
    remote = direct(s3_server, s3_bucket, "down")
    assert [i.step for i in ckptstore.Checkpointer(remote).list()][-1] == 6
    assert s3_server.open_uploads(s3_bucket) == []


def test_close_can_leave_pending_uploads_and_says_which(
    s3_server, s3_bucket, proxy, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="ckptstore")
    state = train_state()
    mgr = CheckpointManager(
        tmp_path / "l",
        save=SaveEvery(steps=2),
        backup=f"s3://{s3_bucket}/left",
        backup_options=s3_server.options(proxy.url, **FAST),
        backup_retry_max_s=1.0,
    )
    proxy.refuse(True)
    train(mgr, state, 2)
    mgr.close(wait_backup=False)
    assert "not backed up to" in caplog.text and "step_00000002" in caplog.text
    assert os.path.exists(tmp_path / "l" / "step_00000002" / "manifest.json")


def test_the_secret_key_never_leaks(s3_server, s3_bucket, proxy, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="ckptstore")
    errors: list[str] = []
    state = train_state()
    url = f"s3://{s3_bucket}/canary"
    proxy.reset_after(200_000, times=2)
    with CheckpointManager(
        tmp_path / "l",
        save=SaveEvery(steps=2),
        backup=url,
        backup_options=s3_server.options(proxy.url, **FAST),
        backup_retry_max_s=0.5,
    ) as mgr:
        train(mgr, state, 4)
        assert mgr.wait_backup(timeout_s=120) == []
        errors.append(repr(mgr.backup_status()))
        errors.append(repr(mgr.checkpointer))
    # Failures that carry messages: a missing bucket, a refused connection.
    for bad in ("s3://no-such-bucket-canary/x", url):
        if bad == url:
            proxy.refuse(True)
        try:
            b = open_backend(bad, storage_options=s3_server.options(proxy.url, **FAST))
            b.check_access()
            b.read_bytes("nothing")
        except Exception as exc:
            errors.append(f"{exc!r} {exc} {exc.__cause__!r}")
            errors.append(repr(b))
    proxy.clear()
    haystack = [caplog.text, *errors]
    for root, _, files in os.walk(tmp_path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                haystack.append(fh.read().decode("latin-1"))
    fs = s3_server.fs()
    for o in s3_server.call("list_objects_v2", Bucket=s3_bucket).get("Contents", []):
        haystack.append(o["Key"])
        haystack.append(fs.cat_file(f"{s3_bucket}/{o['Key']}").decode("latin-1"))
    info = ckptstore.Checkpointer(direct(s3_server, s3_bucket, "canary")).latest()
    haystack.append(pickle.dumps(info.manifest).decode("latin-1"))
    assert len(haystack) > 5
    for text in haystack:
        assert SECRET_KEY not in text


# ---- exceptions mid-upload, writers racing for one step --------------------------------


def _big_state(seed: int, mib: int = 14) -> dict:
    return build_state(seed, w=Randn(mib * MIB // 4), seed=seed)


def _blank_big(mib: int = 14) -> dict:
    return blank_like(_big_state(0, mib), -1)


def test_exception_inside_the_sink_with_parts_in_flight_leaves_nothing(s3_server, s3_bucket):
    """A non-I/O exception raised from inside the sink while parts upload: the save
    fails with it, nothing is listed, no multipart upload stays open, and after gc
    nothing at all is left under the root."""
    writes = []

    def fault(op: str, name: str) -> BaseException | None:
        if op == "write" and name.startswith("__0_"):
            writes.append(name)
            # By the third write two 5 MiB parts are on their way.
            if len(writes) == 3:
                assert s3_server.open_uploads(s3_bucket) != []
                return RuntimeError("boom from inside the sink")
        return None

    remote = direct(s3_server, s3_bucket, "mid")
    remote.part_bytes = MIN_PART_BYTES
    with ckptstore.Checkpointer(
        FaultyBackend(remote, fault), codec="none", chunk_bytes=4 * MIB
    ) as ckpt:
        with pytest.raises(RuntimeError, match="boom from inside the sink"):
            ckpt.save(_big_state(1), 1)
        assert ckpt.list() == []
    assert len(writes) == 3
    assert s3_server.open_uploads(s3_bucket) == []
    direct(s3_server, s3_bucket, "mid").sweep(grace_s=0)  # gc
    assert s3_server.call("list_objects_v2", Bucket=s3_bucket).get("Contents", []) == []
    # And the next save of the same step works.
    with ckptstore.Checkpointer(direct(s3_server, s3_bucket, "mid"), codec="none") as ckpt:
        ckpt.save(_big_state(1), 1)
        assert ckpt.verify(1) == []


def _race(s3_server, s3_bucket, prefix: str, sync_on: str | None) -> None:
    """Two writers save different states as the same step at once; ``sync_on`` names a
    file both must have started before either closes it (None: free-running)."""
    barrier = threading.Barrier(2, timeout=30)

    def fault(op: str, name: str) -> BaseException | None:
        if sync_on is not None and op == "close" and name.startswith(sync_on):
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
        return None

    outcomes: dict[int, BaseException | None] = {}

    def writer(seed: int) -> None:
        backend = FaultyBackend(direct(s3_server, s3_bucket, prefix), fault)
        try:
            with ckptstore.Checkpointer(backend, codec="zstd", chunk_bytes=1 * MIB) as ckpt:
                ckpt.save(_big_state(seed, mib=3), 7)
            outcomes[seed] = None
        except BaseException as exc:
            outcomes[seed] = exc
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    winners = [seed for seed, exc in outcomes.items() if exc is None]
    assert len(winners) == 1, outcomes
    loser = 3 - winners[0]
    assert isinstance(outcomes[loser], ckptstore.CkptStoreError), outcomes[loser]
    with ckptstore.Checkpointer(direct(s3_server, s3_bucket, prefix)) as ckpt:
        assert [i.step for i in ckpt.list()] == [7]
        assert ckpt.verify(7) == []
        target = _blank_big(3)
        ckpt.load(target, 7)
    expected = _big_state(winners[0], mib=3)
    assert torch.equal(target["w"], expected["w"]) and target["seed"] == winners[0]
    assert s3_server.open_uploads(s3_bucket) == []


@pytest.mark.parametrize("sync_on", ["__0_", ".metadata", None])
def test_two_writers_race_for_one_step_and_the_winner_is_intact(s3_server, s3_bucket, sync_on):
    """Exactly one wins, and what it committed verifies and loads bit-exact: the loser
    never overwrites or deletes a file the winner's manifest lists."""
    for round_ in range(2 if sync_on is None else 1):
        _race(s3_server, s3_bucket, f"race{round_}", sync_on)


# ---- bit rot in committed checkpoints on S3 ---------------------------------------------


def _damage(fs, key: str, how: str, other: str | None = None) -> None:
    data = fs.cat_file(key)
    if how == "flip":
        data = damage.xored(data, 100, 0x04)
    elif how == "truncate":
        data = damage.truncated(data, by=100)
    elif how == "zero tail":
        data = damage.zero_tailed(data, 4096)
    elif how == "swap":
        assert other is not None
        data = fs.cat_file(other)
    if how == "delete":
        fs.rm_file(key)
    else:
        fs.pipe_file(key, data)


@pytest.mark.parametrize(
    ("how", "what"),
    [
        ("flip", "shard"),
        ("swap", "shard"),
        ("delete", "metadata"),
        pytest.param("truncate", "shard", marks=pytest.mark.slow),
        pytest.param("zero tail", "shard", marks=pytest.mark.slow),
        pytest.param("delete", "shard", marks=pytest.mark.slow),
        pytest.param("flip", "metadata", marks=pytest.mark.slow),
    ],
)
def test_bit_rot_on_s3_is_named_by_verify_and_restore_falls_back(
    s3_server, s3_bucket, caplog, how, what
):
    url = f"s3://{s3_bucket}/rot"
    opts = s3_server.options()
    with CheckpointManager(url, save=SaveEvery(steps=2), storage_options=opts) as mgr:
        train(mgr, train_state(), 4)
    fs = s3_server.fs()

    def key_of(step: int) -> str:
        names = fs.ls(f"{s3_bucket}/rot/step_{step:08d}", detail=False)
        return next(n for n in names if (".distcp" if what == "shard" else ".metadata") in n)

    victim = key_of(4)
    _damage(fs, victim, how, key_of(2))
    with ckptstore.Checkpointer(url, storage_options=opts) as ckpt:
        problems = ckpt.verify(4)
        assert len(problems) == 1, problems
        assert victim.rsplit("/", 1)[1] in problems[0]
        assert ckpt.verify(2) == []
        expected = train_state()
        ckpt.load(expected.state_dict(), 2)
    restored = train_state(seed=5)
    with (
        caplog.at_level(logging.WARNING, logger="ckptstore"),
        CheckpointManager(url, storage_options=opts) as mgr,
    ):
        assert mgr.restore(restored) == 2
    assert "skipping step 4" in caplog.text
    for k, v in expected.model.state_dict().items():
        assert torch.equal(v, restored.model.state_dict()[k]), k


def test_a_dead_writers_leftovers_at_the_same_step_do_not_block_the_next_save(s3_server, s3_bucket):
    """A writer killed before its manifest leaves objects under the step's prefix; the
    next save of that step (a resumed run) writes its own, commits, and lists only them."""
    fs = s3_server.fs()
    for name in (
        "__0_0.distcp",
        ".metadata",
        "__0_0-0123456789ab.distcp",
        ".metadata-0123456789ab",
    ):
        fs.pipe_file(f"{s3_bucket}/dead/step_00000003/{name}", b"from a writer that died")
    with ckptstore.Checkpointer(direct(s3_server, s3_bucket, "dead"), codec="zstd") as ckpt:
        ckpt.save(_big_state(3, mib=1), 3)
        assert ckpt.verify(3) == []
        manifest = ckpt.latest().manifest
        target = _blank_big(1)
        ckpt.load(target, 3)
    assert torch.equal(target["w"], _big_state(3, mib=1)["w"])
    assert not any(
        "0123456789ab" in f or f in ("__0_0.distcp", ".metadata") for f in manifest.files
    )


def test_throttled_by_slowdown_a_direct_save_backs_off_and_completes(s3_server, s3_bucket, proxy):
    """S3 answers 503 SlowDown when a prefix takes more requests than it serves; with
    stock client settings the save backs off, asks again and completes: no partial
    object, the checkpoint verifies and loads bit-exact."""
    backend = open_backend(
        f"s3://{s3_bucket}/throttled", storage_options=s3_server.options(proxy.url)
    )
    backend.part_bytes = MIN_PART_BYTES
    g = torch.Generator().manual_seed(7)
    state = {"w": torch.randn(3 * MIB, generator=g), "step": 1}  # 12 MiB: multipart
    with ckptstore.Checkpointer(backend, codec="none") as ckpt:
        proxy.slow_down(4)
        ckpt.save(state, 1)
        assert proxy.slowdowns == 4  # every one was answered, and the request retried
        assert ckpt.verify(1) == []
        got = {"w": torch.zeros(3 * MIB), "step": 0}
        ckpt.load(got)
    assert torch.equal(got["w"], state["w"]) and got["step"] == 1
    assert s3_server.open_uploads(s3_bucket) == []


def test_uploads_go_on_asking_when_the_clients_own_retries_give_up(s3_server, s3_bucket, proxy):
    """With botocore's and s3fs's retries off, ckptstore's own back-off carries a
    multipart upload (start, parts, completion) through a run of SlowDowns."""
    backend = via(s3_server, proxy, s3_bucket, "throttled")
    backend.fs.retries = 1
    data = os.urandom(12 * MIB)
    sink = backend.create_sink(f"{s3_bucket}/throttled/x.bin")
    proxy.slow_down(3)
    sink.write(data)
    sink.close()
    assert proxy.slowdowns == 3
    assert s3_server.fs().cat_file(f"{s3_bucket}/throttled/x.bin") == data
    assert s3_server.open_uploads(s3_bucket) == []
