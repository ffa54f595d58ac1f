"""A shard file's index (``ckptstore.format.shard``): its entries, parsed and checked.

The index is JSON: per item its key, dtype, raw size, codec config and chunks
``[offset, stored, raw, xxh3, layout]``. Everything in it is untrusted until checked
here (sizes, offsets, digests, dtypes). Parsed indexes are kept by their checksum, a
few MiB of them: an incremental save reads the index of every file it links from,
every save, and a file read again is not parsed again (~2.4 ms for 260 items).
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptstore.codecs import Codec, ElementKind, get_codec
from ckptstore.errors import IncompatibleCheckpointError
from ckptstore.format.checksum import is_digest

if TYPE_CHECKING:
    import torch

INDEX_FORMAT = 1
# Sizes read from a file are untrusted: anything past these is not something ckptstore
# wrote, and is refused before it is allocated.
MAX_CHUNK_BYTES = 1 << 30
MAX_VALUE_BYTES = 2 << 30  # one pickled Python value
_KEEP_BYTES = 8 << 20  # of index JSON kept parsed (~50,000 items)


@functools.cache
def _dtypes() -> dict[str, torch.dtype]:
    """The dtypes a shard may hold, by name; built on first use, so that this module (and
    ``ckptstore ls``, through the config) imports without torch."""
    import torch

    return {
        str(d).removeprefix("torch."): d
        for d in (
            torch.float64, torch.float32, torch.float16, torch.bfloat16,
            torch.complex128, torch.complex64, torch.complex32,
            torch.int64, torch.int32, torch.int16, torch.int8,
            torch.uint64, torch.uint32, torch.uint16, torch.uint8, torch.bool,
            torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
        )
    }  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _dtypes():
        raise ValueError(f"ckptstore cannot store tensors of dtype {dtype}")
    return name


@dataclass(frozen=True)
class ChunkEntry:
    offset: int
    stored: int
    raw: int
    xxh3: str
    layout: list[int]


@dataclass(frozen=True)
class ItemEntry:
    key: str
    dtype: torch.dtype | None  # None: opaque bytes
    nbytes: int
    codec: Codec
    chunks: list[ChunkEntry]

    @property
    def stored_bytes(self) -> int:
        return sum(c.stored for c in self.chunks)


_kept: collections.OrderedDict[tuple[str, int, int], list[ItemEntry]] = collections.OrderedDict()
_kept_bytes = 0
_kept_lock = threading.Lock()


_codecs: dict[str, Codec] = {}
_MAX_CODECS = 64


def _codec(config: Any) -> Codec:
    """The codec of ``config``, one per config for every index parsed: a codec keeps
    scratch per thread that decodes with it (zstd: a chunk and two rows), which one
    codec per kept index would hold per file read."""
    key = repr(config)  # distinguishes 1, 1.0 and true, as JSON does
    codec = _codecs.get(key)
    if codec is None:
        codec = get_codec(config)  # (raises for a config no codec takes: not kept)
        if len(_codecs) < _MAX_CODECS:
            codec = _codecs.setdefault(key, codec)  # (atomic: the first one made wins)
    return codec


def parsed_index(data: bytes, xxh3: str, limit: int) -> list[ItemEntry]:
    """The entries of index ``data`` (whose checksum ``xxh3`` the caller checked), its
    chunks ending before ``limit``. Raises what :func:`parse_index` raises."""
    global _kept_bytes
    key = (xxh3, len(data), limit)
    with _kept_lock:
        items = _kept.get(key)
        if items is not None:
            _kept.move_to_end(key)
            return list(items)  # (the entries are frozen; the list is the caller's)
    items = parse_index(data, limit)
    if len(data) <= _KEEP_BYTES:
        with _kept_lock:
            if key not in _kept:
                _kept[key] = items
                _kept_bytes += len(data)
            while _kept_bytes > _KEEP_BYTES:
                (_, size, _), _ = _kept.popitem(last=False)
                _kept_bytes -= size
    return list(items)


def parse_index(data: bytes, limit: int) -> list[ItemEntry]:
    body = json.loads(data)
    if not isinstance(body, dict) or body.get("format") != "ckptstore-shard":
        raise ValueError("not a ckptstore shard index")
    if body.get("version") != INDEX_FORMAT:
        raise IncompatibleCheckpointError(
            f"shard index version {body.get('version')!r} is not supported"
        )
    items = []
    extents = []
    for raw_item in body["items"]:
        key = raw_item["key"]
        if not isinstance(key, str):
            raise TypeError("item key must be a string")
        dname = raw_item["dtype"]
        dtype = None if dname is None else _dtypes()[dname]
        nbytes = _int(raw_item["nbytes"])
        codec_cfg = raw_item["codec"]
        codec = _codec(codec_cfg)
        chunks = []
        total = 0
        itemsize = ElementKind.of(dtype).itemsize
        for c in raw_item["chunks"]:
            offset, stored, raw, xxh3, layout = c
            offset, stored, raw = _int(offset), _int(stored), _int(raw)
            if offset + stored > limit:
                raise ValueError(f"chunk at {offset} (+{stored}) runs into the index")
            if raw > MAX_CHUNK_BYTES or stored > raw:
                # Streams are stored compressed only when smaller, else raw: never larger.
                raise ValueError(
                    f"chunk of {stored} B stored / {raw} B raw is not one ckptstore writes"
                )
            if (
                not is_digest(xxh3)
                or not isinstance(layout, list)
                or not all(isinstance(x, int) for x in layout)
            ):
                raise ValueError(f"bad chunk entry {c!r}")
            if raw % itemsize:
                raise ValueError(
                    f"chunk of {raw} B is not a whole number of {itemsize}-byte elements"
                )
            extents.append((offset, offset + stored))
            chunks.append(ChunkEntry(offset, stored, raw, xxh3, layout))
            total += raw
        if total != nbytes:
            raise ValueError(f"chunks of {key!r} add up to {total} B, not {nbytes} B")
        if dtype is None and nbytes > MAX_VALUE_BYTES:
            raise ValueError(f"value {key!r} of {nbytes} B is larger than any ckptstore writes")
        items.append(ItemEntry(key, dtype, nbytes, codec, chunks))
    extents.sort()
    for (_, end), (start, _) in itertools.pairwise(extents):
        if start < end:
            raise ValueError("chunks overlap")
    return items


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value
