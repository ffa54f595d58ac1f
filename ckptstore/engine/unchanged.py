"""Incremental saves: a tensor its staging arena already holds is not copied again
(issue 19).

A save into a reused arena overwrites every byte of it, although with frozen weights
most of those bytes are the ones it already holds. So each arena remembers, per large
slot, the digest of the bytes it holds (xxh3-128, as :mod:`ckptstore.dcp.hashing`
hashes items: the writer thread hashed them during the save that copied them) and the
version counter and data pointer of the tensor they were copied from.

At the next save into that arena, a tensor whose version counter has not moved on the
same storage is not copied if its bytes hash to the slot's digest; the writer takes the
digest as given instead of hashing the arena again. A tensor whose counter moved, a
small one, one on a GPU, and a non-contiguous one are copied without this. The hash is
the truth; the counter says only which tensors are worth hashing. It is taken while the
caller waits (as it waits for the copy this replaces: one read of the bytes instead of a
read and a write), on the hash pool and on the caller's thread beside it
(:mod:`ckptstore.dcp.hashing`: the one that waits runs queued jobs itself). A different digest (a write that bypassed the counter, through
``.data`` or a raw pointer) is copied, and that slot is never trusted (below).

With ``trust_version_counters`` (``CheckpointerConfig``, off by default), a slot whose
hash has matched with its counter unmoved is trusted (:attr:`Held.trusted`) for as long
as the tensor keeps that same storage (a state built anew each save, whose tensors are
new ones that may reuse an old address with a counter at 0 again, is never trusted):
from then on the caller does not wait for its hash. It is hashed where it lies once
the copy of the rest is done (as ``save`` returns), and the save commits only once that
hash matches
(:meth:`Found.confirm`, from the writer). If it differs, the bytes at the save cannot be
known: the tensor changed behind its counter (``.data``, a raw pointer) before the save,
or changed after it returned, before its hash (whether or not the counter moved since:
a change before the save and another after it look alike). So that save fails with
:class:`~ckptstore.errors.StateChangedError` naming the tensors, stale bytes are never
committed, and the tensors are never trusted again by that checkpointer (the pool's
``untrusted`` set, shared by its arenas). A tensor whose in-place hash ever differs is
never trusted either.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptstore.dcp.hashing import start_hashing
from ckptstore.dcp.raw import tensor_bytes
from ckptstore.errors import StateChangedError

log = logging.getLogger("ckptstore")

# Below this a tensor is copied: its copy costs about what starting a hash job does.
MIN_BYTES = 256 << 10


@dataclass
class Held:
    """What one arena holds: slot -> (digest of its bytes, (version counter, data
    pointer) of the tensor they came from). Only large slots are ever noted."""

    slots: dict[int, tuple[str, tuple[int, int]]] = field(default_factory=dict)
    # slot -> the storage whose hash matched it: while the tensor has it, hashed later
    trusted: dict[int, weakref.ref[Any]] = field(default_factory=dict)
    # Of the arena's layout (an arena serves one: its signature names every tensor)
    index: dict[str, int] | None = None  # fqn -> tensor position
    tied: dict[int, list[str]] | None = None  # slot -> its tensors, where several share it

    def forget(self, slot: int | None = None) -> None:
        """The slot (None: every slot) is copied into: what it held is not known."""
        if slot is None:
            self.slots.clear()
            self.trusted.clear()
        else:
            self.slots.pop(slot, None)
            self.trusted.pop(slot, None)

    def names(self, layout: Any, slot: int) -> list[str]:
        """The tensors whose bytes ``slot`` holds (more than one where tied)."""
        if not layout.tied:
            return [layout.tensor_fqns[layout.first[slot]]]
        if self.tied is None:
            self.tied = {}
            for f, s in zip(layout.tensor_fqns, layout.slots, strict=True):
                self.tied.setdefault(s, []).append(f)
        return self.tied[slot]

    def note(
        self,
        layout: Any,
        versions: dict[str, tuple[int, int] | None],
        hashed: dict[str, tuple[str, int]],
    ) -> None:
        """The writer hashed these tensors' bytes in this arena (fqn -> digest, bytes;
        an item that is a tensor's whole staged bytes). Call before the arena is reused."""
        if self.index is None:
            self.index = {f: k for k, f in enumerate(layout.tensor_fqns)}
        for fqn, (digest, nbytes) in hashed.items():
            k = self.index.get(fqn)
            if k is None or layout.nbytes[k] != nbytes or nbytes < MIN_BYTES:
                continue
            slot, version = layout.slots[k], versions.get(fqn)
            if slot >= 0 and version is not None:
                self.slots[slot] = (digest, version)


