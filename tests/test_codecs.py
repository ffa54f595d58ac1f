"""Chunk codecs: bit-exact round trips, compression, layout, hostile input, threads.

Everything here talks to the codecs directly (``ckptstore.codecs``), the way the shard
writer and reader do: raw chunk bytes in, ``EncodedChunk`` out, ``decode_into`` back.
Encoded parts may point into a buffer the codec lends out, so every helper copies the
parts to ``bytes`` *before* calling ``release()``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptstore.codecs import Codec, ElementKind, EncodedChunk, RawCodec, ZstdCodec, get_codec
from ckptstore.errors import CorruptCheckpointError

# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

DTYPES: dict[str, torch.dtype] = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "c64": torch.complex64,
    "c128": torch.complex128,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "bool": torch.bool,
    "f8e4m3": torch.float8_e4m3fn,
}
FLOAT_DTYPES = {
    "f64",
    "f32",
    "f16",
    "bf16",
    "c64",
    "c128",
    "f8e4m3",
}

CODEC_SPECS: dict[str, Any] = {
    "none": "none",
    "zstd-1": {"id": "zstd", "level": -1},
    "zstd1": {"id": "zstd", "level": 1},
    "zstd3": {"id": "zstd", "level": 3},
    "zstd9": {"id": "zstd", "level": 9},
    "zstd1-nogroup": {"id": "zstd", "level": 1, "byte_group": False},
}
ZSTD_LEVELS = [-1, 1, 3, 9]

# Shared codec objects (as in the writer: one codec, many chunks); built lazily.
_CODECS: dict[str, Codec] = {}


def codec_for(name: str) -> Codec:
    if name not in _CODECS:
        _CODECS[name] = get_codec(CODEC_SPECS[name])
    return _CODECS[name]


def raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of ``t`` as a 1-D contiguous uint8 array (what the shard writer gets)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def encode_copy(codec: Codec, raw: np.ndarray, kind: ElementKind) -> tuple[bytes, list[int]]:
    """Encode, copy the parts out, then release: the writer's discipline."""
    enc = codec.encode(raw, kind)
    assert isinstance(enc, EncodedChunk)
    stored = b"".join(bytes(memoryview(p).cast("B")) for p in enc.parts)
    assert len(stored) == enc.stored_bytes
    layout = list(enc.layout)
    if enc.release is not None:
        enc.release()
    return stored, layout


def decode(codec: Codec, stored: bytes, layout: list[int], kind: ElementKind, n: int) -> bytes:
    """Decode from a slice of a bigger buffer into a slice of a bigger array.

    Guard bytes on both sides catch a codec that reads or writes past its chunk, and the
    odd offsets exercise unaligned 16/32/64-bit views.
    """
    buf = bytearray(b"\xaa" + stored + b"\xbb")
    view = memoryview(buf)[1 : 1 + len(stored)]
    big = np.full(n + 2, 0x5A, dtype=np.uint8)
    out = big[1 : 1 + n]
    codec.decode_into(view, layout, kind, out)
    assert big[0] == 0x5A and big[-1] == 0x5A, "decode wrote outside its output"
    assert buf[0] == 0xAA
    assert buf[-1] == 0xBB
    return out.tobytes()


def try_decode(codec: Codec, stored: bytes, layout: list[int], kind: ElementKind, n: int) -> None:
    """Decode hostile input: it must either work or raise CorruptCheckpointError."""
    out = np.zeros(n, dtype=np.uint8)
    codec.decode_into(memoryview(stored), layout, kind, out)


def roundtrip(codec: Codec, raw: np.ndarray, kind: ElementKind) -> tuple[bytes, list[int]]:
    before = raw.tobytes()
    stored, layout = encode_copy(codec, raw, kind)
    assert raw.tobytes() == before, "encode modified its input"
    got = decode(codec, stored, layout, kind, raw.nbytes)
    assert got == before, "round trip is not bit-exact"
    check_layout_invariants(codec, kind, raw.nbytes, stored, layout)
    return stored, layout


def expected_streams(codec: Codec, kind: ElementKind, nbytes: int) -> int:
    if isinstance(codec, RawCodec):
        return 0
    assert isinstance(codec, ZstdCodec)
    w = kind.itemsize if codec.byte_group else 1
    return w if w > 1 and nbytes % w == 0 else 1


def check_layout_invariants(
    codec: Codec, kind: ElementKind, nbytes: int, stored: bytes, layout: list[int]
) -> None:
    if isinstance(codec, RawCodec):
        assert layout == []
        assert len(stored) == nbytes
        return
    w = expected_streams(codec, kind, nbytes)
    assert len(layout) == w
    assert all(isinstance(s, int) for s in layout)
    assert sum(abs(s) for s in layout) == len(stored)
    row = nbytes // w
    for s in layout:
        if s <= 0:  # raw; an empty stream is stored as -0 == 0
            assert -s == row, "a raw stream holds exactly one row"
        else:
            # Compressed streams are kept only when they save at least 2 %.
            assert s < row * 0.98


def special_floats(dtype: torch.dtype) -> torch.Tensor:
    """NaN (both signs), +-inf, +-0, subnormals, extremes, in ``dtype``."""
    real = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
    fi = torch.finfo(real)
    nan = float("nan")
    vals = [
        nan,
        -nan,
        float("inf"),
        float("-inf"),
        0.0,
        -0.0,
        fi.tiny,  # smallest normal
        fi.tiny / 2,  # subnormal
        fi.tiny / 4,
        -fi.tiny / 8,
        fi.tiny * fi.eps,  # smallest subnormal (roughly)
        fi.max,
        -fi.max,
        fi.eps,
        1.0,
        -1.5,
    ]
    t = torch.tensor(vals, dtype=torch.float64)
    if dtype.is_complex:
        r = t.to(real)
        return torch.complex(r, r.flip(0)).to(dtype)
    t = t.to(dtype)
    # A NaN with a payload and the sign bit set, written as bits.
    if real.itemsize in (2, 4, 8):
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[real.itemsize]
        bits = t.view(ints).clone()
        bits[0] = -1  # all ones: negative quiet NaN with full payload
        t = bits.view(dtype)
    return t


