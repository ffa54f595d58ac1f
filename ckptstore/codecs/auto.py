"""``codec="auto"``: the choice between no compression and zstd, from measured speeds."""

from __future__ import annotations

from ckptstore.codecs.base import Codec
from ckptstore.codecs.raw import RawCodec
from ckptstore.codecs.zstd import ZstdCodec


class AutoCodec:
    """``codec="auto"``: compress only when that makes the write finish sooner.

    Writing ``S`` raw bytes takes ``S/W`` uncompressed (``W``: the destination's write
    speed) and ``max(S/(E*T), r*S/W)`` compressed (``E``: zstd speed per thread, ``T``
    threads, ``r`` ratio), since encoding and writing overlap. zstd is chosen when that
    is at least 10% less. ``W``, ``E`` and ``r`` are measured on every save; before the
    first measurement a local disk starts uncompressed and anything else compressed,
    and ``E`` is taken as 0.7 GB/s per thread (what this codec did on fp32 weights).

    On a ~2-3 GB/s local disk with 2 cores this keeps saves uncompressed (zstd would
    be the bottleneck); on object storage or a network file system it compresses.
    """

    _MARGIN = 0.9

    def __init__(self, *, local: bool, threads: int) -> None:
        self.threads = threads
        self.write_bps: float | None = None
        # A backup tier uploads every checkpoint after it is written: then the time that
        # counts is until backed up, and ``downstream_bps`` (the upload's measured speed,
        # None until one is measured) adds ``S/D`` raw or ``r*S/D`` compressed.
        self.downstream = False
        self.downstream_bps: float | None = None
        self.encode_bps: float = 0.7e9
        self.ratio = 0.85
        self._local = local
        self._raw = RawCodec()
        self._zstd = ZstdCodec()

    def choose(self) -> Codec:
        if self.downstream and self.downstream_bps is None:
            return self._zstd  # an upload of unknown speed follows: start compressed
        if self.write_bps is None and not self.downstream:
            return self._raw if self._local else self._zstd
        t_raw = 1.0 / self.write_bps if self.write_bps else 0.0
        t_zstd = max(
            1.0 / (self.encode_bps * self.threads),
            self.ratio / self.write_bps if self.write_bps else 0.0,
        )
        if self.downstream and self.downstream_bps:
            t_raw += 1.0 / self.downstream_bps
            t_zstd += self.ratio / self.downstream_bps
        return self._zstd if t_zstd < self._MARGIN * t_raw else self._raw

    def observe(
        self, codec: Codec, raw_bytes: int, stored_bytes: int, sink_s: float, encode_s: float
    ) -> None:
        if raw_bytes < (16 << 20) or sink_s <= 0:
            return  # too small to say anything about throughput
        self.write_bps = stored_bytes / sink_s
        if codec.codec_id == "zstd" and encode_s > 0:
            self.encode_bps = raw_bytes / encode_s
            self.ratio = stored_bytes / raw_bytes
