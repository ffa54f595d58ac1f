"""The note an incremental save leaves in its shard (:mod:`ckptstore.dcp.incremental`):
its key, its version, and reading it back from disk after a restart. What is read is
untrusted input: every field goes through one of the checks here, and any doubt means
a full save (``IncrementalCache._seed``)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ckptstore.format.shard import ShardReader

NOTE_KEY = "@ckptstore.incremental"  # DCP's keys start with a state dict key's name
NOTE_VERSION = 1


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def plain(value: Any) -> str:
    """A file or checkpoint name: one path component."""
    name = text(value)
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"not a plain name: {name!r}")
    return name


def hexdigest(value: Any) -> str:
    """A digest, or "" (an item not hashed: it had changed for certain)."""
    digest = text(value)
    if digest:
        int(digest, 16)  # ValueError if not hexadecimal
    return digest


def count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a count, got {value!r}")
    return value


def read_note(backend: Any, name: str, own: str, entry: Any) -> tuple[dict[str, Any], int]:
    """The note in ``name/own`` (:data:`NOTE_KEY`), and the raw bytes of the state there."""
    with backend.open_reader(f"{name}/{own}") as reader:
        shard = ShardReader(
            reader, f"{name}/{own}", size_bytes=entry.size_bytes, index_xxh3=entry.xxh3_64
        )
        at = [i for i, item in enumerate(shard.items) if item.key == NOTE_KEY]
        if len(at) != 1:
            raise ValueError("no note in that shard")
        out = np.empty(shard.items[at[0]].nbytes, dtype=np.uint8)
        shard.read_item(at[0], out, None)
        state = sum(item.nbytes for item in shard.items if item.key != NOTE_KEY)
        return json.loads(out.tobytes()), state