@functools.cache
def make_data(dname: str, count: int, data: str) -> bytes:
    """``count`` elements of ``DTYPES[dname]`` filled per ``data``; cached as bytes."""
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(zlib.crc32(f"{dname}/{count}/{data}".encode()))
    if data == "zeros":
        t = torch.zeros(count, dtype=dtype)
    elif data == "const":
        value: Any = True if dtype == torch.bool else (0.1 if dname in FLOAT_DTYPES else 7)
        if dtype.is_complex:
            value = complex(0.1, -3.0)
        t = torch.full((count,), value, dtype=dtype)
    elif data == "normal":
        if dtype.is_complex:
            t = torch.randn(count, generator=g, dtype=dtype)
        elif dname in FLOAT_DTYPES:
            t = torch.randn(count, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.rand(count, generator=g) > 0.5
        else:
            info = torch.iinfo(dtype)
            t = torch.randint(info.min, info.max, (count,), generator=g, dtype=torch.int64)
            t = t.to(dtype)
    elif data == "special":
        sp = special_floats(dtype)
        reps = -(-count // sp.numel())
        t = sp.repeat(reps)[:count]
        # Mix in normal values and completely random bit patterns.
        if count > sp.numel():
            rnd = torch.randint(0, 256, (count * t.element_size(),), generator=g, dtype=torch.uint8)
            t = t.clone()
            t[count // 2 :] = rnd.view(dtype)[count // 2 :]
    else:  # pragma: no cover
        raise AssertionError(data)
    assert t.numel() == count
    return raw_bytes(t).tobytes()


def elem_size(dname: str) -> int:
    return torch.empty((), dtype=DTYPES[dname]).element_size()


SIZES = {
    "1": lambda es: 1,
    "3": lambda es: 3,
    "1001": lambda es: 1001,
    "4KiB": lambda es: 4096 // es,
    "1MiB+": lambda es: (1 << 20) // es + 3,
}

ROUNDTRIP_CASES = []
for _dname in DTYPES:
    _kinds = ["normal", "zeros", "const"] + (["special"] if _dname in FLOAT_DTYPES else [])
    for _size in SIZES:
        for _data in _kinds:
            ROUNDTRIP_CASES.append(
                pytest.param(_dname, _size, _data, id=f"{_dname}-{_size}-{_data}")
            )


# ---------------------------------------------------------------------------------------
# 1. Bit-exact round trips
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec_name", list(CODEC_SPECS))
@pytest.mark.parametrize(("dname", "size", "data"), ROUNDTRIP_CASES)
def test_roundtrip_bit_exact(codec_name, dname, size, data):
    codec = codec_for(codec_name)
    count = SIZES[size](elem_size(dname))
    raw = np.frombuffer(make_data(dname, count, data), dtype=np.uint8)
    kind = ElementKind.of(DTYPES[dname])
    stored, _ = roundtrip(codec, raw, kind)
    if data == "zeros" and size == "1MiB+" and codec_name != "none":
        assert len(stored) < raw.nbytes // 100


@pytest.mark.parametrize("codec_name", list(CODEC_SPECS))
@pytest.mark.parametrize("dname", list(DTYPES))
def test_roundtrip_unaligned_input(codec_name, dname):
    """The writer hands out slices of a staging buffer; they need not be word-aligned."""
    codec = codec_for(codec_name)
    data = make_data(dname, 777, "normal")
    big = np.zeros(len(data) + 3, dtype=np.uint8)
    raw = big[1 : 1 + len(data)]
    raw[:] = np.frombuffer(data, dtype=np.uint8)
    assert raw.ctypes.data % 2 == 1
    roundtrip(codec, raw, ElementKind.of(DTYPES[dname]))


@pytest.mark.parametrize("codec_name", list(CODEC_SPECS))
def test_roundtrip_opaque_bytes(codec_name):
    """``dtype=None`` (pickled values) is plain bytes: one stream."""
    codec = codec_for(codec_name)
    kind = ElementKind.of(None)
    for payload in [b"x", b"hello world" * 97, os.urandom(5000)]:
        _, layout = roundtrip(codec, np.frombuffer(payload, dtype=np.uint8), kind)
        assert len(layout) == (0 if codec_name == "none" else 1)


@pytest.mark.parametrize("level", ZSTD_LEVELS)
@pytest.mark.parametrize("dname", ["f32", "bf16", "f64", "i16"])
def test_partial_element_falls_back_to_one_stream(level, dname):
    """A byte count that is not a whole number of elements is stored as one stream."""
    codec = ZstdCodec(level=level)
    kind = ElementKind.of(DTYPES[dname])
    data = make_data(dname, 100, "normal")[: 100 * elem_size(dname) - 1]
    _, layout = roundtrip(codec, np.frombuffer(data, dtype=np.uint8), kind)
    assert len(layout) == 1


@pytest.mark.parametrize("level", ZSTD_LEVELS)
def test_roundtrip_realistic_float_data_every_level(level):
    """Trained-like weights, where the grouped streams really get compressed."""
    codec = ZstdCodec(level=level)
    g = torch.Generator().manual_seed(level + 10)
    w = torch.randn(1 << 16, generator=g) * 0.02
    for t in [w, w.bfloat16(), w.half(), w.double(), torch.complex(w, w * 3)]:
        _, layout = roundtrip(codec, raw_bytes(t), ElementKind.of(t.dtype))
        assert any(s > 0 for s in layout), f"{t.dtype}: nothing compressed ({layout})"


# ---------------------------------------------------------------------------------------
# ElementKind
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "itemsize", "float_kind"),
    [
        (None, 1, None),
        (torch.float64, 8, "fp64"),
        (torch.float32, 4, "fp32"),
        (torch.float16, 2, "fp16"),
        (torch.bfloat16, 2, "bf16"),
        (torch.complex64, 4, "fp32"),
        (torch.complex128, 8, "fp64"),
        (torch.int64, 8, None),
        (torch.int32, 4, None),
        (torch.int16, 2, None),
        (torch.int8, 1, None),
        (torch.uint8, 1, None),
        (torch.bool, 1, None),
        (torch.float8_e4m3fn, 1, None),
        (torch.float8_e5m2, 1, None),
    ],
)
def test_element_kind(dtype, itemsize, float_kind):
    kind = ElementKind.of(dtype)
    assert kind == ElementKind(itemsize, float_kind)
    assert kind.itemsize == itemsize
    assert kind.float_kind == float_kind


def test_element_kind_complex32_value():
    # ElementKind.of must not allocate a complex32 tensor to learn its size: torch warns
    # that ComplexHalf is experimental, and warnings are errors in this suite.
    kind = ElementKind.of(torch.complex32)
    assert kind == ElementKind(2, "fp16")


def test_element_kind_is_frozen_and_hashable():
    kind = ElementKind.of(torch.float32)
    with pytest.raises(AttributeError):
        kind.itemsize = 2  # type: ignore[misc]
    assert {kind, ElementKind.of(torch.complex64)} == {kind}


# ---------------------------------------------------------------------------------------
# 2. Compression actually happens where it should, and not where it cannot
# ---------------------------------------------------------------------------------------


def _ratio(codec: Codec, t: torch.Tensor) -> tuple[float, list[int]]:
    raw = raw_bytes(t)
    stored, layout = roundtrip(codec, raw, ElementKind.of(t.dtype))
    return len(stored) / raw.nbytes, layout


@pytest.mark.parametrize("level", ZSTD_LEVELS)
def test_zstd_compresses_trained_like_floats(level):
    codec = ZstdCodec(level=level)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1 << 18, generator=g) * 0.02
    r32, layout32 = _ratio(codec, w)
    assert r32 < 0.9, f"fp32 ratio {r32:.3f}"
    # The exponent stream (top byte after alignment) is the one that shrinks.
    assert layout32[3] > 0
    rbf, layoutbf = _ratio(codec, w.bfloat16())
    assert rbf < 0.75, f"bf16 ratio {rbf:.3f}"
    assert layoutbf[1] > 0
    r64, _ = _ratio(codec, w.double())
    assert r64 < 0.95, f"fp64 ratio {r64:.3f}"


