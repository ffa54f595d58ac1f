"""Test data: random bytes, and the same bytes as each kind of buffer a sink must take."""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

PAGE = 4096

# Every kind of bytes-like object the checkpoint writer hands a sink.
BUFFER_KINDS = [
    "bytes",
    "bytearray",
    "memoryview",
    "numpy",
    "numpy_unaligned",
    "numpy_aligned",
    "numpy_2d",
]


def rand_bytes(n: int, seed: int = 0) -> bytes:
    """``n`` reproducible random bytes."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def page_aligned(data: bytes) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A writable uint8 array over anonymous mmap memory: its address is page-aligned."""
    m = mmap.mmap(-1, max(len(data), 1))
    arr = np.frombuffer(m, dtype=np.uint8)[: len(data)]
    arr[:] = np.frombuffer(data, dtype=np.uint8)
    assert arr.ctypes.data % PAGE == 0
    return arr


def as_kind(data: bytes, kind: str) -> Any:
    """``data`` as one of the :data:`BUFFER_KINDS`."""
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "numpy":
        return np.frombuffer(data, dtype=np.uint8).copy()
    if kind == "numpy_unaligned":  # a view that starts one byte into its buffer
        buf = np.zeros(len(data) + 1, dtype=np.uint8)
        buf[1:] = np.frombuffer(data, dtype=np.uint8)
        return buf[1:]
    if kind == "numpy_aligned":
        return page_aligned(data)
    if kind == "numpy_2d":  # multi-dimensional, C-contiguous (zero-size: see its own test)
        if len(data) % 2 or not data:
            return np.frombuffer(data, dtype=np.uint8).copy()
        return np.frombuffer(data, dtype=np.uint8).reshape(2, -1).copy()
    raise AssertionError(kind)
