"""The codec interface: how one chunk of one tensor becomes bytes on storage and back.

Who calls it: the shard writer and reader (``ckptstore.format.shard``), from worker
threads of the codec pool, many chunks at once. A codec object is therefore shared
across threads and must keep per-thread state (zstd contexts, scratch buffers) in
thread-locals: a zstd context used from two threads at once can crash the process.

Call order for one chunk::

    encoded = codec.encode(raw, kind)            # writer thread pool
    codec.decode_into(stored, encoded.layout,    # reader thread pool
                      kind, out)

``layout`` is a short list of ints the codec needs to decode (stream sizes); it is
stored in the shard file's index, never trusted beyond what ``decode_into`` checks.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ckptstore.errors import CorruptCheckpointError

if TYPE_CHECKING:
    import torch


@functools.cache
def _float_kinds() -> dict[torch.dtype, str]:
    """numpy has no bfloat16; the codecs see every dtype as raw bytes plus a "kind".
    Built on first use, so that the codecs (and ``ckptstore ls``) import without torch."""
    import torch

    return {
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float32: "fp32",
        torch.float64: "fp64",
        torch.complex64: "fp32",  # pairs of fp32: same byte structure
        torch.complex128: "fp64",
        torch.complex32: "fp16",
    }


@dataclass(frozen=True)
class ElementKind:
    """What the bytes of a chunk are: element width and whether they are IEEE floats."""

    itemsize: int
    float_kind: str | None  # "bf16" | "fp16" | "fp32" | "fp64" | None

    @classmethod
    def of(cls, dtype: torch.dtype | None) -> ElementKind:
        """``None`` means opaque bytes (a pickled Python value)."""
        if dtype is None:
            return cls(1, None)
        fk = _float_kinds().get(dtype)
        size = dtype.itemsize
        if fk is not None and dtype.is_complex:
            size //= 2
        return cls(size, fk)


@dataclass(frozen=True)
class EncodedChunk:
    """The stored form of one chunk: ``parts`` concatenated, plus the decode layout.

    ``parts`` may point into a buffer the codec lends out; the writer calls
    ``release()`` once it has written them, and must not touch them after.
    """

    parts: list[Any]  # bytes-like objects, written in order
    layout: list[int]
    release: Callable[[], None] | None = None

    @property
    def stored_bytes(self) -> int:
        return sum(memoryview(p).nbytes for p in self.parts)


class Codec(ABC):
    """Lossless chunk codec. Subclasses set ``codec_id`` and implement encode/decode."""

    codec_id: ClassVar[str]

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """JSON-able config with ``"id"``; ``get_codec(config)`` rebuilds an equal codec."""

    @abstractmethod
    def encode(self, raw: np.ndarray, kind: ElementKind) -> EncodedChunk:
        """Encode ``raw`` (1-D contiguous uint8, a whole number of elements)."""

    @abstractmethod
    def decode_into(
        self, stored: memoryview, layout: list[int], kind: ElementKind, out: np.ndarray
    ) -> None:
        """Decode ``stored`` into ``out`` (1-D contiguous uint8 of the raw length).

        Raises :class:`CorruptCheckpointError` when sizes do not add up; the caller has
        already checked the chunk's checksum.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.get_config()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.get_config().items())))


def check(cond: bool, what: str) -> None:
    """Raise :class:`CorruptCheckpointError` with ``what`` unless ``cond``."""
    if not cond:
        raise CorruptCheckpointError(f"chunk does not decode: {what}")