def test_byte_grouping_beats_plain_zstd_on_floats():
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(1 << 18, generator=g) * 0.02).bfloat16()
    grouped, _ = _ratio(ZstdCodec(level=1), w)
    plain, _ = _ratio(ZstdCodec(level=1, byte_group=False), w)
    assert grouped < plain


@pytest.mark.parametrize("level", ZSTD_LEVELS)
@pytest.mark.parametrize("dname", ["f32", "bf16", "f64", "i8", "u8", "c64"])
def test_zstd_stores_random_bytes_raw(level, dname):
    codec = ZstdCodec(level=level)
    rng = np.random.default_rng(level + 100)
    raw = rng.integers(0, 256, size=1 << 18, dtype=np.uint8)
    kind = ElementKind.of(DTYPES[dname])
    stored, layout = roundtrip(codec, raw, kind)
    assert all(s < 0 for s in layout), layout
    assert len(stored) == raw.nbytes  # ratio exactly 1.0: no frame overhead either


@pytest.mark.parametrize("level", ZSTD_LEVELS)
@pytest.mark.parametrize("dname", ["f32", "bf16", "f64", "i64", "i8", "bool", "c128"])
def test_zstd_zeros_compress_to_tiny(level, dname):
    codec = ZstdCodec(level=level)
    t = torch.zeros((1 << 20) // elem_size(dname), dtype=DTYPES[dname])
    stored, layout = roundtrip(codec, raw_bytes(t), ElementKind.of(t.dtype))
    assert all(s > 0 for s in layout)
    assert len(stored) < 2048, f"{len(stored)} B for 1 MiB of zeros"


def test_raw_codec_stores_bytes_as_they_are():
    codec = RawCodec()
    raw = np.frombuffer(os.urandom(1000), dtype=np.uint8)
    enc = codec.encode(raw, ElementKind.of(torch.float32))
    assert enc.layout == []
    assert enc.stored_bytes == 1000
    assert b"".join(bytes(memoryview(p).cast("B")) for p in enc.parts) == raw.tobytes()
    if enc.release is not None:
        enc.release()


# ---------------------------------------------------------------------------------------
# 3. Byte-grouping layout
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dname", "streams"),
    [
        ("f64", 8),
        ("f32", 4),
        ("f16", 2),
        ("bf16", 2),
        ("c64", 4),
        ("c128", 8),
        ("i64", 8),
        ("i32", 4),
        ("i16", 2),
        ("i8", 1),
        ("u8", 1),
        ("bool", 1),
        ("f8e4m3", 1),
    ],
)
@pytest.mark.parametrize("data", ["normal", "zeros"])
def test_layout_has_one_stream_per_byte(dname, streams, data):
    kind = ElementKind.of(DTYPES[dname])
    raw = np.frombuffer(make_data(dname, 4096 // elem_size(dname), data), dtype=np.uint8)
    _, grouped = roundtrip(ZstdCodec(level=1, byte_group=True), raw, kind)
    assert len(grouped) == streams
    _, plain = roundtrip(ZstdCodec(level=1, byte_group=False), raw, kind)
    assert len(plain) == 1
    _, none = roundtrip(RawCodec(), raw, kind)
    assert none == []


def test_grouped_streams_are_byte_planes():
    """For an int32 chunk (no exponent alignment), stream i is byte i of every element."""
    codec = ZstdCodec(level=1)
    # Bytes 0 and 1 random (stored raw), bytes 2 and 3 constant (compressed).
    rng = np.random.default_rng(7)
    words = rng.integers(0, 1 << 16, size=4096, dtype=np.uint32) | np.uint32(0x12340000)
    raw = words.view(np.uint8)
    stored, layout = roundtrip(codec, raw, ElementKind.of(torch.int32))
    assert layout[0] == -4096
    assert layout[1] == -4096
    assert layout[2] > 0
    assert layout[3] > 0
    assert stored[:4096] == raw[0::4].tobytes()
    assert stored[4096:8192] == raw[1::4].tobytes()
    d = zstandard.ZstdDecompressor()
    assert d.decompress(stored[8192 : 8192 + layout[2]]) == b"\x34" * 4096
    assert d.decompress(stored[8192 + layout[2] :]) == b"\x12" * 4096


def test_exponent_alignment_puts_whole_exponent_in_one_stream():
    """fp32: the top stream holds the 8 exponent bits, the next one sign + 7 mantissa bits."""
    codec = ZstdCodec(level=1)
    vals = torch.tensor([1.0, -1.0, 2.0, -0.5, 3.0e-39, float("inf")] * 1000)
    raw = raw_bytes(vals)
    stored, layout = roundtrip(codec, raw, ElementKind.of(torch.float32))
    n = vals.numel()
    d = zstandard.ZstdDecompressor()
    pos = 0
    streams = []
    for s in layout:
        part = stored[pos : pos + abs(s)]
        pos += abs(s)
        streams.append(part if s < 0 else d.decompress(part))
    assert all(len(s) == n for s in streams)
    bits = vals.view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF
    exponent = ((bits >> 23) & 0xFF).astype(np.uint8)
    sign_mant = (((bits >> 31) << 7) | ((bits >> 16) & 0x7F)).astype(np.uint8)
    assert streams[3] == exponent.tobytes()
    assert streams[2] == sign_mant.tobytes()


# ---------------------------------------------------------------------------------------
# 4. Hostile and damaged input
# ---------------------------------------------------------------------------------------

HOSTILE_KINDS = ["f32", "bf16", "f16", "f64", "i32", "i8"]


def _valid_chunk(dname: str, data: str = "normal", count: int = 512):
    kind = ElementKind.of(DTYPES[dname])
    raw = make_data(dname, count, data)
    codec = ZstdCodec(level=1)
    stored, layout = encode_copy(codec, np.frombuffer(raw, dtype=np.uint8), kind)
    return codec, kind, raw, stored, layout


def _streams(stored: bytes, layout: list[int]) -> list[bytes]:
    out, pos = [], 0
    for s in layout:
        out.append(stored[pos : pos + abs(s)])
        pos += abs(s)
    return out


def _assemble(parts: list[tuple[int, bytes]]) -> tuple[bytes, list[int]]:
    """``(sign, bytes)`` pairs -> stored bytes + layout (sign < 0: raw stream)."""
    return b"".join(p for _, p in parts), [len(p) if s > 0 else -len(p) for s, p in parts]


def _raises_corrupt(codec, stored, layout, kind, n, match=None):
    with pytest.raises(CorruptCheckpointError, match=match):
        try_decode(codec, stored, layout, kind, n)


def _huge_declared_frame(size: int) -> bytes:
    """A tiny zstd frame that declares ``size`` bytes of content (one RLE block)."""
    header = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", size)
    block = (1 | (1 << 1) | (16 << 3)).to_bytes(3, "little") + b"\0"  # last, RLE, 16 B
    return header + block


def test_huge_declared_frame_is_what_it_claims():
    frame = _huge_declared_frame(1 << 50)
    assert zstandard.frame_content_size(frame) == 1 << 50


@pytest.mark.parametrize("dname", HOSTILE_KINDS)
def test_valid_chunk_decodes(dname):
    codec, kind, raw, stored, layout = _valid_chunk(dname)
    assert decode(codec, stored, layout, kind, len(raw)) == raw


@pytest.mark.parametrize("dname", HOSTILE_KINDS)
@pytest.mark.parametrize("change", ["one_more", "one_less", "empty", "doubled"])
def test_wrong_number_of_streams(dname, change):
    codec, kind, raw, stored, layout = _valid_chunk(dname)
    bad = {
        "one_more": [*layout, 0],
        "one_less": layout[:-1],
        "empty": [],
        "doubled": layout + layout,
    }[change]
    if change == "one_less" and len(layout) == 1:
        bad = []
    _raises_corrupt(codec, stored, bad, kind, len(raw), match="streams")


@pytest.mark.parametrize("dname", HOSTILE_KINDS)
@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_stream_sizes_do_not_add_up(dname, delta):
    codec, kind, raw, stored, layout = _valid_chunk(dname)
    bad = list(layout)
    bad[0] += delta if bad[0] > 0 else -delta
    _raises_corrupt(codec, stored, bad, kind, len(raw), match="add up")
    # Same layout, stored bytes cut or padded instead.
    if delta > 0:
        _raises_corrupt(codec, stored[:-delta], layout, kind, len(raw), match="add up")
    _raises_corrupt(codec, stored + b"\0" * abs(delta), layout, kind, len(raw), match="add up")


@pytest.mark.parametrize("dname", HOSTILE_KINDS)
@pytest.mark.parametrize("declared", [1 << 24, 1 << 50])
@pytest.mark.parametrize("slot", ["first", "last"])
def test_frame_declaring_too_much_content(dname, declared, slot):
    """A frame that declares more than the chunk holds is refused before zstd allocates."""
    codec, kind, raw, stored, layout = _valid_chunk(dname)
    if declared == 1 << 24:
        bomb = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * declared)
    else:
        bomb = _huge_declared_frame(declared)
    streams = list(
        zip([1 if s > 0 else -1 for s in layout], _streams(stored, layout), strict=False)
    )
    i = 0 if slot == "first" else len(streams) - 1
    streams[i] = (1, bomb)
    bad_stored, bad_layout = _assemble(streams)
    _raises_corrupt(codec, bad_stored, bad_layout, kind, len(raw), match="declares")


@pytest.mark.parametrize("dname", HOSTILE_KINDS)
def test_frame_declaring_too_little_content(dname):
    codec, kind, raw, stored, layout = _valid_chunk(dname)
    row = len(raw) // len(layout)
    small = zstandard.ZstdCompressor().compress(b"\0" * (row - 1))
    streams = [(-1, s) for s in _streams(stored, layout)]
    streams[0] = (1, small)
    _raises_corrupt(codec, *_assemble(streams), kind, len(raw), match="declares")


def _zeros_chunk(dname: str):
    """A chunk whose streams are all compressed frames (zeros), to damage them."""
    codec, kind, raw, stored, layout = _valid_chunk(dname, data="zeros")
    assert all(s > 0 for s in layout)
    return codec, kind, raw, stored, layout


@pytest.mark.parametrize("dname", HOSTILE_KINDS)
@pytest.mark.parametrize("slot", ["first", "last"])
@pytest.mark.parametrize(
    "damage",
    ["truncate1", "truncate_half", "header_only", "trailing", "two_frames", "garbage", "empty"],
)
def test_damaged_frame(dname, slot, damage):
    codec, kind, raw, stored, layout = _zeros_chunk(dname)
    streams = _streams(stored, layout)
    i = 0 if slot == "first" else len(streams) - 1
    f = streams[i]
    garbage = np.random.default_rng(len(f)).integers(0, 256, len(f), dtype=np.uint8).tobytes()
    bad = {
        "truncate1": f[:-1],
        "truncate_half": f[: len(f) // 2],
        "header_only": f[:4],
        "trailing": f + b"\x00garbage",
        "two_frames": f + zstandard.ZstdCompressor().compress(b""),
        "garbage": garbage,
        "empty": b"",
    }[damage]
    streams[i] = bad
    bad_stored = b"".join(streams)
    bad_layout = [len(s) for s in streams]
    _raises_corrupt(codec, bad_stored, bad_layout, kind, len(raw))


@pytest.mark.parametrize("dname", HOSTILE_KINDS)
def test_frame_without_content_size(dname):
    """Frames the codec never writes (no content size) are refused, not streamed."""
    codec, kind, raw, stored, layout = _zeros_chunk(dname)
    row = len(raw) // len(layout)
    nocs = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * row)
    streams = _streams(stored, layout)
    streams[0] = nocs
    _raises_corrupt(codec, b"".join(streams), [len(s) for s in streams], kind, len(raw))


@pytest.mark.parametrize("dname", HOSTILE_KINDS)
def test_skippable_frame_instead_of_data(dname):
    codec, kind, raw, stored, layout = _zeros_chunk(dname)
    skip = struct.pack("<II", 0x184D2A50, 8) + b"\0" * 8
    streams = _streams(stored, layout)
    streams[-1] = skip
    _raises_corrupt(codec, b"".join(streams), [len(s) for s in streams], kind, len(raw))


@pytest.mark.parametrize("dname", HOSTILE_KINDS)
def test_raw_bytes_labelled_as_frame(dname):
    codec, kind, raw, _stored, layout = _valid_chunk(dname)
    row = len(raw) // len(layout)
    streams = [raw[i * row : (i + 1) * row] for i in range(len(layout))]
    _raises_corrupt(codec, b"".join(streams), [row] * len(layout), kind, len(raw))


@pytest.mark.parametrize("dname", HOSTILE_KINDS)
@pytest.mark.parametrize("slot", ["first", "last", "pair"])
def test_raw_stream_of_wrong_length(dname, slot):
    """Raw streams whose sizes still add up to the stored length, but not per row."""
    codec, kind, raw, _, layout = _valid_chunk(dname)
    w = len(layout)
    row = len(raw) // w
    data = os.urandom(len(raw))
    if w == 1:
        # One stream: the only way to keep the sum is a wrong total vs out.
        _raises_corrupt(codec, data[:-1], [-(len(raw) - 1)], kind, len(raw), match="raw stream")
        _raises_corrupt(codec, data + b"x", [-(len(raw) + 1)], kind, len(raw), match="raw stream")
        return
    sizes = [-row] * w
    i = {"first": 0, "last": w - 1, "pair": w - 2}[slot]
    j = (i + 1) % w
    sizes[i] -= 1  # one byte more
    sizes[j] += 1  # one byte less
    _raises_corrupt(codec, data, sizes, kind, len(raw), match="raw stream")


@pytest.mark.parametrize("dname", HOSTILE_KINDS)
def test_decoding_with_the_wrong_kind(dname):
    """A chunk decoded as 1-byte elements when it was written grouped (or vice versa)."""
    codec, kind, raw, stored, layout = _valid_chunk(dname)
    other = ElementKind.of(torch.int8) if kind.itemsize > 1 else ElementKind.of(torch.int32)
    _raises_corrupt(codec, stored, layout, other, len(raw))


@pytest.mark.parametrize("dname", HOSTILE_KINDS)
def test_decoding_into_wrong_size(dname):
    codec, kind, raw, stored, layout = _valid_chunk(dname)
    for n in [len(raw) - kind.itemsize, len(raw) + kind.itemsize, 2 * len(raw)]:
        _raises_corrupt(codec, stored, layout, kind, n)


@pytest.mark.parametrize(
    ("layout", "size_delta"),
    [([0], 0), ([5], 0), ([-1], 0), ([0, 0], 0), ([], 1), ([], -1), ([], -100), ([], 1000)],
)
def test_raw_codec_refuses_inconsistent_input(layout, size_delta):
    codec = RawCodec()
    raw = os.urandom(100)
    stored = raw[: 100 + size_delta] if size_delta <= 0 else raw + b"\0" * size_delta
    _raises_corrupt(codec, stored, layout, ElementKind.of(torch.float32), 100)


def test_raw_codec_valid_decode():
    codec = RawCodec()
    raw = os.urandom(100)
    assert decode(codec, raw, [], ElementKind.of(torch.float32), 100) == raw


def test_corrupt_error_is_an_oserror():
    codec, kind, raw, stored, layout = _valid_chunk("f32")
    with pytest.raises(OSError, match="chunk does not decode"):
        try_decode(codec, stored, [*layout, 0], kind, len(raw))


_FUZZ_KINDS = st.sampled_from(["f32", "bf16", "f16", "f64", "i8", "c128"])


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    dname=_FUZZ_KINDS,
    data=st.sampled_from(["normal", "zeros", "const", "special"]),
    flips=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), max_size=4),
    cut=st.integers(-3, 3),
    layout_noise=st.lists(st.integers(-3, 3), max_size=8),
)
def test_fuzz_damaged_chunks_only_raise_corrupt(dname, data, flips, cut, layout_noise):
    """Random bit flips, cuts and layout changes: decode works or raises CorruptCheckpointError.

    Frames carry no checksum (the shard index checksums every chunk before decoding), so
    a flip inside compressed data may decode to other bytes; it must never raise anything
    else, crash, or write outside ``out``.
    """
    if data == "special" and dname not in FLOAT_DTYPES:
        data = "normal"
    codec, kind, raw, stored, layout = _valid_chunk(dname, data=data, count=257)
    buf = bytearray(stored)
    for pos, x in flips:
        if buf:
            buf[pos % len(buf)] ^= x
    if cut > 0:
        buf += os.urandom(cut)
    elif cut < 0:
        del buf[cut:]
    bad_layout = list(layout)
    for i, d in enumerate(layout_noise[: len(bad_layout)]):
        bad_layout[i] += d
    with contextlib.suppress(CorruptCheckpointError):
        decode(codec, bytes(buf), bad_layout, kind, len(raw))


