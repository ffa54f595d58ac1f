"""Lossless chunk codecs and the registry that rebuilds them from their stored config."""

from __future__ import annotations

from typing import Any

from ckptstore.codecs.base import Codec, ElementKind, EncodedChunk
from ckptstore.codecs.raw import RawCodec
from ckptstore.codecs.zstd import ZstdCodec
from ckptstore.errors import InvalidArgumentError

__all__ = ["Codec", "ElementKind", "EncodedChunk", "RawCodec", "ZstdCodec", "get_codec"]

_REGISTRY: dict[str, type[Codec]] = {RawCodec.codec_id: RawCodec, ZstdCodec.codec_id: ZstdCodec}


def get_codec(spec: str | dict[str, Any] | Codec) -> Codec:
    """Build a codec from a name (``"none"``, ``"zstd"``), a stored config or a codec.

    ``"auto"`` is not a codec; the checkpointer resolves it before calling this.
    """
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, str):
        spec = {"id": spec}
    if not isinstance(spec, dict) or "id" not in spec:
        raise InvalidArgumentError(f"codec must be a name or a config dict with 'id', got {spec!r}")
    params = dict(spec)
    codec_id = params.pop("id")
    cls = _REGISTRY.get(codec_id) if isinstance(codec_id, str) else None
    if cls is None:
        known = ", ".join(sorted([*_REGISTRY, "auto"]))
        raise InvalidArgumentError(f"unknown codec {codec_id!r}; choose one of: {known}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise InvalidArgumentError(f"bad parameters for codec {codec_id!r}: {exc}") from None
