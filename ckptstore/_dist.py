"""The process group ckptstore's collectives use: gloo, never the training group.

DCP runs collectives while it plans, writes and reads. ckptstore runs them on a gloo
group of its own: the writer thread must not interleave collectives with the training
loop's on the same group (NCCL would deadlock or mismatch), and gloo works on CPU
tensors whatever the training backend is.

``new_group`` is itself a collective over the whole world: every rank creates the
group at the same point (the Checkpointer's constructor, or the first synchronous
``save``/``load``).
"""

from __future__ import annotations

import threading
from typing import cast

import torch.distributed as dist

_lock = threading.Lock()
_cache: dict[int, tuple[object, dist.ProcessGroup]] = {}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def gloo_group(
    process_group: dist.ProcessGroup | None = None, *, dedicated: bool = False
) -> dist.ProcessGroup | None:
    """A gloo group of ckptstore's own over the ranks of ``process_group`` (default: all).

    None when no process group is initialised (single process). ``dedicated=True`` makes
    a new group (one per Checkpointer, whose writer thread must not share a group with
    any other thread); otherwise one cached group per world serves synchronous calls.
    """
    if not is_distributed():
        return None
    ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
    if dedicated or ranks is not None:
        return cast(dist.ProcessGroup, dist.new_group(ranks=ranks, backend="gloo"))
    default = dist.distributed_c10d._get_default_group()
    with _lock:
        cached = _cache.get(id(default))
        if cached is not None and cached[0] is default:
            return cached[1]
        group = cast(dist.ProcessGroup, dist.new_group(backend="gloo"))
        _cache[id(default)] = (default, group)
        return group


def rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if group is not None else 0


def world_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if group is not None else 1


def broadcast(value: object, group: dist.ProcessGroup | None) -> object:
    """Rank 0's ``value`` on every rank of ``group``."""
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]