@settings(max_examples=60, deadline=None, database=None)
@given(
    dname=_FUZZ_KINDS,
    count=st.integers(1, 64),
    stored=st.binary(max_size=600),
    layout=st.lists(st.integers(-300, 300), max_size=9),
)
def test_fuzz_arbitrary_input_only_raises_corrupt(dname, count, stored, layout):
    kind = ElementKind.of(DTYPES[dname])
    n = count * elem_size(dname)
    for codec in (ZstdCodec(level=1), RawCodec()):
        with contextlib.suppress(CorruptCheckpointError):
            decode(codec, stored, layout, kind, n)


# ---------------------------------------------------------------------------------------
# 5. Thread safety: one codec, many chunks, many threads
# ---------------------------------------------------------------------------------------


def _thread_jobs() -> list[tuple[str, int, str]]:
    jobs = []
    names = ["f32", "bf16", "f64", "f16", "i8", "c64", "i64"]
    rng = np.random.default_rng(3)
    for i in range(160):
        dname = names[i % len(names)]
        count = int(rng.integers(1, 20_000))
        data = ["normal", "zeros", "const"][i % 3]
        jobs.append((dname, count, data))
    return jobs


@pytest.mark.parametrize("codec_name", ["zstd-1", "zstd1", "zstd9", "zstd1-nogroup", "none"])
def test_threads_share_one_codec(codec_name):
    codec = get_codec(CODEC_SPECS[codec_name])  # fresh: fresh pool and thread-locals
    jobs = _thread_jobs()
    start = threading.Barrier(4)

    def enc(job):
        dname, count, data = job
        raw = np.frombuffer(make_data(dname, count, data), dtype=np.uint8)
        return encode_copy(codec, raw, ElementKind.of(DTYPES[dname]))

    def dec(args):
        (dname, count, data), (stored, layout) = args
        return decode(
            codec, stored, layout, ElementKind.of(DTYPES[dname]), len(make_data(dname, count, data))
        )

    def warm(_):
        start.wait(timeout=10)  # all four workers exist before the real work starts

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(warm, range(4)))
        encoded = list(pool.map(enc, jobs))
        decoded = list(pool.map(dec, zip(jobs, encoded, strict=False)))
    for job, got in zip(jobs, decoded, strict=False):
        assert got == make_data(*job), f"{job} did not round-trip"


