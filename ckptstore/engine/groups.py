"""The process groups ckptstore's collectives use.

DCP runs collectives while it plans, writes and reads. A Checkpointer's writer thread
runs them on a gloo group of its own, never the training group: two threads must not
interleave collectives on one group (NCCL would deadlock or mismatch). A synchronous
``save``/``load`` runs on the caller's thread and uses the caller's group when it can
carry CPU tensors, else a temporary gloo group.

``new_group`` is itself a collective over the whole world: every rank creates the
group at the same point (the Checkpointer's constructor, or the synchronous call).

The groups made here connect their pairs lazily (``TORCH_GLOO_LAZY_INIT=1`` while the
group is created; torch >= 2.8 reads it then, older releases ignore it): a gloo group
otherwise opens a socket to every other rank, ~2,000 per rank per group at 1,000
ranks, while ckptstore's collectives (gathers and scatters through rank 0, ring
all-reduces) talk to a few peers. ``CKPTSTORE_GLOO_LAZY=0`` in the environment keeps
them eager.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

import ckptstore.errors as errors
from ckptstore.errors import CkptStoreError

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def dedicated_gloo_group(
    process_group: dist.ProcessGroup | None = None,
) -> dist.ProcessGroup | None:
    """A new gloo group over the ranks of ``process_group`` (default: all), or None.

    For a Checkpointer, whose writer thread must not share a group with any other
    thread. Every rank of the world must call this (``new_group`` is a collective).
    Release it with :func:`release`.
    """
    if not is_distributed():
        return None
    ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
    with _lazy_connections():
        return cast(dist.ProcessGroup, dist.new_group(ranks=ranks, backend="gloo"))


@contextlib.contextmanager
def _lazy_connections() -> Iterator[None]:
    """Have a gloo group created meanwhile connect each pair at its first use."""
    if os.environ.get("CKPTSTORE_GLOO_LAZY", "1") == "0" or "TORCH_GLOO_LAZY_INIT" in os.environ:
        yield  # the user's choice, either way
        return
    os.environ["TORCH_GLOO_LAZY_INIT"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TORCH_GLOO_LAZY_INIT", None)


@contextlib.contextmanager
def caller_group(
    process_group: dist.ProcessGroup | None = None,
) -> Iterator[dist.ProcessGroup | None]:
    """The group a synchronous save/load uses on the caller's own thread.

    The caller's group itself when it runs on CPU tensors (gloo, or "cpu:gloo,..."):
    nothing else uses it from this thread meanwhile. Otherwise (NCCL only) a
    temporary gloo group over the same ranks, destroyed afterwards.
    """
    if not is_distributed():
        yield None
        return
    group = process_group or dist.distributed_c10d._get_default_group()
    if _supports_cpu(group):
        yield group
        return
    temp = dedicated_gloo_group(process_group)
    try:
        yield temp
    finally:
        release(temp)


def release(group: dist.ProcessGroup | None) -> None:
    """Destroy a group made here; never raises (the world may be gone already)."""
    if group is not None and is_distributed():
        with contextlib.suppress(Exception):
            dist.destroy_process_group(group)


def held_counts(tensors: Sequence[torch.Tensor]) -> list[int]:
    """The Python reference counts of ``tensors``; taken while no collective holds
    them, the baseline :func:`wait_released` waits to see again."""
    return [sys.getrefcount(t) for t in tensors]


def wait_released(tensors: Sequence[torch.Tensor], quiet: Sequence[int], timeout_s: float) -> bool:
    """Wait until no collective still holds ``tensors`` (their counts are back at
    ``quiet``, from :func:`held_counts`); False if ``timeout_s`` ran out first.

    Before the interpreter stops, after the last collective on tensors made here. In
    torch 2.13 a tensor's Python object gains a reference while C++ holds the tensor
    too, and loses it (under the GIL) on whichever thread drops the last C++ holder:
    for a gloo collective, a worker thread of the group, a moment *after* ``wait()``
    returned. Should that moment fall after the interpreter began to stop, taking the
    GIL ends the worker inside a noexcept frame and the process aborts ("terminate
    called without an active exception"; pytorch/pytorch#190489). Where torch keeps
    no such reference (older releases), the counts never rise and this returns at once.
    """
    deadline = time.monotonic() + timeout_s
    pause = 1e-4
    while any(now > was for now, was in zip(held_counts(tensors), quiet, strict=True)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)  # (the worker needs the GIL to let go)
        pause = min(pause * 2, 0.01)
    return True


def _supports_cpu(group: dist.ProcessGroup) -> bool:
    types = getattr(group, "_device_types", None)
    if types is not None:
        return torch.device("cpu") in types
    return bool(dist.get_backend(group) == "gloo")


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


def all_gather(value: T, group: dist.ProcessGroup | None) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank of ``group``."""
    if group is None:
        return [value]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def hand_out(
    values: dict[int, Any] | None, group: dist.ProcessGroup | None, *, receives: bool
) -> Any:
    """Rank 0 sends ``values[r]`` to each rank ``r`` it names, point to point; a rank
    that ``receives`` (exactly those rank 0 names) gets its own, the others None.

    Unlike torch's ``scatter_object_list`` (which pads every rank's value to the
    largest and sends it to every rank), each named rank is sent its value alone and
    no other rank anything: what a node-local save hands each disk's committer.
    """
    if group is None:
        return None if values is None else values.get(0)
    if rank(group) == 0:
        assert values is not None
        for r, value in values.items():
            if r != 0:
                dist.send_object_list([value], dst=dist.get_global_rank(group, r), group=group)
        return values.get(0)
    if not receives:
        return None
    box: list[Any] = [None]
    dist.recv_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def tree_broadcast(value: Any, members: list[int], group: dist.ProcessGroup) -> Any:
    """``members[0]``'s ``value`` on every rank of ``members`` (ranks of ``group``;
    every one of them calls this with the same list), sent point to point down a
    binomial tree: the first member sends it log2(len(members)) times, each other one
    receives it once and passes it on. No other rank takes part."""
    me = members.index(rank(group))
    if me:  # from the member that differs from this one in its highest bit
        box: list[Any] = [None]
        parent = members[me - (1 << (me.bit_length() - 1))]
        dist.recv_object_list(box, src=dist.get_global_rank(group, parent), group=group)
        value = box[0]
    children = [me + (1 << j) for j in range(me.bit_length(), len(members).bit_length())]
    for child in reversed([c for c in children if c < len(members)]):  # largest subtree first
        dst = dist.get_global_rank(group, members[child])
        dist.send_object_list([value], dst=dst, group=group)
    return value


def decide(fn: Callable[[], T], group: dist.ProcessGroup | None, *, what: str) -> T:
    """Rank 0 runs ``fn`` and every rank of ``group`` gets its result, errors included.

    If ``fn`` raises on rank 0, rank 0 re-raises it and the other ranks raise the same
    error when it is one of ckptstore's (a copy: a missing or damaged checkpoint is then
    one on every rank, with the same message and attributes), else a
    :class:`~ckptstore.errors.CkptStoreError` saying "rank 0 could not {what}" with its
    message. No rank is left waiting for a broadcast that never comes.
    """
    outcome: tuple[str, object, str] = ("ok", None, "")
    failure: Exception | None = None
    if rank(group) == 0:
        try:
            outcome = ("ok", fn(), "")
        except Exception as exc:
            failure = exc
            sent: object = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, CkptStoreError) and pickles(exc):
                sent = exc
            outcome = ("error", sent, type(exc).__name__)
    outcome = cast(tuple[str, object, str], broadcast(outcome, group))
    if outcome[0] == "error":
        if failure is not None:
            raise failure
        if isinstance(outcome[1], CkptStoreError):
            raise outcome[1]
        raise _error_class(outcome[2])(f"rank 0 could not {what}: {outcome[1]}")
    return cast(T, outcome[1])


def pickles(exc: BaseException) -> bool:
    """Whether ``exc`` can be sent to other ranks (collectives of objects pickle them)."""
    try:
        pickle.dumps(exc)
    except Exception:
        return False
    return True


def _error_class(name: str) -> type[CkptStoreError]:
    """ckptstore's error class called ``name`` (one whose first argument is the message),
    else :class:`CkptStoreError`."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, CkptStoreError):
        return cls
    return CkptStoreError
