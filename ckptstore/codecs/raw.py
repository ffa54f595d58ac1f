"""``codec="none"``: bytes stored as they are; the shard index still checksums every chunk."""

from __future__ import annotations

from typing import Any

import numpy as np

from ckptstore.codecs.base import Codec, ElementKind, EncodedChunk, check


class RawCodec(Codec):
    codec_id = "none"

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id}

    def encode(self, raw: np.ndarray, kind: ElementKind) -> EncodedChunk:
        return EncodedChunk(parts=[raw], layout=[])

    def decode_into(
        self, stored: memoryview, layout: list[int], kind: ElementKind, out: np.ndarray
    ) -> None:
        check(layout == [], f"raw chunk with layout {layout}")
        check(
            stored.nbytes == out.nbytes, f"raw chunk of {stored.nbytes} B, expected {out.nbytes} B"
        )
        np.copyto(out, np.frombuffer(stored, dtype=np.uint8))