def test_threads_encode_and_decode_at_the_same_time():
    """Encodes and decodes interleaved on the same codec object and the same threads."""
    codec = ZstdCodec(level=1)
    jobs = _thread_jobs()
    # Decode inputs prepared on this thread first.
    prepared = [
        encode_copy(
            codec, np.frombuffer(make_data(*j), dtype=np.uint8), ElementKind.of(DTYPES[j[0]])
        )
        for j in jobs
    ]

    def work(i):
        dname, count, data = jobs[i]
        kind = ElementKind.of(DTYPES[dname])
        want = make_data(dname, count, data)
        if i % 2:
            stored, layout = encode_copy(codec, np.frombuffer(want, dtype=np.uint8), kind)
            assert (stored, layout) == prepared[i]  # encoding is deterministic
        else:
            stored, layout = prepared[i]
        return decode(codec, stored, layout, kind, len(want)) == want

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(len(jobs))))


def test_threads_get_their_own_zstd_contexts():
    codec = ZstdCodec(level=1)
    raw = np.frombuffer(make_data("f32", 1000, "normal"), dtype=np.uint8)
    kind = ElementKind.of(torch.float32)
    seen: dict[str, list[int]] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def work(_):
        barrier.wait(timeout=10)
        encode_copy(codec, raw, kind)
        cctx = codec._local.cctx
        dctx = codec._dctx()
        with lock:
            seen.setdefault("c", []).append(id(cctx))
            seen.setdefault("d", []).append(id(dctx))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    assert len(set(seen["c"])) == 4
    assert len(set(seen["d"])) == 4


