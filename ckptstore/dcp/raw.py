"""What a save writes of each DCP item, as raw bytes: :func:`tensor_bytes` of a tensor
(hashed, compressed and written as they lie, without a copy where possible) and
:func:`item_key`, the item's readable key in a shard's index."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def item_key(index: Any) -> str:
    """A readable key for a DCP ``MetadataIndex`` (shards carry their offsets)."""
    if index.offset is None:
        return str(index.fqn)
    return f"{index.fqn}@{','.join(str(o) for o in index.offset)}"


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of ``t`` (contiguous, on CPU) as a 1-D uint8 array, without a copy if possible."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()
