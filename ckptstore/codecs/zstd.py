"""``codec="zstd"``: byte-grouped, exponent-aligned zstd, one independent frame per stream.

Why this shape (measured on GPT weights, AdamW moments and all-MiniLM-L6-v2, see
``benchmarks/codecs.py``):

* The bytes of a float are not alike. In fp32 the low three bytes are mantissa and
  close to random; nearly all redundancy is in the exponent. Storing bytes of the same
  significance together ("byte grouping") lets zstd see runs of similar exponents
  instead of noise: 0.92 -> 0.84 on fp32 weights.
* The exponent straddles a byte boundary (sign + 7 exponent bits in the top byte, the
  last exponent bit in the next one). Moving the sign down and the whole 8-bit
  exponent into one byte ("exponent alignment", as ZipNN does) makes that stream
  smaller still: for bf16 it is half the data.
* Each stream is its own zstd frame, so a stream that does not shrink (mantissa) is
  stored raw and costs nothing to decode. zstd recognises such input at 5-7 GB/s.
* The exponent stream has a skewed byte histogram but few long repeats. zstd's fast
  strategy with the smallest hash table (``hash_log=6``) and ``min_match=7`` mostly
  Huffman-codes it: 0.326 vs level 1's 0.360, at twice the speed, and it gives up on
  the near-random mantissa streams twice as fast too (9 vs 4.6 GB/s).
* The sign + top-mantissa stream (byte entropy ~0.996) stays raw: zstd's Huffman
  cannot win 0.4% with whole-bit codes (splitting the sign bit off was tried: 7-bit
  symbols cost exactly 7 bits, so 1.000 again). ZipNN's coder gets that last ~0.1%;
  our ratio is within 0.001 of ZipNN's on every class measured.

Everything runs in numpy and zstd, both of which release the GIL, so chunks encode in
parallel on the codec pool. Per-thread zstd contexts and scratch buffers (a context
shared between threads can crash).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np
import zstandard

from ckptstore.codecs.base import Codec, ElementKind, EncodedChunk, check

# Exponent alignment applies where the exponent's top 7 bits share a byte with the sign
# and its last bit sits at the top of the next byte: bf16, fp32 (8-bit exponent) and
# fp64 (the top 8 of its 11 exponent bits). fp16's 5-bit exponent gains nothing.
_ALIGNABLE = frozenset({"bf16", "fp32", "fp64"})

# A stream is kept compressed only if it saves at least this fraction; below that the
# decode time is not worth the bytes.
_MIN_SAVING = 0.02

_GROUPED_PARAMS = dict(
    window_log=20,
    hash_log=6,
    chain_log=6,
    search_log=1,
    min_match=7,
    target_length=0,
    strategy=zstandard.STRATEGY_FAST,
)


class ZstdCodec(Codec):
    """Lossless zstd codec; ``level`` is zstd's level (1-22, negative for faster).

    At levels <= 3 the byte-grouped streams use the tuned fast parameters above (better
    and faster than level 1 on that data); at higher levels, and for 1-byte dtypes,
    streams are compressed at the level as given.
    """

    codec_id = "zstd"

    def __init__(self, level: int = 1, byte_group: bool = True) -> None:
        if (
            isinstance(level, bool)
            or not isinstance(level, int)
            or not (-7 <= level <= 22)
            or level == 0
        ):
            raise ValueError(f"zstd level must be an int in -7..-1 or 1..22, got {level!r}")
        if not isinstance(byte_group, bool):
            raise ValueError(f"byte_group must be True or False, got {byte_group!r}")
        self.level = level
        self.byte_group = byte_group
        self._local = threading.local()
        # Grouped chunk buffers lent to the writer until written, then reused: a fresh
        # allocation per chunk would pay page faults (~0.4 s/GiB) on every save.
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "level": self.level, "byte_group": self.byte_group}

    # ---- per-thread state -------------------------------------------------------
    def _cctx(self, grouped: bool) -> zstandard.ZstdCompressor:
        loc = self._local
        if not hasattr(loc, "cctx"):
            loc.cctx = zstandard.ZstdCompressor(level=self.level, write_checksum=False)
            if self.level <= 3:
                params = zstandard.ZstdCompressionParameters(**_GROUPED_PARAMS)
                loc.cctx_grouped = zstandard.ZstdCompressor(compression_params=params)
            else:
                loc.cctx_grouped = loc.cctx
        return loc.cctx_grouped if grouped else loc.cctx  # type: ignore[no-any-return]

    def _dctx(self) -> zstandard.ZstdDecompressor:
        loc = self._local
        if not hasattr(loc, "dctx"):
            loc.dctx = zstandard.ZstdDecompressor()
        return loc.dctx  # type: ignore[no-any-return]

    def _scratch(self, name: str, nbytes: int) -> np.ndarray:
        """A reusable per-thread uint8 buffer of at least ``nbytes``."""
        loc = self._local
        buf: np.ndarray | None = getattr(loc, name, None)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(max(nbytes, 1), dtype=np.uint8)
            setattr(loc, name, buf)
        return buf[:nbytes]

    # ---- encode -------------------------------------------------------------------
    def _width(self, kind: ElementKind, nbytes: int) -> int:
        w = kind.itemsize if self.byte_group else 1
        return w if w > 1 and nbytes % w == 0 else 1

    def encode(self, raw: np.ndarray, kind: ElementKind) -> EncodedChunk:
        n = raw.nbytes
        w = self._width(kind, n)
        if w == 1:
            return self._encode_streams([raw], grouped=False)
        buf = self._borrow(n)
        rows = buf[:n].reshape(w, n // w)
        _group(raw, rows)
        if kind.float_kind in _ALIGNABLE:
            row_bytes = n // w
            _align_exponent(
                rows[w - 1],
                rows[w - 2],
                self._scratch("tmp", row_bytes),
                self._scratch("tmp2", row_bytes),
            )
        chunk = self._encode_streams(list(rows), grouped=True)
        return EncodedChunk(chunk.parts, chunk.layout, release=lambda: self._free.put(buf))

    def _borrow(self, nbytes: int) -> np.ndarray:
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            return np.empty(nbytes, dtype=np.uint8)
        if buf.nbytes < nbytes:
            return np.empty(nbytes, dtype=np.uint8)
        return buf

    def _encode_streams(self, rows: list[np.ndarray], grouped: bool) -> EncodedChunk:
        parts: list[Any] = []
        layout: list[int] = []
        cctx = self._cctx(grouped)
        for row in rows:
            frame = cctx.compress(row.data)
            if len(frame) < row.nbytes * (1.0 - _MIN_SAVING):
                parts.append(frame)
                layout.append(len(frame))
            else:
                parts.append(row)  # stored raw, straight from the lent buffer
                layout.append(-row.nbytes)
        return EncodedChunk(parts=parts, layout=layout)

    # ---- decode -------------------------------------------------------------------
    def decode_into(
        self, stored: memoryview, layout: list[int], kind: ElementKind, out: np.ndarray
    ) -> None:
        n = out.nbytes
        w = self._width(kind, n)
        check(len(layout) == w, f"{len(layout)} streams, expected {w}")
        check(sum(abs(s) for s in layout) == stored.nbytes, "stream sizes do not add up")
        if w == 1:
            self._decode_stream(stored, layout[0], out)
            return
        row_bytes = n // w
        aligned = kind.float_kind in _ALIGNABLE
        columns = out.reshape(-1, w)
        rows = self._scratch("group", n).reshape(w, row_bytes)
        pos = 0
        for i, size in enumerate(layout):
            part = stored[pos : pos + abs(size)]
            pos += abs(size)
            in_pair = aligned and i >= w - 2
            if size < 0 and not in_pair and w != 2:
                # A raw stream goes straight from the read buffer into its column.
                check(-size == row_bytes, f"raw stream of {-size} B, expected {row_bytes} B")
                columns[:, i] = np.frombuffer(part, dtype=np.uint8)
            else:
                self._decode_stream(part, size, rows[i])
        if aligned:
            _unalign_exponent(
                rows[w - 1],
                rows[w - 2],
                self._scratch("tmp", row_bytes),
                self._scratch("tmp2", row_bytes),
            )
        if w == 2:
            # Interleaving two byte rows is fastest as 16-bit shifts (7 GB/s vs 3.5).
            words = out.view(np.uint16)
            np.left_shift(rows[1], 8, out=words, dtype=np.uint16)
            np.bitwise_or(words, rows[0], out=words)
            return
        for i, size in enumerate(layout):
            if size > 0 or (aligned and i >= w - 2):
                columns[:, i] = rows[i]

    def _decode_stream(self, stored: memoryview, size: int, out: np.ndarray) -> None:
        if size == 0:  # an empty stream (stored raw as -0 == 0): nothing to decode
            check(out.nbytes == 0 and stored.nbytes == 0, f"empty stream, expected {out.nbytes} B")
            return
        if size < 0:
            check(-size == out.nbytes, f"raw stream of {-size} B, expected {out.nbytes} B")
            np.copyto(out, np.frombuffer(stored, dtype=np.uint8))
            return
        # Check the size the frame declares before zstd allocates it: a hostile frame
        # can declare far more than the manifest allows (max_output_size is ignored
        # when the frame states its size).
        try:
            declared = zstandard.frame_content_size(stored)
        except zstandard.ZstdError as exc:
            check(False, f"bad zstd frame header ({exc})")
        check(declared == out.nbytes, f"zstd frame declares {declared} B, expected {out.nbytes} B")
        try:
            data = self._dctx().decompress(
                stored, max_output_size=out.nbytes, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            check(False, f"zstd: {exc}")
        check(len(data) == out.nbytes, f"zstd frame gave {len(data)} B, expected {out.nbytes} B")
        np.copyto(out, np.frombuffer(data, dtype=np.uint8))


_WORD = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _group(raw: np.ndarray, rows: np.ndarray) -> None:
    """Byte ``i`` of every element into ``rows[i]`` (little-endian).

    Shifting whole words and letting the cast to uint8 keep the low byte runs at
    7-21 GB/s; numpy's transposed copy manages 3.5.
    """
    w = rows.shape[0]
    words = raw.view(_WORD[w])
    for i in range(w):
        np.right_shift(words, 8 * i, out=rows[i], casting="unsafe")


def _align_exponent(hi: np.ndarray, lo: np.ndarray, tmp: np.ndarray, tmp2: np.ndarray) -> None:
    """In place: ``hi`` <- the 8 exponent bits, ``lo`` <- sign bit + 7 mantissa bits.

    Before: hi = s e7 e6 e5 e4 e3 e2 e1, lo = e0 m6 .. m0.
    After:  hi = e7 .. e0,                lo = s  m6 .. m0.
    """
    np.bitwise_and(hi, 0x80, out=tmp)  # s
    np.left_shift(hi, 1, out=hi)  # e7..e1 0
    np.right_shift(lo, 7, out=tmp2)  # e0
    np.bitwise_or(hi, tmp2, out=hi)  # e7..e0
    np.bitwise_and(lo, 0x7F, out=lo)
    np.bitwise_or(lo, tmp, out=lo)  # s m6..m0


def _unalign_exponent(hi: np.ndarray, lo: np.ndarray, tmp: np.ndarray, tmp2: np.ndarray) -> None:
    """Inverse of :func:`_align_exponent`, in place."""
    np.bitwise_and(lo, 0x80, out=tmp)  # s
    np.left_shift(hi, 7, out=tmp2)  # e0 in bit 7
    np.bitwise_and(lo, 0x7F, out=lo)
    np.bitwise_or(lo, tmp2, out=lo)  # e0 m6..m0
    np.right_shift(hi, 1, out=hi)
    np.bitwise_or(hi, tmp, out=hi)  # s e7..e1