# ---------------------------------------------------------------------------------------
# 6. Lent buffers: copy, then release, then reuse
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ZSTD_LEVELS)
@pytest.mark.parametrize("dname", ["f32", "bf16", "f64", "i32"])
def test_copy_then_release_then_encode_again(level, dname):
    codec = ZstdCodec(level=level)
    kind = ElementKind.of(DTYPES[dname])
    a = np.frombuffer(make_data(dname, 5000, "normal"), dtype=np.uint8)
    rng = np.random.default_rng(9)
    b = rng.integers(0, 256, size=a.nbytes, dtype=np.uint8)  # different, incompressible

    enc_a = codec.encode(a, kind)
    stored_a = b"".join(bytes(memoryview(p).cast("B")) for p in enc_a.parts)
    layout_a = list(enc_a.layout)
    assert enc_a.release is not None
    enc_a.release()

    enc_b = codec.encode(b, kind)
    stored_b = b"".join(bytes(memoryview(p).cast("B")) for p in enc_b.parts)
    layout_b = list(enc_b.layout)
    assert enc_b.release is not None
    enc_b.release()

    assert decode(codec, stored_a, layout_a, kind, a.nbytes) == a.tobytes()
    assert decode(codec, stored_b, layout_b, kind, b.nbytes) == b.tobytes()


