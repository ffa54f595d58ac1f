"""Damage done on purpose: what bit rot, a torn write or an attacker does to a file.

Functions on a path change the file in place (same inode, like a disk would); the
``*ed`` functions return damaged copies of bytes, for stores reached through an API
(S3). :func:`forge_manifest` rewrites a manifest and fixes its checksum to match, as
someone who can write the checkpoint but does not know the manifest key can.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import Any

from ckptstore.format.checksum import digest
from ckptstore.format.manifest import _canonical

SHARD = "__0_0.distcp"  # rank 0's shard: in every checkpoint
MANIFEST = "manifest.json"
SHARD_MAGIC = b"CKPTIDX1"  # the last 8 bytes of a shard, after the index length


def xor(path: str, offset: int, mask: int = 0x10, length: int = 1) -> None:
    """XOR ``mask`` into ``length`` bytes of the file from ``offset`` (one bit by default)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ mask for b in data))


def truncate(path: str, by: int = 100) -> None:
    """Cut the last ``by`` bytes off the file."""
    os.truncate(path, os.path.getsize(path) - by)


def zero_tail(path: str, n: int = 4096) -> None:
    """Overwrite the last ``n`` bytes of the file (all of it, if shorter) with zeros."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(max(0, size - n))
        f.write(bytes(min(size, n)))


def xored(data: bytes, offset: int, mask: int = 0x10) -> bytes:
    """``data`` with ``mask`` XORed into the byte at ``offset``."""
    return data[:offset] + bytes([data[offset] ^ mask]) + data[offset + 1 :]


def truncated(data: bytes, by: int = 100) -> bytes:
    """``data`` without its last ``by`` bytes."""
    return data[:-by]


def zero_tailed(data: bytes, n: int = 4096) -> bytes:
    """``data`` with its last ``n`` bytes zeroed (for ``data`` at least ``n`` long)."""
    return data[:-n] + bytes(n)


def manifest_checksum(body: dict[str, Any]) -> str:
    """The ``checksum`` field a manifest with this body (without ``checksum``) must carry."""
    return "xxh3-64:" + digest(_canonical(body))


def forge_manifest(ckpt_dir: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit the manifest with ``change(body)`` and make its xxh3 checksum match, as an
    attacker without the key can (an ``hmac`` field is left as it was)."""
    path = os.path.join(ckpt_dir, MANIFEST)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(forged(data, change))


def forged(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """:func:`forge_manifest` on the bytes of a manifest (for objects on S3)."""
    body = dict(json.loads(data))
    body.pop("checksum")
    change(body)
    body["checksum"] = manifest_checksum(body)
    return json.dumps(body).encode()


def split_shard(data: bytes) -> tuple[bytes, bytes]:
    """A shard file's bytes as (chunks, index JSON); the trailer is not checked."""
    length, _ = struct.unpack("<Q8s", data[-16:])
    start = len(data) - 16 - length
    return data[:start], data[start:-16]


def join_shard(chunks: bytes, index: bytes) -> bytes:
    """A shard file from chunks and an index (JSON bytes), trailer included."""
    return chunks + index + struct.pack("<Q8s", len(index), SHARD_MAGIC)


def replace_shard(ckpt_dir: str, chunks: bytes, index: bytes) -> None:
    """Write rank 0's shard anew from ``chunks`` and ``index`` (JSON bytes) and forge
    the manifest to match it (size, index checksum), as an attacker can."""
    path = os.path.join(ckpt_dir, SHARD)
    with open(path, "wb") as f:
        f.write(join_shard(chunks, index))
    forge_manifest(
        ckpt_dir,
        lambda body: body["files"][SHARD].update(
            size_bytes=os.path.getsize(path), xxh3_64=digest(index)
        ),
    )


def replace_file(ckpt_dir: str, name: str, data: bytes, *, drop_hmac: bool = False) -> None:
    """Write ``data`` as the checkpoint's file ``name`` (``.metadata``, say) and forge
    the manifest's entry for it; ``drop_hmac`` also removes a signature the forger
    could not recompute."""
    with open(os.path.join(ckpt_dir, name), "wb") as f:
        f.write(data)

    def change(body: dict[str, Any]) -> None:
        body["files"][name] = {"kind": "file", "size_bytes": len(data), "xxh3_64": digest(data)}
        if drop_hmac:
            body.pop("hmac", None)

    forge_manifest(ckpt_dir, change)


class Boom:
    """Unpickling this creates a file at ``path``: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
