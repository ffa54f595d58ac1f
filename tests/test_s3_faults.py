"""S3 under network faults: a loopback TCP proxy between s3fs and the moto server.

Connection resets mid-upload, added latency, a remote that refuses connections, and one
that stops answering in the middle of an upload. In every case local saves go on,
replication eventually completes, every uploaded byte verifies, nothing partial is
ever listed, and no multipart upload is left open. The secret key (a canary) appears
in no log line, exception, manifest or file written.
"""

from __future__ import annotations

import logging
import os
import pickle
import time

import pytest
import torch
from s3server import SECRET_KEY, S3Server
from tcp_proxy import FaultProxy
from test_manager import make_state, train

import ckptstore
from ckptstore import CheckpointManager, KeepLast, SaveEvery
from ckptstore.backup import Replicator
from ckptstore.storage import S3Backend, open_backend
from ckptstore.storage.s3 import MIN_PART_BYTES

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
    state = make_state()
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
        assert [c.step for c in mgr.list()] == [4, 6]  # local saves went on
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
    state = make_state()
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
    state = make_state()
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
