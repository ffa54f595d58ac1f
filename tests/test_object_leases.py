"""Issue 14, item 5 on object stores: a lease object with a heartbeat refuses a second
writer on an ``s3://`` root at once, naming the holder; a lease whose holder is gone
(not heard from for STALE_S, or its process on this host has exited) is taken over; and
small files are read with a size cap, as on local disk. S3 through the moto server of
``conftest.py``."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from ckptstore import CheckpointManager, WriterLeaseError
from ckptstore.errors import CorruptCheckpointError
from ckptstore.layout import LATEST_FILE, WRITER_LEASE_FILE
from ckptstore.manager import remote_lease
from ckptstore.storage import open_backend


def state() -> dict:
    return {"w": torch.arange(10.0)}


def put_lease(url: str, **fields) -> None:
    record = {"host": "elsewhere", "pid": 4242, "since": "then", "id": "theirs"}
    record.update(fields)
    open_backend(url).put_atomic(WRITER_LEASE_FILE, json.dumps(record).encode())


def test_a_second_writer_on_an_s3_root_is_refused_naming_the_first(s3_bucket):
    url = f"s3://{s3_bucket}/run"
    with CheckpointManager(url) as first:
        first.save(0, state())
        first.wait()
        with pytest.raises(WriterLeaseError) as err:
            CheckpointManager(url)
        message = str(err.value)
        assert f"process {os.getpid()} on host {socket.gethostname()}" in message
        assert "last heard from" in message
        with CheckpointManager(url, enabled=False) as reader:  # readers take no lease
            got = state()
            assert reader.restore(got) == 1
    assert WRITER_LEASE_FILE not in open_backend(url).list_names()  # released
    with CheckpointManager(url) as again:
        assert again.restore(state()) == 1


def test_a_lease_not_heard_from_is_taken_over(s3_bucket, caplog):
    url = f"s3://{s3_bucket}/stale"
    put_lease(url, heartbeat_unix_s=time.time() - remote_lease.STALE_S - 5)
    caplog.set_level(logging.WARNING, logger="ckptstore")
    with CheckpointManager(url) as mgr:
        mgr.save(0, state())
        mgr.wait()
    assert "taking over the writer lease" in caplog.text
    assert "has not been heard from for" in caplog.text


def test_a_fresh_lease_of_another_host_is_respected(s3_bucket):
    url = f"s3://{s3_bucket}/fresh"
    put_lease(url, heartbeat_unix_s=time.time())
    with pytest.raises(WriterLeaseError, match="process 4242 on host elsewhere"):
        CheckpointManager(url)


def test_a_lease_whose_process_here_has_exited_is_taken_over_at_once(s3_bucket, caplog):
    url = f"s3://{s3_bucket}/exited"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    put_lease(url, host=socket.gethostname(), pid=dead.pid, heartbeat_unix_s=time.time())
    caplog.set_level(logging.WARNING, logger="ckptstore")
    with CheckpointManager(url):
        pass
    assert "has exited" in caplog.text


def test_the_heartbeat_renews_the_lease_and_notices_a_takeover(s3_bucket, monkeypatch):
    monkeypatch.setattr(remote_lease, "HEARTBEAT_S", 0.2)
    url = f"s3://{s3_bucket}/beat"
    backend = open_backend(url)
    lease = remote_lease.acquire(backend)
    try:
        first = remote_lease.read_holder(backend)["heartbeat_unix_s"]
        deadline = time.time() + 20
        while remote_lease.read_holder(backend)["heartbeat_unix_s"] == first:
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.1)
        put_lease(url, heartbeat_unix_s=time.time())  # presumed dead, taken over
        while not lease.lost:
            assert time.time() < deadline, "the takeover went unnoticed"
            time.sleep(0.1)
    finally:
        lease.release()
    assert remote_lease.read_holder(backend)["id"] == "theirs"  # not deleted: not ours


def test_small_files_on_an_object_store_are_read_with_a_cap(s3_bucket):
    url = f"s3://{s3_bucket}/caps"
    with CheckpointManager(url) as mgr:
        mgr.save(0, state())
        mgr.wait()
    backend = open_backend(url)
    backend.put_atomic(LATEST_FILE, b"x" * ((1 << 20) + 10))  # a pointer is a few bytes
    with pytest.raises(CorruptCheckpointError, match="more than the"):
        backend.read_bytes(LATEST_FILE)
    listing = subprocess.run(
        [sys.executable, "-m", "ckptstore", "ls", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "step_00000001" in listing.stdout
