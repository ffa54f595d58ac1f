"""Staging: copy a ``state_dict`` into host buffers that are allocated once and reused.

This is the only part of a save the training loop waits for. After the first save it is
one memory copy per tensor into an *arena* laid out for exactly this state (same keys,
dtypes and sizes), and nothing else: no allocation, no page faults, no pickling of
tensors. What the writer thread then saves is the arena, so the training loop may
change its tensors as soon as :meth:`StagingPool.stage` returns.

* CPU arenas are anonymous mmaps with ``MADV_HUGEPAGE``: on this kind of machine the
  first touch of fresh memory costs ~2.2 s/GiB in page faults with 4 KiB pages and
  ~0.47 s/GiB with huge pages; a reused arena copies at ~17 GB/s.
* With CUDA the arena is pinned (``cudaHostRegister``, exactly its size; see
  :mod:`ckptstore.engine.host_buffers`), so device-to-host copies run at full speed.
  They run on a staging stream per device, after what the caller had queued when it
  called save, and staging waits for exactly those copies (CUDA events), whichever
  thread copies: see :mod:`ckptstore.engine.device_copy`.
* Large tensors start on 4 KiB boundaries, so an uncompressed save writes them to disk
  straight from the arena with O_DIRECT.
* A pool holds at most ``slots`` arenas (one per save in flight) and at most
  ``max_bytes`` in total: when a new arena would not fit, staging waits for a save in
  flight to release one (backpressure) instead of allocating without bound.
* Non-tensor values are serialized here, on the caller's thread, and checked to load
  back with ``torch.load(weights_only=True)``: a value that could not be loaded safely
  fails the save at once with the key that holds it, not at restore time. A plain value
  the same as at the last save is not serialized again (:mod:`ckptstore.engine.values`).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from ckptstore.dcp.planner import SerializedValue
from ckptstore.engine import unchanged
from ckptstore.engine.arena import Arena
from ckptstore.engine.device_copy import CopyEngine, cuda_copy_engine
from ckptstore.engine.layout_cache import (
    Layout,
    LayoutCache,
    check_structure,
    flatten_checked,
    plan_layout,
    resolve_stateful,
)
from ckptstore.engine.values import ValueCache, serialize
from ckptstore.errors import CkptStoreError, UnsupportedStateError
from ckptstore.units import format_bytes

__all__ = [
    "CopyEngine",
    "PreparedState",
    "StagedState",
    "StagingPool",
    "check_structure",
    "flatten_checked",
]


@dataclass
class StagedState:
    """A state dict as the writer thread saves it: flat, with every leaf staged."""

    flat: dict[str, Any]  # fqn -> staged tensor / DTensor / SerializedValue
    mappings: dict[str, Any]  # DCP's flatten mappings of the original nesting
    arena: Arena | None
    tensor_bytes: int
    value_bytes: int
    copy_s: float
    wait_s: float = 0.0  # time spent waiting for an arena (backpressure)
    layout: Layout | None = None  # what it was staged with (None: staged in place)
    number: int = 0  # which of this pool's saves it is (1, 2, ...)
    skipped: frozenset[str] = frozenset()  # tensors not staged: another rank writes them
    # With track_versions: each large tensor's (version counter, data pointer) when
    # prepared (Layout.large)
    versions: dict[str, tuple[int, int] | None] | None = None
    # With hash_pool: tensors not copied, the arena holding their bytes already
    found: unchanged.Found = field(default_factory=unchanged.Found)


@dataclass
class PreparedState:
    """A state dict flattened and planned, with its arena reserved, not yet copied.

    Made on the thread that owns the state (``Stateful.state_dict()`` may run
    collectives on the training group there); copied later, on any thread.
    """

    layout: Layout
    objs: list[Any]  # the flattened entries, in ``layout.fqns`` order
    mappings: dict[str, Any]
    arena: Arena | None
    tensor_bytes: int
    wait_s: float
    # Python values, serialized on the thread that owns the state (it may change them
    # as soon as prepare returns, even if the tensors are copied later elsewhere).
    values: dict[str, SerializedValue]
    # What the copy engine noted on the caller's thread (CUDA: an event per device on
    # the caller's current stream); None when the state is on the CPU only.
    engine: CopyEngine | None = None
    marks: Any = None
    number: int = 0  # which of its pool's saves it is
    versions: dict[str, tuple[int, int] | None] | None = None  # StagingPool.track_versions


class StagingPool:
    """Arenas for up to ``slots`` saves in flight, within ``max_bytes`` if given.

    ``stage`` runs on the thread that holds the state (the training loop); ``release``
    on the writer thread once the save no longer needs the arena.

    ``copy_engine`` copies device tensors into the arenas (default: CUDA's, for states
    with tensors on a GPU; CPU tensors are copied directly). A test passes a fake one.
    """

    def __init__(
        self,
        *,
        slots: int = 1,
        pin_memory: bool | None = None,
        max_bytes: int | None = None,
        copy_engine: CopyEngine | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._slots = slots
        self._pin = pin_memory  # None: pin the arenas of states with tensors on a GPU
        self._max_bytes = max_bytes
        self._free: list[Arena] = []
        self._busy: list[Arena] = []
        self._cond = threading.Condition()
        self._closed = False
        self._layouts = LayoutCache()
        self._values = ValueCache()  # what the last save's plain values serialized to
        self.copy_engine = copy_engine
        # Incremental saves (dcp.incremental): note the version counter and data pointer
        # of each tensor too large to pack (Layout.large) on the caller's thread; one
        # whose counter moved on the same storage since the last save is written without
        # being hashed (~0.65 us a tensor)
        self.track_versions = False
        # Set: what an arena holds is hashed in place, not copied (engine.unchanged;
        # closed with this); a set: trust_version_counters, but for the tensors in it
        self.hash_pool: Executor | None = None
        self.untrusted: set[str] | None = None
        self._prepared = 0  # saves prepared so far
        # What this rank wrote of the last save that committed: (its layout, its number,
        # the tensors it wrote); see note_written().
        self._written: tuple[Layout, int, frozenset[str]] | None = None

    def find_unchanged(self, threads: int, trust: bool) -> None:
        """Incremental saves: note version counters, and hash what an arena may hold
        already instead of copying it (engine.unchanged; ``trust``: the
        ``trust_version_counters`` option). Closed with this pool."""
        self.track_versions = True
        # the caller waits for these hashes: its priority, not behind a save's jobs
        self.hash_pool = ThreadPoolExecutor(threads, "ckptstore-stage-hash")
        self.untrusted = set() if trust else None

    @property
    def allocated_bytes(self) -> int:
        """Host memory held by staging arenas right now (in use or kept for reuse)."""
        with self._cond:
            return sum(a.nbytes for a in self._free + self._busy)

    @property
    def pinned_bytes(self) -> int:
        """Of :attr:`allocated_bytes`, how much is pinned (page-locked for CUDA copies)."""
        with self._cond:
            return sum(a.nbytes for a in self._free + self._busy if a.pinned)

    def stage(self, state_dict: dict[str, Any], *, timeout_s: float | None = None) -> StagedState:
        """Copy ``state_dict`` into an arena. The caller may mutate its state afterwards."""
        return self.copy(self.prepare(state_dict, timeout_s=timeout_s))

    def prepare(
        self, state_dict: dict[str, Any], *, timeout_s: float | None = None
    ) -> PreparedState:
        """Flatten and plan ``state_dict`` and reserve its arena (waits for one if needed).

        Call on the thread that owns the state. Follow with :meth:`copy` (any thread)
        or :meth:`discard`.
        """
        layout, objs = self._layouts.plan(_resolve(state_dict))
        with self._cond:
            self._prepared += 1
            number = self._prepared
        values = self._values.serialize_all(
            {fqn: objs[i] for i, fqn in zip(layout.value_pos, layout.value_fqns, strict=True)}
        )
        start = time.perf_counter()
        arena = None
        if layout.tensor_pos:
            arena = self._acquire(
                layout.signature, layout.offsets, layout.total, timeout_s, _gpu_of(layout)
            )
        wait_s = time.perf_counter() - start
        engine = self.copy_engine
        if engine is None and layout.cuda:
            engine = cuda_copy_engine()
        marks = None
        if engine is not None and layout.tensor_pos:
            try:
                marks = engine.mark(sorted({m[2] for m in layout.metas}, key=str))
            except BaseException:
                if arena is not None:
                    self._give_back(arena)
                raise
        versions = None
        if self.track_versions:
            # Of the tensors too large to pack only: a small one is hashed whatever its
            # counter says (it is packed, or costs no more to hash than to look up), and
            # reading 40,000 counters took 26 ms of the caller's time
            fqns, pos = layout.tensor_fqns, layout.tensor_pos
            versions = {fqns[k]: _version(_local(objs[pos[k]])) for k in layout.large}
        return PreparedState(
            layout,
            objs,
            dict(layout.mappings),
            arena,
            layout.total,
            wait_s,
            values,
            engine,
            marks,
            number,
            versions,
        )

    def copy(self, prep: PreparedState) -> StagedState:
        """Copy a prepared state into its arena; on failure the arena is given back."""
        skip = self._skip_for(prep)
        try:
            start = time.perf_counter()
            found = unchanged.Found()
            if (arena := prep.arena) is not None:
                objs, pos = prep.objs, prep.layout.tensor_pos
                state = (prep.layout, lambda k: _local(objs[pos[k]]), prep.versions, skip)
                pool = self.hash_pool if prep.engine is None else None
                staged, found = unchanged.copy(
                    arena, state, pool, lambda n: _copy(prep, skip, n), self.untrusted
                )
            else:
                staged = _copy(prep, skip)
            staged.update(prep.values)
            value_bytes = sum(len(v.data) for v in prep.values.values())
            copy_s = time.perf_counter() - start
        except BaseException:
            self.discard(prep)
            raise
        arena, prep.arena = prep.arena, None
        return StagedState(
            staged,
            prep.mappings,
            arena,
            prep.tensor_bytes,
            value_bytes,
            copy_s,
            prep.wait_s,
            prep.layout,
            prep.number,
            skip,
            prep.versions,
            found,
        )

    def note_hashed(self, staged: StagedState, hashed: dict[str, tuple[str, int]]) -> None:
        """The writer hashed these tensors' staged bytes (fqn -> digest, bytes): the
        next save into the same arena need not copy them if they are unchanged."""
        if self.hash_pool is not None and staged.arena is not None and staged.layout is not None:
            staged.arena.held.note(staged.layout, staged.versions or {}, hashed)

    def note_written(self, staged: StagedState, written: frozenset[str]) -> None:
        """The save of ``staged`` committed, and of its tensors this rank wrote
        ``written`` (DCP gave the rest to ranks holding the same data: replicas under
        DDP or HSDP). The next save, if it is the very next one and has the same layout,
        stages only those: every rank then holds what it wrote last time, so all of it
        is still held by someone. A rank for which it is not the very next one (the
        save before it had not committed when it was copied) stages everything, which
        is always safe. The coordinator checks it anyway (CkptStorageWriter)."""
        if staged.layout is not None and not staged.layout.tied:
            self._written = (staged.layout, staged.number, written)

    def _skip_for(self, prep: PreparedState) -> frozenset[str]:
        """The tensors of ``prep`` not to stage (see note_written)."""
        last = self._written
        if last is None or last[0] is not prep.layout or last[1] != prep.number - 1:
            return frozenset()
        return frozenset(f for f in prep.layout.tensor_fqns if f not in last[2])

    def discard(self, prep: PreparedState) -> None:
        """Give back the arena of a prepared state that will not be copied."""
        if prep.arena is not None:
            arena, prep.arena = prep.arena, None
            self._give_back(arena)

    def release(self, staged: StagedState) -> None:
        """The save is done with ``staged``; its arena may be reused. What staging
        trusted unchanged is settled first where the save did not check it (abandoned
        before it was written): a tensor found changed is not trusted again."""
        try:
            staged.found.settle()
        finally:
            if staged.arena is not None:
                arena, staged.arena = staged.arena, None
                self._give_back(arena)

    def close(self) -> None:
        """Drop every arena not in use; later ``stage`` calls raise."""
        with self._cond:
            self._closed = True
            free, self._free = self._free, []
            self._cond.notify_all()
        self._values.clear()
        for arena in free:
            arena.close()
        if self.hash_pool is not None:
            self.hash_pool.shutdown(wait=True)

    # ---- internals ------------------------------------------------------------------
    def _acquire(
        self,
        signature: tuple[Any, ...],
        offsets: tuple[int, ...],
        nbytes: int,
        timeout_s: float | None,
        device: int | None = None,
    ) -> Arena:
        if self._max_bytes is not None and nbytes > self._max_bytes:
            raise CkptStoreError(
                f"staging this state needs {format_bytes(nbytes)} of host memory, more than the "
                f"staging budget of {format_bytes(self._max_bytes)}: raise max_staging_bytes"
            )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise CkptStoreError("the staging pool is closed")
                for arena in self._free:
                    if arena.signature == signature:
                        self._free.remove(arena)
                        self._busy.append(arena)
                        return arena
                # Make room: drop arenas made for another layout before waiting.
                held = sum(a.nbytes for a in self._free + self._busy)
                while self._free and (
                    len(self._free) + len(self._busy) >= self._slots
                    or (self._max_bytes is not None and held + nbytes > self._max_bytes)
                ):
                    dropped = self._free.pop(0)
                    held -= dropped.nbytes
                    dropped.close()
                fits = self._max_bytes is None or held + nbytes <= self._max_bytes
                if len(self._busy) < self._slots and fits:
                    # Pinning a CPU state's arena would only create a CUDA context on
                    # the thread's current device (cuda:0 on every rank).
                    pin = device is not None if self._pin is None else self._pin
                    arena = Arena(signature, offsets, nbytes, pin, device)
                    self._busy.append(arena)
                    return arena
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("timed out waiting for a staging buffer")
                self._cond.wait(remaining)

    def _give_back(self, arena: Arena) -> None:
        with self._cond:
            closed = self._closed
            if arena in self._busy:
                self._busy.remove(arena)
                if not closed:
                    self._free.append(arena)
            self._cond.notify_all()
        if closed:
            arena.close()


def _gpu_of(layout: Layout) -> int | None:
    """A GPU the state lives on (its arena is pinned through that device's context), or
    None: then the thread's current device, never cuda:0 by default on another's rank."""
    if layout.cuda:
        for meta in layout.metas:
            if meta[2].type == "cuda":
                return int(meta[2].index or 0)
    return None


def _resolve(state_dict: Any) -> dict[str, Any]:
    if not isinstance(state_dict, dict):
        name = type(state_dict).__name__
        hint = (
            ": pass a dict of them, e.g. {'model': model, 'optim': optimizer} (each one's "
            "state_dict() is saved)"
            if callable(getattr(state_dict, "state_dict", None))
            else ""
        )
        raise UnsupportedStateError(f"state_dict must be a dict, got {name}{hint}")
    return resolve_stateful(state_dict)


def _version(t: torch.Tensor) -> tuple[int, int] | None:
    """``t``'s (version counter, data pointer); None for a tensor without a counter
    (made under ``torch.inference_mode()``)."""
    try:
        return (t._version, t.data_ptr())
    except RuntimeError:
        return None


def _local(t: Any) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _copy(
    prep: PreparedState, skip: frozenset[str] = frozenset(), nocopy: frozenset[int] = frozenset()
) -> dict[str, Any]:
    """Copy the tensors of ``prep`` (but those in ``skip``: only for layouts without
    ties; and the slots in ``nocopy``, which hold their bytes already) into its arena;
    fqn -> staged tensor / DTensor (all but ``skip``'s).

    Returns once every byte is in the arena (the copy engine's ``complete``).
    """
    layout, objs, arena = prep.layout, prep.objs, prep.arena
    if not layout.tensor_pos:
        return {}
    assert arena is not None
    tensors = [objs[i] for i in layout.tensor_pos] if layout.value_pos else objs
    sources = tensors
    if layout.is_dtensor is not None:
        sources = [
            t._local_tensor if d else t for t, d in zip(tensors, layout.is_dtensor, strict=True)
        ]
    views = arena.views_for(layout)
    per_slot = len(layout.first) != len(sources)  # ties, or empty tensors (no slot)
    firsts = [sources[k] for k in layout.first] if per_slot else sources
    dsts = arena.dsts
    fqns = layout.tensor_fqns
    if skip or nocopy:  # firsts and dsts are per slot, the rest per tensor (empty: no slot)
        assert not (skip and layout.tied), "skipping needs a layout without ties"
        skipped = {s for f, s in zip(fqns, layout.slots, strict=True) if f in skip}
        slots = [s for s in range(len(dsts)) if s not in skipped and s not in nocopy]
        firsts = [firsts[s] for s in slots]
        dsts = [dsts[s] for s in slots]
    if skip:
        keep = [k for k, f in enumerate(fqns) if f not in skip]
        fqns = tuple(fqns[k] for k in keep)
        views = [views[k] for k in keep]
        tensors = [tensors[k] for k in keep]
    with torch.no_grad():
        if prep.engine is not None:
            prep.engine.complete(prep.engine.submit(dsts, firsts, prep.marks))
        elif firsts:
            torch._foreach_copy_(dsts, firsts)
    staged: dict[str, Any] = dict(zip(fqns, views, strict=True))
    if layout.is_dtensor is not None:
        is_dtensor = layout.is_dtensor
        if skip:
            is_dtensor = tuple(
                d for f, d in zip(layout.tensor_fqns, is_dtensor, strict=True) if f not in skip
            )
        for fqn, t, view, d in zip(fqns, tensors, views, is_dtensor, strict=True):
            if d:
                staged[fqn] = DTensor(view, t._spec, requires_grad=False)  # type: ignore[no-untyped-call, call-arg]
    return staged


def stage_in_place(state_dict: dict[str, Any]) -> StagedState:
    """Stage without copying tensors: for a synchronous save, where the caller waits.

    Values are still serialized (and checked) here; CPU tensors are saved from where
    they are. A state with tensors on a GPU is staged as an asynchronous save stages it
    (one pinned buffer of exactly its size, copies on a staging stream per device),
    rather than one pageable ``.cpu()`` copy per tensor; the buffer is unpinned and freed
    when the returned state is dropped.
    """
    start = time.perf_counter()
    resolved = _resolve(state_dict)
    layout, objs = plan_layout(resolved)
    if layout.cuda:
        return StagingPool(pin_memory=True).stage(resolved)
    staged = {fqn: objs[i] for fqn, i in zip(layout.tensor_fqns, layout.tensor_pos, strict=True)}
    value_bytes = 0
    for i, fqn in zip(layout.value_pos, layout.value_fqns, strict=True):
        staged[fqn] = serialize(fqn, objs[i])
        value_bytes += len(staged[fqn].data)
    return StagedState(
        staged, dict(layout.mappings), None, layout.total, value_bytes, time.perf_counter() - start
    )