def test_released_buffer_is_reused():
    """The pool lends the same buffer again after release (which is why parts must be
    copied before release): raw parts of the next chunk live in the same memory."""
    codec = ZstdCodec(level=1)
    kind = ElementKind.of(torch.float32)
    rng = np.random.default_rng(11)
    a = rng.integers(0, 256, size=4096, dtype=np.uint8)
    b = rng.integers(0, 256, size=4096, dtype=np.uint8)
    enc_a = codec.encode(a, kind)
    assert all(s < 0 for s in enc_a.layout)
    part_a = enc_a.parts[0]
    copy_a = bytes(memoryview(part_a).cast("B"))
    assert enc_a.release is not None
    enc_a.release()
    enc_b = codec.encode(b, kind)
    assert np.shares_memory(np.asarray(part_a), np.asarray(enc_b.parts[0]))
    # The stale view now shows B's bytes; the copy taken before release is intact.
    assert bytes(memoryview(part_a).cast("B")) == b[0::4].tobytes()
    assert copy_a == a[0::4].tobytes()
    assert enc_b.release is not None
    enc_b.release()


def test_unreleased_buffers_are_not_reused():
    codec = ZstdCodec(level=1)
    kind = ElementKind.of(torch.float32)
    rng = np.random.default_rng(12)
    a = rng.integers(0, 256, size=4096, dtype=np.uint8)
    enc_a = codec.encode(a, kind)
    enc_b = codec.encode(rng.integers(0, 256, size=4096, dtype=np.uint8), kind)
    assert not np.shares_memory(np.asarray(enc_a.parts[0]), np.asarray(enc_b.parts[0]))
    assert bytes(memoryview(enc_a.parts[0]).cast("B")) == a[0::4].tobytes()


def test_buffer_reuse_across_chunk_sizes():
    """Big chunk, then small ones (served from the big buffer), then big again."""
    codec = ZstdCodec(level=1)
    results = []
    sizes = [(1 << 16) + 3, 1, 7, 1000, (1 << 17) + 1, 5, (1 << 16)]
    for i, count in enumerate(sizes):
        dname = ["f32", "bf16", "f64"][i % 3]
        kind = ElementKind.of(DTYPES[dname])
        raw = make_data(dname, count, "special" if i % 2 else "normal")
        stored, layout = encode_copy(codec, np.frombuffer(raw, dtype=np.uint8), kind)
        results.append((kind, raw, stored, layout))
    for kind, raw, stored, layout in results:
        assert decode(codec, stored, layout, kind, len(raw)) == raw


def test_non_grouped_chunks_lend_nothing():
    """One-stream chunks point at the caller's bytes and need no release."""
    raw = np.frombuffer(os.urandom(1000), dtype=np.uint8)
    enc = ZstdCodec(level=1).encode(raw, ElementKind.of(torch.int8))
    assert enc.release is None
    assert enc.layout == [-1000]


# ---------------------------------------------------------------------------------------
# 7. get_codec and configs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "cls", "config"),
    [
        ("none", RawCodec, {"id": "none"}),
        ({"id": "none"}, RawCodec, {"id": "none"}),
        ("zstd", ZstdCodec, {"id": "zstd", "level": 1, "byte_group": True}),
        ({"id": "zstd", "level": 5}, ZstdCodec, {"id": "zstd", "level": 5, "byte_group": True}),
        (
            {"id": "zstd", "level": 5, "byte_group": True},
            ZstdCodec,
            {"id": "zstd", "level": 5, "byte_group": True},
        ),
        (
            {"id": "zstd", "level": -7, "byte_group": False},
            ZstdCodec,
            {"id": "zstd", "level": -7, "byte_group": False},
        ),
        ({"id": "zstd", "level": 22}, ZstdCodec, {"id": "zstd", "level": 22, "byte_group": True}),
    ],
)
def test_get_codec_builds_and_round_trips(spec, cls, config):
    codec = get_codec(spec)
    assert type(codec) is cls
    assert codec.get_config() == config
    again = get_codec(codec.get_config())
    assert again == codec
    assert hash(again) == hash(codec)
    # The config is stored as JSON in the shard index.
    assert get_codec(json.loads(json.dumps(codec.get_config()))) == codec
    assert str(config["id"]) in repr(codec)


