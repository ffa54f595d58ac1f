"""Fuzzing the readers of untrusted bytes: only ckptstore's typed errors come out.

Hypothesis drives the manifest parser, the DCP metadata unpickler, the shard reader
(trailer, index, chunks) and the codecs with random and mutated inputs. Whatever the
input, a reader either returns or raises a :class:`~ckptstore.errors.CkptStoreError`
(never ``KeyError``, ``AttributeError``, ``RecursionError``, ``MemoryError``, a
segfault...), within a time limit per example, and allocates no more than a small
multiple of its input plus what the validated sizes allow.

Example counts: modest by default (the whole file runs in well under a minute); the
``slow`` marker (``--run-slow``) runs many more of each.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tracemalloc
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from damage import join_shard, manifest_checksum, replace_file, split_shard
from helpers import Randn, blank_like, build_state, zero_value
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ckptstore
from ckptstore.codecs import ElementKind, RawCodec, ZstdCodec
from ckptstore.dcp import metadata as md_format
from ckptstore.engine.ops import load_into
from ckptstore.errors import CkptStoreError
from ckptstore.format.checksum import digest
from ckptstore.format.manifest import Manifest
from ckptstore.format.shard import ShardReader
from ckptstore.storage import RangeReader, open_backend

MIB = 1 << 20
FAST = int(os.environ.get("CKPTSTORE_FUZZ_EXAMPLES", "150"))
SLOW = 2000


def budget(n: int = FAST, **kw: Any) -> Any:
    """Hypothesis settings: ``n`` examples, 2 s per example, no flaky-timing complaints."""
    return settings(
        max_examples=n,
        deadline=2000,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=n == FAST,  # the default run is reproducible; the slow one explores
        **kw,
    )


# ---- a real checkpoint to mutate ------------------------------------------------------


def _state() -> dict[str, Any]:
    return build_state(
        0,
        f32=Randn(3000),
        bf16=Randn(700, torch.bfloat16),
        i64=torch.arange(50),
        empty=torch.empty(0),
        value={"a": [1, 2.5, "x"]},
    )


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict[str, bytes]:
    """The files of one small zstd checkpoint (several chunks, every stream kind)."""
    root = str(tmp_path_factory.mktemp("fuzz") / "ckpts")
    with ckptstore.Checkpointer(root, codec="zstd", chunk_bytes=4096) as ckpt:
        ckpt.save(_state(), 1, metadata={"note": "fuzz"})
    d = os.path.join(root, "step_00000001")
    out = {}
    for name in ("manifest.json", ".metadata", "__0_0.distcp"):
        with open(os.path.join(d, name), "rb") as f:
            out[name] = f.read()
    return out


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    """A few random edits: flips, overwrites, cuts, insertions, duplications."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate", "dup"]))
        pos = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del buf[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "truncate":
            del buf[pos:]
        elif op == "dup":
            buf[pos:pos] = buf[pos : pos + draw(st.integers(1, 256))]
    return bytes(buf)


def only_typed_errors(fn: Any, *args: Any, max_alloc: int = 64 * MIB) -> Any:
    """Run ``fn``; any exception must be a CkptStoreError; allocation stays bounded
    (everything Python and numpy allocate, as tracemalloc sees it)."""
    tracemalloc.start()
    try:
        return fn(*args)
    except CkptStoreError:
        return None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < max_alloc, f"{fn.__name__} allocated {peak} B"


def only_typed_errors_rss(fn: Any, *args: Any, max_growth: int = 64 * MIB) -> Any:
    """As :func:`only_typed_errors`, bounding the memory really touched (RSS) instead.

    For the unpickler: CPython's C unpickler reserves a counted ``BINBYTES`` object of
    the size the opcode declares (up to 2 GiB from 5 bytes) before it finds the data
    short. The reservation is never touched, so it costs address space, not memory,
    and fails with a typed error; tracemalloc counts it all the same.
    """
    proc = psutil.Process()
    before = proc.memory_info().rss
    try:
        return fn(*args)
    except CkptStoreError:
        return None
    finally:
        growth = proc.memory_info().rss - before
        assert growth < max_growth, f"{fn.__name__} grew RSS by {growth} B"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


# ---- manifest ---------------------------------------------------------------------------


def _parse_manifest(data: bytes, key: bytes | None = None) -> Manifest:
    return Manifest.from_json(data, "fuzz", key=key)


def _resign(body: dict[str, Any]) -> bytes:
    body = dict(body)
    body.pop("checksum", None)
    with contextlib.suppress(ValueError):  # NaN cannot be canonical: leave it unsigned
        body["checksum"] = manifest_checksum(body)
    return json.dumps(body).encode()


@budget()
@given(data=st.binary(max_size=2048))
def test_manifest_random_bytes(data):
    only_typed_errors(_parse_manifest, data)


@budget()
@given(draw=st.data())
def test_manifest_mutated_bytes(sample, draw):
    only_typed_errors(_parse_manifest, mutate(sample["manifest.json"], draw.draw))


@budget()
@given(draw=st.data(), key=st.sampled_from([None, b"k"]))
def test_manifest_mutated_fields_with_a_valid_checksum(sample, draw, key):
    """Past the checksum: every field replaced by any JSON value, checksum fixed up."""
    body = json.loads(sample["manifest.json"])
    path = draw.draw(st.sampled_from(_paths(body)))
    _set(body, path, draw.draw(json_values))
    only_typed_errors(_parse_manifest, _resign(body), key)


@budget()
@given(body=st.dictionaries(st.text(max_size=12), json_values, max_size=8))
def test_manifest_random_objects(body):
    body.setdefault("format", "ckptstore")
    body.setdefault("format_version", 1)
    only_typed_errors(_parse_manifest, _resign(body))


def test_manifest_deep_nesting_and_huge_numbers():
    for data in (
        b"[" * 100_000 + b"]" * 100_000,
        b'{"format": "ckptstore", "format_version": 1, "x": '
        + b"[" * 50_000
        + b"]" * 50_000
        + b"}",
        b'{"format": "ckptstore", "format_version": ' + b"9" * 10_000 + b"}",
        b'{"format": "ckptstore", "format_version": 1, "x": NaN}',
        b'{"format": "ckptstore", "format_version": 1e999}',
        b'{"format": "ckptstore", "format_version": 1, "hmac": "\\ud800"}',
    ):
        only_typed_errors(_parse_manifest, data)
        only_typed_errors(_parse_manifest, data, b"k")


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


# ---- DCP metadata --------------------------------------------------------------------------


def _unpickle(data: bytes) -> Any:
    return md_format.loads(data, "fuzz/.metadata")


@budget()
@given(data=st.binary(max_size=4096))
def test_metadata_random_bytes(data):
    only_typed_errors_rss(_unpickle, data)


@pytest.mark.parametrize("index", [0x47E57000, 0x7FFFFFFF, 0xFFFFFFFF])
def test_a_memo_index_far_past_the_file_costs_nothing_unchecked(sample, index):
    """Found by the stress run: 5 bytes (LONG_BINPUT of a huge index) made the C
    unpickler zero an array of ~19 GB for ~40 s. Bytes no manifest vouches for (a
    plain DCP directory) go through the pure-Python unpickler, whose memo is a dict."""
    import pickletools
    import time

    data = sample[".metadata"]
    starts = [pos for _, _, pos in pickletools.genops(data)]  # where an opcode begins
    for at in (starts[1], starts[len(starts) // 2], starts[-1]):  # the last: STOP
        bad = data[:at] + b"r" + index.to_bytes(4, "little") + data[at:]
        start = time.perf_counter()
        only_typed_errors_rss(_unpickle, bad, max_growth=16 * MIB)
        assert time.perf_counter() - start < 1.0


@budget()
@given(draw=st.data())
def test_metadata_mutated_pickle(sample, draw):
    only_typed_errors_rss(_unpickle, mutate(sample[".metadata"], draw.draw))


@budget()
@given(
    ops=st.lists(
        st.sampled_from(
            [
                b"(",  # MARK
                b")",  # EMPTY_TUPLE
                b"]",  # EMPTY_LIST
                b"}",  # EMPTY_DICT
                b"N",  # NONE
                b"K\x05",  # BININT1
                b"J\xff\xff\xff\x7f",  # BININT
                b"\x8c\x05torch\x8c\x04Size\x93",  # STACK_GLOBAL torch.Size
                b"\x8c\x05torch\x8c\x07float32\x93",
                b"\x8c%torch.distributed.checkpoint.metadata\x8c\x08Metadata\x93",
                b"\x8c\x08builtins\x8c\x04eval\x93",
                b"\x8c\x02os\x8c\x06system\x93",
                b"R",  # REDUCE
                b"b",  # BUILD
                b"\x81",  # NEWOBJ
                b"t",  # TUPLE
                b"s",  # SETITEM
                b"a",  # APPEND
                b"e",  # APPENDS
                b"0",  # POP
                b"2",  # DUP
                b"\x94",  # MEMOIZE
                b"h\x00",  # BINGET 0
                b"B\xff\xff\xff\x7f",  # BINBYTES of 2 GiB (not there)
                b"\x8e\xff\xff\xff\xff\xff\xff\xff\x7f",  # BINBYTES8 of 2**63 B
            ]
        ),
        max_size=30,
    )
)
def test_metadata_crafted_opcode_sequences(ops):
    data = b"\x80\x04" + b"".join(ops) + b"."
    only_typed_errors_rss(_unpickle, data)


# ---- shard files -----------------------------------------------------------------------------


class BytesReader(RangeReader):
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ckptstore.StorageError(f"read of {length} B at {offset} past the end")
        return memoryview(self._data)[offset : offset + length]


def _read_everything(data: bytes, index_xxh3: str | None = None) -> None:
    """Open a shard as the loader does (size and index checksum from a manifest that
    matches it), verify it, and read every item into a buffer of its stated size."""
    if index_xxh3 is None:
        index_xxh3 = digest(split_shard(data)[1]) if len(data) >= 16 else "0" * 16
    reader = ShardReader(
        BytesReader(data), "fuzz/__0_0.distcp", size_bytes=len(data), index_xxh3=index_xxh3
    )
    reader.verify(None)
    for i, item in enumerate(reader.items):
        reader.read_item(i, np.empty(item.nbytes, dtype=np.uint8), None)


def _read_shard(data: bytes) -> None:
    try:
        index_xxh3 = digest(split_shard(data)[1])
    except (struct.error, ValueError):
        index_xxh3 = "0" * 16
    _read_everything(data, index_xxh3)


@budget()
@given(draw=st.data())
def test_shard_mutated_anywhere_with_matching_manifest(sample, draw):
    """Bytes mutated anywhere (data, index, trailer); the manifest's size and index
    checksum describe the mutated file, as an attacker's rewritten manifest would."""
    data = mutate(sample["__0_0.distcp"], draw.draw)
    only_typed_errors(_read_shard, data)


@budget()
@given(draw=st.data())
def test_shard_index_fields_replaced(sample, draw):
    """Every field of the index replaced by any JSON value; sums fixed up."""
    body, index = split_shard(sample["__0_0.distcp"])
    parsed = json.loads(index)
    path = draw.draw(st.sampled_from(_paths(parsed)))
    _set(parsed, path, draw.draw(json_values | st.integers(-(2**64), 2**64)))
    only_typed_errors(_read_everything, join_shard(body, json.dumps(parsed).encode()))


@budget()
@given(index=json_values, body=st.binary(max_size=256))
def test_shard_random_index(index, body):
    try:
        raw = json.dumps(index).encode()
    except ValueError:
        return
    only_typed_errors(_read_everything, join_shard(body, raw))


@budget()
@given(draw=st.data())
def test_shard_chunk_bytes_replaced_with_checksums_fixed(sample, draw):
    """A chunk's stored bytes and layout replaced by anything, every checksum fixed up:
    the codec itself must refuse what does not decode to the stated size."""
    body, index = split_shard(sample["__0_0.distcp"])
    parsed = json.loads(index)
    chunks = [c for item in parsed["items"] for c in item["chunks"]]
    assume(chunks)
    chunk = draw.draw(st.sampled_from(chunks))
    new = draw.draw(
        st.binary(min_size=0, max_size=chunk[2])
        | st.builds(lambda b: _zstd(b), st.binary(max_size=chunk[2] + 64))
    )
    chunk[0], chunk[1], chunk[3] = len(body), len(new), digest(new)
    chunk[4] = draw.draw(st.just(chunk[4]) | st.lists(st.integers(-(2**40), 2**40), max_size=9))
    assume(len(new) <= chunk[2])
    only_typed_errors(_read_everything, join_shard(body + new, json.dumps(parsed).encode()))


def _zstd(b: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(b)


# ---- the DCP reader: metadata that unpickles fine but lies -------------------------------


@pytest.fixture(scope="module")
def loadable(tmp_path_factory) -> tuple[Any, bytes]:
    """A checkpoint on disk to rewrite, and its original DCP metadata bytes."""
    root = str(tmp_path_factory.mktemp("fuzz-load") / "ckpts")
    with ckptstore.Checkpointer(root, codec="zstd", chunk_bytes=4096) as ckpt:
        ckpt.save(_state(), 1)
    backend = open_backend(root)
    return backend, backend.read_bytes("step_00000001/.metadata")


def _lie(backend: Any, metadata: Any) -> None:
    ckpt_dir = os.path.join(backend.root, "step_00000001")
    replace_file(ckpt_dir, ".metadata", md_format.dumps(metadata))


def _load(backend: Any) -> None:
    target = blank_like(_state(), zero_value)
    load_into(target, backend, "step_00000001", pool=None, group=None)


size_values = st.integers(-3, 70) | st.sampled_from([2**20, 2**31, 2**62, -(2**40)])


@budget()
@given(draw=st.data())
def test_dcp_reader_with_lying_metadata(loadable, draw):
    """Storage entries, chunk offsets and sizes, tensor sizes and dtypes replaced by
    anything: the load raises a typed error (or succeeds) and allocates nothing big."""
    backend, original = loadable
    metadata = md_format.loads(original, "fuzz")
    what = draw.draw(st.sampled_from(["storage", "chunk", "size", "dtype", "drop"]))
    fqn = draw.draw(st.sampled_from(sorted(metadata.state_dict_metadata)))
    md = metadata.state_dict_metadata[fqn]
    if what == "storage":
        index = draw.draw(st.sampled_from(list(metadata.storage_data)))
        metadata.storage_data[index] = draw.draw(
            st.fixed_dictionaries(
                {"file": json_values | st.just("__0_0.distcp"), "item": json_values | size_values}
            )
            | json_values
        )
    elif what == "drop":
        metadata.storage_data.pop(draw.draw(st.sampled_from(list(metadata.storage_data))))
    elif hasattr(md, "chunks") and md.chunks:
        rank = len(md.size)
        dims = st.lists(size_values, min_size=rank, max_size=rank).map(torch.Size)
        if what == "chunk":
            chunk = draw.draw(st.sampled_from(md.chunks))
            object.__setattr__(
                chunk, draw.draw(st.sampled_from(["offsets", "sizes"])), draw.draw(dims)
            )
        elif what == "size":
            md.size = draw.draw(dims)
        else:
            md.properties.dtype = draw.draw(
                st.sampled_from([torch.float64, torch.int8, torch.bool, torch.bfloat16])
            )
    _lie(backend, metadata)
    try:
        only_typed_errors_rss(_load, backend)
    finally:
        _lie(backend, md_format.loads(original, "fuzz"))


def test_dcp_reader_refuses_a_huge_chunk_before_allocating_it(loadable):
    """A stored chunk that claims 4 TiB: refused as corrupt, not a torch allocation error."""
    backend, original = loadable
    metadata = md_format.loads(original, "fuzz")
    chunk = metadata.state_dict_metadata["f32"].chunks[0]
    object.__setattr__(chunk, "sizes", torch.Size([2**40]))
    _lie(backend, metadata)
    try:
        with pytest.raises(ckptstore.CorruptCheckpointError, match="f32"):
            _load(backend)
    finally:
        _lie(backend, md_format.loads(original, "fuzz"))


# ---- codecs directly -----------------------------------------------------------------------


@budget()
@given(
    stored=st.binary(max_size=512),
    layout=st.lists(st.integers(-(2**40), 2**40), max_size=9),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    float_kind=st.sampled_from([None, "bf16", "fp16", "fp32", "fp64"]),
    n_elems=st.integers(0, 64),
    codec=st.sampled_from([ZstdCodec(), ZstdCodec(byte_group=False), RawCodec()]),
)
def test_codec_decode_of_anything(stored, layout, itemsize, float_kind, n_elems, codec):
    width = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}.get(float_kind or "", itemsize)
    out = np.empty(n_elems * width, dtype=np.uint8)
    only_typed_errors(
        codec.decode_into, memoryview(stored), layout, ElementKind(width, float_kind), out
    )


# ---- stress --------------------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=SLOW, deadline=2000, suppress_health_check=list(HealthCheck))
@given(draw=st.data())
def test_stress_all_readers(sample, draw):
    which = draw.draw(st.sampled_from(["manifest", "metadata", "shard"]))
    if which == "manifest":
        only_typed_errors(_parse_manifest, mutate(sample["manifest.json"], draw.draw))
    elif which == "metadata":
        only_typed_errors_rss(_unpickle, mutate(sample[".metadata"], draw.draw))
    else:
        only_typed_errors(_read_shard, mutate(sample["__0_0.distcp"], draw.draw))


@pytest.mark.slow
@settings(max_examples=SLOW, deadline=2000, suppress_health_check=list(HealthCheck))
@given(draw=st.data())
def test_stress_index_fields(sample, draw):
    body, index = split_shard(sample["__0_0.distcp"])
    parsed = json.loads(index)
    for _ in range(draw.draw(st.integers(1, 3))):
        paths = _paths(parsed)
        if not paths:
            break
        _set(parsed, draw.draw(st.sampled_from(paths)), draw.draw(json_values))
    only_typed_errors(_read_everything, join_shard(body, json.dumps(parsed).encode()))


def test_a_sample_is_intact(sample):
    """The mutations above start from a checkpoint that reads cleanly."""
    assert _parse_manifest(sample["manifest.json"]).step == 1
    assert _unpickle(sample[".metadata"]) is not None
    _read_shard(sample["__0_0.distcp"])
    # A pickle: protocol 3 when a checkpointer wrote it (MetadataCache), else 5
    assert io.BytesIO(sample[".metadata"]).read(2) in (b"\x80\x03", b"\x80\x05")