@dataclass
class Later:
    """Trusted tensors (:attr:`Held.trusted`), hashed where they lie from :meth:`begin`
    (once the copy of the rest is done) while the save goes on."""

    held: Held
    candidates: list[tuple[int, str]]  # (slot, the digest it holds)
    tensors: list[torch.Tensor]
    versions: list[tuple[int, int]]  # each one's counter and pointer at the save
    names: dict[int, list[str]]
    untrusted: set[str]  # the pool's: tensors never to trust again
    pool: Executor
    result: Callable[[], list[str]] | None = None  # None: not started
    jobs: list[Future[bool]] = field(default_factory=list)

    def begin(self) -> None:
        """Start the hashes (once the copy is done: copies and hashes running together
        on two cores slowed both, and the caller waits for the copy)."""
        if self.result is None:
            self.result, self.jobs = start_hashing(
                [tensor_bytes(t) for t in self.tensors], self.pool
            )

    def confirm(self) -> None:
        """Wait for the hashes; raise StateChangedError where one differs (module doc).
        Writer thread."""
        self.begin()
        assert self.result is not None
        try:
            got = self.result()
        except BaseException:
            futures_wait(self.jobs)
            raise
        changed: list[str] = []
        moved = False
        for (slot, digest), now, t, version in zip(
            self.candidates, got, self.tensors, self.versions, strict=True
        ):
            if now != digest:
                self.held.forget(slot)
                self.untrusted.update(self.names[slot])
                changed += self.names[slot]
                moved = moved or (t._version, t.data_ptr()) != version
        if changed:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            its, it, them = ("its", "it is", "it") if len(changed) == 1 else ("their", "they are", "them")  # fmt: skip
            how = (
                f"changed while this save was written ({its} version counter moved since "
                "save() returned: with trust_version_counters=True a tensor found unchanged "
                "must not change until the save is durable, so wait for pending.committed "
                "first; a write through .data before the save looks the same)"
                if moved
                else f"changed without {its} version counter moving (a write through .data or "
                "a raw pointer, before this save or while it was written)"
            )
            raise StateChangedError(
                f"{', '.join(changed[:3])}{more} {how}, after earlier saves found {them} "
                f"unchanged (trust_version_counters=True): {its} bytes at this save cannot be "
                "known, so it is not committed; the checkpoints before it are intact, and from "
                f"now on {it} hashed before each save returns",
                changed,
            )


@dataclass
class Found:
    """What staging did not copy, the arena holding it already."""

    verified: dict[str, tuple[str, int]] = field(default_factory=dict)  # fqn -> (digest, bytes)
    later: Later | None = None  # of those, the ones not hashed yet

    def confirm(self) -> None:
        """Before the save commits: raise if what was trusted had changed (Later). Once:
        a second call does nothing."""
        if self.later is not None:
            later, self.later = self.later, None
            later.confirm()

    def settle(self) -> None:
        """:meth:`confirm`, for a save that failed or was abandoned before it did: a
        tensor found changed is not trusted again (logged), and no hash of the save
        still reads the state; the save's own error is the one raised."""
        try:
            self.confirm()
        except StateChangedError as exc:
            log.warning("hashing them after a failed save: %s", exc)
        except Exception:  # a hash that failed: the tensors are hashed again next save
            pass


@dataclass
class Check:
    """Tensors being hashed where they lie (:func:`start`): ``now`` while the caller
    waits, ``later`` (trusted) after."""

    candidates: list[tuple[int, str]]  # (slot, the digest it holds)
    result: Callable[[], list[str]]
    jobs: list[Future[bool]]
    names: dict[int, list[str]]  # slot -> its tensors (more than one where tied)
    tensors: list[torch.Tensor]
    untrusted: set[str] | None  # the pool's (None: counters are never trusted)
    later: Later | None = None

    def finish(self, held: Held) -> tuple[Found, frozenset[int]]:
        """Wait for the hashes of ``now``: what the arena holds already (fqn -> (digest,
        bytes), and the trusted ones to confirm), and their slots. A slot whose tensor
        differs is forgotten by ``held`` (it is copied into), and never trusted."""
        try:
            got = self.result()
        except Exception:
            futures_wait(self.jobs)
            got = [""] * len(self.candidates)  # a hash that failed: copy them all
        except BaseException:  # Ctrl-C: the caller's copy fails, nothing was copied
            futures_wait(self.jobs)
            raise
        found = Found(later=self.later)
        same = []
        untrusted = self.untrusted
        for (slot, digest), now, t in zip(self.candidates, got, self.tensors, strict=True):
            names = self.names[slot]
            if now and now == digest:
                found.verified.update((f, (digest, t.nbytes)) for f in names)
                same.append(slot)
                if untrusted is not None and untrusted.isdisjoint(names):
                    held.trusted[slot] = weakref.ref(t.untyped_storage())
            else:
                held.forget(slot)
                if now and untrusted is not None:
                    untrusted.update(names)  # changed behind its counter
        if (later := self.later) is not None:
            for (slot, digest), t in zip(later.candidates, later.tensors, strict=True):
                found.verified.update((f, (digest, t.nbytes)) for f in later.names[slot])
                same.append(slot)
        return found, frozenset(same)