def test_get_codec_passes_codec_objects_through():
    codec = ZstdCodec(level=4)
    assert get_codec(codec) is codec


def test_get_codec_does_not_mutate_the_spec():
    spec = {"id": "zstd", "level": 3}
    get_codec(spec)
    assert spec == {"id": "zstd", "level": 3}


def test_codec_equality():
    assert ZstdCodec(level=3) == ZstdCodec(level=3)
    assert ZstdCodec(level=3) != ZstdCodec(level=4)
    assert ZstdCodec(level=3) != ZstdCodec(level=3, byte_group=False)
    assert ZstdCodec() != RawCodec()
    assert RawCodec() == RawCodec()
    assert ZstdCodec() != "zstd"
    assert len({ZstdCodec(), ZstdCodec(), RawCodec()}) == 2


@pytest.mark.parametrize("name", ["gzip", "lz4", "ZSTD", "", "auto", "raw"])
def test_unknown_codec_names_the_known_ones(name):
    with pytest.raises(ValueError, match="unknown codec") as info:
        get_codec(name)
    msg = str(info.value)
    assert "none" in msg
    assert "zstd" in msg
    with pytest.raises(ValueError, match=r"none.*zstd"):
        get_codec({"id": name, "level": 1})


@pytest.mark.parametrize("spec", [None, 3, 1.5, ["zstd"], ("zstd",), {}, {"level": 3}, b"zstd"])
def test_get_codec_rejects_non_specs(spec):
    with pytest.raises(ValueError, match="codec must be"):
        get_codec(spec)


@pytest.mark.parametrize("level", [0, 23, -8, 100, -100, "x", "3", 3.0, None, 1.5])
def test_zstd_level_validation(level):
    with pytest.raises(ValueError, match="level"):
        ZstdCodec(level=level)
    with pytest.raises(ValueError, match="level"):
        get_codec({"id": "zstd", "level": level})


@pytest.mark.parametrize("level", [-7, -1, 1, 2, 3, 4, 19, 22])
def test_zstd_valid_levels(level):
    codec = get_codec({"id": "zstd", "level": level})
    assert codec.get_config()["level"] == level
    roundtrip(
        codec,
        np.frombuffer(make_data("bf16", 300, "normal"), dtype=np.uint8),
        ElementKind.of(torch.bfloat16),
    )


@pytest.mark.parametrize(
    "spec",
    [
        {"id": "zstd", "bogus": 1},
        {"id": "zstd", "level": 3, "threads": 2},
        {"id": "none", "level": 3},
        {"id": "none", "byte_group": True},
    ],
)
def test_get_codec_rejects_unknown_parameters(spec):
    with pytest.raises(ValueError, match="bad parameters"):
        get_codec(spec)


@pytest.mark.parametrize("bad_id", [["zstd"], {"x": 1}], ids=["list", "dict"])
def test_get_codec_unhashable_id_is_a_value_error(bad_id):
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec({"id": bad_id})


@pytest.mark.parametrize("bad_id", [None, 3, 1.5, True])
def test_get_codec_non_string_id(bad_id):
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec({"id": bad_id})


# ---------------------------------------------------------------------------------------
# Zero-length chunks
# ---------------------------------------------------------------------------------------


def test_raw_codec_zero_length_chunk():
    codec = RawCodec()
    roundtrip(codec, np.zeros(0, dtype=np.uint8), ElementKind.of(torch.float32))


@pytest.mark.parametrize("dname", ["f32", "bf16", "i8"])
def test_zstd_zero_length_chunk(dname):
    codec = ZstdCodec(level=1)
    roundtrip(codec, np.zeros(0, dtype=np.uint8), ElementKind.of(DTYPES[dname]))


# ---------------------------------------------------------------------------------------
# Property: any bytes, any dtype, any codec
# ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, database=None)
@given(
    payload=st.binary(min_size=1, max_size=4096),
    dname=st.sampled_from(list(DTYPES)),
    codec_name=st.sampled_from(list(CODEC_SPECS)),
    offset=st.integers(0, 7),
)
def test_property_any_bytes_round_trip(payload, dname, codec_name, offset):
    es = elem_size(dname)
    payload = (payload * es)[: max(es, len(payload) // es * es)]
    big = np.zeros(len(payload) + 8, dtype=np.uint8)
    raw = big[offset : offset + len(payload)]
    raw[:] = np.frombuffer(payload, dtype=np.uint8)
    roundtrip(codec_for(codec_name), raw, ElementKind.of(DTYPES[dname]))


@settings(max_examples=40, deadline=None, database=None)
@given(
    values=st.lists(
        st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True, width=32),
        min_size=1,
        max_size=300,
    ),
    dname=st.sampled_from(["f64", "f32", "f16", "bf16", "c64"]),
    level=st.sampled_from(ZSTD_LEVELS),
)
def test_property_float_values_round_trip(values, dname, level):
    t = torch.tensor(values, dtype=torch.float32)
    t = torch.complex(t, t.flip(0)) if dname == "c64" else t.to(DTYPES[dname])
    roundtrip(ZstdCodec(level=level), raw_bytes(t), ElementKind.of(t.dtype))
