"""Device-to-host copies for staging, behind a seam small enough to fake on a CPU.

A :class:`CopyEngine` copies tensors that live on an accelerator into host buffers.
The staging pool calls it in this order, for one save::

    marks = engine.mark(devices)             the thread that owns the state (the caller
                                             of save), while it prepares the save
    ticket = engine.submit(dsts, srcs, marks)  any thread: the caller's, or the writer
                                             thread with ``block_until_staged=False``
    engine.complete(ticket)                  the thread that submitted; returns once
                                             every byte is in host memory

``mark`` captures "everything the caller has queued so far" (on the caller's current
streams), so the copies see the state as it was when save was called; ``complete`` is
what ``staged`` waits for: a staged state is never read, and the caller never told it
may change its tensors, before the copies have landed.

:class:`CudaCopyEngine` is the real one. Per device the state lives on, it records an
event on the caller's current stream, copies on a staging stream of its own that waits
on that event, records a second event after the copies and waits for exactly those
events: never ``torch.cuda.synchronize()``, which waits for one device only (the calling
thread's current one, cuda:0 in a thread that never chose) and drains its whole queue.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = ["CopyEngine", "CudaCopyEngine", "cuda_copy_engine", "plain_source"]


class CopyEngine(Protocol):
    """Copies from device tensors into host tensors; see the module docstring for the order."""

    def mark(self, devices: Sequence[torch.device]) -> Any:
        """On the thread that owns the state: note what its streams have queued so far."""
        ...

    def submit(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor], marks: Any) -> Any:
        """Start copying ``srcs[i]`` into ``dsts[i]`` (host) once ``marks`` are reached."""
        ...

    def complete(self, ticket: Any) -> None:
        """Return once every copy of ``ticket`` is in host memory."""
        ...


def plain_source(src: torch.Tensor) -> torch.Tensor:
    """``src`` with lazy conjugate / negative bits resolved (``copy_`` keeps them lazy)."""
    if src.is_conj():
        src = src.resolve_conj()
    if src.is_neg():
        src = src.resolve_neg()
    return src


@dataclass
class _Ticket:
    done: list[Any] = field(default_factory=list)  # one CUDA event per device copied from
    # The sources (and resolved temporaries) stay referenced until the copies are done,
    # so the caching allocator cannot hand their memory to new work while the staging
    # stream still reads it (which record_stream would otherwise have to prevent).
    keep: list[torch.Tensor] = field(default_factory=list)


class CudaCopyEngine:
    """Copies on one staging stream per device, ordered after the caller's stream."""

    def __init__(self) -> None:
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def mark(self, devices: Sequence[torch.device]) -> dict[int, torch.cuda.Event]:
        marks: dict[int, torch.cuda.Event] = {}
        for device in devices:
            if device.type != "cuda":
                continue
            index = _index(device)
            if index in marks:
                continue
            with torch.cuda.device(index):
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(torch.cuda.current_stream(index))
            marks[index] = event
        return marks

    def submit(
        self, dsts: list[torch.Tensor], srcs: list[torch.Tensor], marks: dict[int, Any] | None
    ) -> _Ticket:
        ticket = _Ticket()
        by_device: dict[int, list[int]] = {}
        host: list[int] = []
        for k, src in enumerate(srcs):
            if src.device.type == "cuda":
                by_device.setdefault(_index(src.device), []).append(k)
            else:
                host.append(k)
        for index, ks in by_device.items():
            # The device is set here, in whichever thread submits, so that nothing lands
            # on (or creates a context on) the thread's default cuda:0.
            with torch.cuda.device(index):
                stream = self._stream(index)
                try:
                    self._submit_on(
                        stream, index, [dsts[k] for k in ks], [srcs[k] for k in ks], marks, ticket
                    )
                except BaseException:
                    # Copies already queued still write into the buffers: let them land
                    # before the caller hands the buffers to another save.
                    stream.synchronize()
                    self.complete(ticket)
                    raise
        for k in host:
            dsts[k].copy_(plain_source(srcs[k]))
        return ticket

    def _submit_on(
        self,
        stream: torch.cuda.Stream,
        index: int,
        dsts: list[torch.Tensor],
        srcs: list[torch.Tensor],
        marks: dict[int, Any] | None,
        ticket: _Ticket,
    ) -> None:
        mark = marks.get(index) if marks else None
        if mark is None:  # not marked by the caller: order after its stream as of now
            mark = torch.cuda.Event()  # type: ignore[no-untyped-call]
            mark.record(torch.cuda.current_stream(index))
        stream.wait_event(mark)
        with torch.cuda.stream(stream):
            for dst, src in zip(dsts, srcs, strict=True):
                src = plain_source(src)
                ticket.keep.append(src)
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(stream)
        ticket.done.append(done)

    def complete(self, ticket: _Ticket) -> None:
        for event in ticket.done:
            event.synchronize()
        ticket.done.clear()
        ticket.keep.clear()

    def _stream(self, index: int) -> torch.cuda.Stream:
        with self._lock:
            stream = self._streams.get(index)
            if stream is None:
                stream = self._streams[index] = torch.cuda.Stream(device=index)  # type: ignore[no-untyped-call]
            return stream


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


_shared: CudaCopyEngine | None = None
_shared_lock = threading.Lock()


def cuda_copy_engine() -> CudaCopyEngine:
    """The process's CUDA copy engine: one staging stream per device, made on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = CudaCopyEngine()
        return _shared