def copy(
    arena: Any,
    state: tuple[
        Any, Callable[[int], torch.Tensor], dict[str, tuple[int, int] | None] | None, frozenset[str]
    ],
    pool: Executor | None,
    copy_all_but: Callable[[frozenset[int]], dict[str, Any]],
    trust: set[str] | None = None,
) -> tuple[dict[str, Any], Found]:
    """Stage a state into ``arena`` (the stager's; ``arena.held`` says what it holds).
    ``state``: its layout, a function giving its k-th local tensor, the tensors' version
    counters, and the tensors not staged (``skip``). Hashes what the arena may hold
    already, then ``copy_all_but(slots)`` copies the rest. (Hashing first: copies run
    on torch's threads, which spin a while after each copy and would slow the hashes
    down; the trusted ones are hashed once the copy is done, for the same reason.)
    ``trust``: None, or the tensors never to trust (trust_version_counters; module
    doc). Returns what ``copy_all_but``
    does, and what was not copied (the arena holds it). Without a ``pool`` (not an
    incremental save, or a state a device's copy engine copies) everything is copied,
    and forgotten."""
    if pool is None:
        arena.held.forget()
        return copy_all_but(frozenset()), Found()
    check = start(arena.held, *state, pool, trust)
    if check is None:
        return copy_all_but(frozenset()), Found()
    found, same = check.finish(arena.held)
    staged = copy_all_but(same)
    if found.later is not None:
        found.later.begin()
    return staged, found


def start(
    held: Held,
    layout: Any,
    tensor: Callable[[int], torch.Tensor],
    versions: dict[str, tuple[int, int] | None] | None,
    skip: frozenset[str],
    pool: Executor,
    trust: set[str] | None = None,
) -> Check | None:
    """Start hashing, on ``pool``, the tensors of ``layout`` (``tensor(k)``: the k-th,
    local) whose arena slot ``held`` knows and whose version counter has not moved on
    the same storage since (``versions``: now), those ``held`` trusts after the rest
    (:class:`Later`; only where ``trust``, the tensors not to trust, is given); forget
    every other slot ``held`` knows that is copied this time (all of them but
    ``skip``'s)."""
    if not held.slots:
        return None
    if versions is None or layout.cuda:
        held.forget()
        return None
    now: list[tuple[int, str, torch.Tensor]] = []
    later: list[tuple[int, str, torch.Tensor]] = []
    names: dict[int, list[str]] = {}  # slot -> its tensors
    for slot, (digest, version) in list(held.slots.items()):
        k = layout.first[slot]
        fqn, t = layout.tensor_fqns[k], tensor(k)
        if fqn in skip:
            continue  # not copied: its slot keeps its bytes
        names[slot] = held.names(layout, slot)
        if not (
            # every tensor of the slot: entries that share memory may each have a counter
            all(versions.get(f) == version for f in names[slot])
            and t.device.type == "cpu"
            and t.is_contiguous()
            and not t.is_conj()
            and not t.is_neg()
        ):
            held.forget(slot)
            continue
        ref = held.trusted.get(slot)
        trusted = (
            trust is not None
            and ref is not None
            and ref() is t.untyped_storage()  # the storage whose hash matched
            and trust.isdisjoint(names[slot])
        )
        (later if trusted else now).append((slot, digest, t))
    if not now and not later:
        return None
    result, jobs = start_hashing([tensor_bytes(t) for _, _, t in now], pool)
    got = [(s, d) for s, d, _ in now]
    check = Check(got, result, jobs, names, [t for *_, t in now], trust)
    if later:  # hashed once the copy is done (Later.begin)
        assert trust is not None
        at_save = [held.slots[s][1] for s, _, _ in later]  # = versions now
        got = [(s, d) for s, d, _ in later]
        tensors = [t for *_, t in later]
        check.later = Later(held, got, tensors, at_save, names, trust, pool)
    return check
