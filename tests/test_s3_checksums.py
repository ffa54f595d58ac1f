"""Checksums the store checks (issue 17): every part and small PUT carries its CRC32,
the store keeps it, the sink compares what the store reports with what it sent, and a
copy skips reading every file back only where the store is seen to refuse a wrong
checksum. moto accepts a wrong one (it echoes the header), so against moto copies are
still read back; the skip is shown by telling a backend its store checks."""

from __future__ import annotations

import base64
import itertools
import os
import zlib

import pytest
import torch
from test_s3 import keys, s3

import ckptstore
from ckptstore.errors import StorageError
from ckptstore.storage.s3 import MIN_PART_BYTES
from ckptstore.storage.s3_upload import crc32_b64
from ckptstore.transfer import copy_checkpoint

MIB = 1 << 20


def _raw(b64: str) -> bytes:
    return base64.b64decode(b64)


def test_crc32_is_s3s_encoding():
    # S3's x-amz-checksum-crc32: big-endian CRC-32 (IEEE), base64
    assert crc32_b64(b"hello") == "NhCmhg=="
    assert crc32_b64(b"") == "AAAAAA=="


def test_every_part_carries_its_crc32_and_the_store_keeps_the_composite(s3_server, s3_bucket):
    backend = s3(s3_server, s3_bucket)
    backend.part_bytes = MIN_PART_BYTES
    data = os.urandom(12 * MIB)
    sink = backend.create_sink(f"{s3_bucket}/run/x.bin")
    sink.write(data)
    sink.close()
    sent = [p["ChecksumCRC32"] for p in sink._parts]  # as complete_multipart_upload got them
    # parts of 5, 5 and 2 MiB (part_bytes doubles every two parts), each its own CRC32
    bounds = [0, 5 * MIB, 10 * MIB, 12 * MIB]
    assert sent == [crc32_b64(data[a:b]) for a, b in itertools.pairwise(bounds)]
    assert sink.confirmed  # moto reported each part's checksum back
    head = s3_server.call("head_object", Bucket=s3_bucket, Key="run/x.bin", ChecksumMode="ENABLED")
    composite = zlib.crc32(b"".join(_raw(c) for c in sent))
    assert _raw(head["ChecksumCRC32"].split("-")[0]) == composite.to_bytes(4, "big")


def test_a_checksum_the_store_reports_differently_fails_the_upload(s3_server, s3_bucket):
    backend = s3(s3_server, s3_bucket)
    sink = backend.create_sink(f"{s3_bucket}/run/y.bin")
    with pytest.raises(StorageError, match="reports CRC32"):
        sink._confirm(crc32_b64(b"a"), {"ChecksumCRC32": crc32_b64(b"b")}, "part 1")
    sink._confirm(crc32_b64(b"a"), {}, "part 2")  # a store that reports none: not confirmed
    assert not sink.confirmed
    sink.abort()


def test_moto_accepts_a_wrong_checksum_so_copies_are_read_back(s3_server, s3_bucket, tmp_path):
    backend = s3(s3_server, s3_bucket)
    assert backend.checks_uploads() is False
    assert keys(s3_server, s3_bucket) == []  # the probe object was deleted again
    with ckptstore.Checkpointer(tmp_path, codec="none") as ck:
        ck.save({"w": torch.randn(MIB)}, 1)
        local = ck._backend
    reads = _count_reads(backend)
    copy_checkpoint(local, backend, "step_00000001")
    assert reads and all(name.startswith("step_00000001") for name in reads), reads


def test_a_store_that_checks_checksums_is_not_read_back(s3_server, s3_bucket, tmp_path):
    backend = s3(s3_server, s3_bucket)
    backend.part_bytes = MIN_PART_BYTES
    backend._checks = True  # as the probe finds on AWS S3 (a wrong CRC32: BadDigest)
    state = {"w": torch.randn(3 * MIB), "b": torch.randn(7)}
    with ckptstore.Checkpointer(tmp_path, codec="none") as ck:
        ck.save(state, 1)
        local = ck._backend
    reads = _count_reads(backend)
    copy_checkpoint(local, backend, "step_00000001")
    assert reads == [], reads  # nothing read back
    # and the copy is whole: verified and loaded from the bucket
    with ckptstore.Checkpointer(backend, codec="none") as remote:
        assert remote.verify(1) == []
        got = {"w": torch.zeros(3 * MIB), "b": torch.zeros(7)}
        remote.load(got)
    assert torch.equal(got["w"], state["w"]) and torch.equal(got["b"], state["b"])


def _count_reads(backend) -> list[str]:
    """The names ``backend`` opens for reading from now on (recorded, then read)."""
    reads: list[str] = []
    open_reader = backend.open_reader

    def recording(name: str):
        reads.append(name)
        return open_reader(name)

    backend.open_reader = recording
    return reads


def test_the_whole_object_is_checked_against_its_parts(s3_server, s3_bucket):
    """Every written byte went into a part, and where the store reports the object's
    composite CRC32 it is the one the parts make."""
    backend = s3(s3_server, s3_bucket)
    sink = backend.create_sink(f"{s3_bucket}/run/z.bin")
    parts = [{"PartNumber": 1, "ChecksumCRC32": crc32_b64(b"ab")},
             {"PartNumber": 2, "ChecksumCRC32": crc32_b64(b"cd")}]  # fmt: skip
    composite = crc32_b64(base64.b64decode(parts[0]["ChecksumCRC32"]) +
                          base64.b64decode(parts[1]["ChecksumCRC32"]))  # fmt: skip
    sink._confirm_whole(parts, {"ChecksumCRC32": f"{composite}-2"})  # AWS's form
    sink._confirm_whole(parts, {"ChecksumCRC32": composite})  # moto's
    sink._confirm_whole(parts, {})  # none reported: the parts decide
    with pytest.raises(StorageError, match="for the object"):
        sink._confirm_whole(parts, {"ChecksumCRC32": f"{crc32_b64(b'x')}-2"})
    sink._size = 5  # a byte written that no part carried
    with pytest.raises(StorageError, match="sent in parts"):
        sink._confirm_whole(parts, {})
    sink.abort()
