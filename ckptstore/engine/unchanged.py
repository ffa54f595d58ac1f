"""Incremental saves: a tensor its staging arena already holds is not copied again
(issue 19).

A save into a reused arena overwrites every byte of it, although with frozen weights
most of those bytes are the ones it already holds. So each arena remembers, per large
slot, the digest of the bytes it holds (xxh3-128, as :mod:`ckptstore.dcp.incremental`
hashes items: the writer thread hashed them during the save that copied them) and the
version counter and data pointer of the tensor they were copied from.

At the next save into that arena, a tensor whose version counter has not moved on the
same storage is hashed where it lies, on the codec pool, while the caller waits, as it
waits for the copy this replaces: one read of its bytes instead of a read and a write.
If the digest is the one the arena holds, the bytes are already there: the tensor is
not copied, and the writer takes the digest as given instead of hashing the arena
again. If it differs (a change that bypassed the counter, through ``.data`` or a raw
pointer), the tensor is copied, as any other. The hash is the truth, and it is taken
while the caller waits, so a change made after staging returns cannot reach the save.
A tensor whose counter moved, a small one, one on a GPU, and a non-contiguous one are
copied without this.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptstore.dcp.incremental import start_hashing
from ckptstore.dcp.writer import tensor_bytes

# Below this a tensor is copied: its copy costs about what starting a hash job does.
MIN_BYTES = 256 << 10


@dataclass
class Held:
    """What one arena holds: slot -> (digest of its bytes, (version counter, data
    pointer) of the tensor they came from). Only large slots are ever noted."""

    slots: dict[int, tuple[str, tuple[int, int]]] = field(default_factory=dict)
    # Of the arena's layout (an arena serves one: its signature names every tensor)
    index: dict[str, int] | None = None  # fqn -> tensor position
    tied: dict[int, list[str]] | None = None  # slot -> its tensors, where several share it

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
class Check:
    """Tensors being hashed where they lie (:func:`start`)."""

    candidates: list[tuple[int, str]]  # (slot, the digest it holds)
    result: Callable[[], list[str]]
    jobs: list[Future[str]]
    names: dict[int, list[str]]  # slot -> its tensors (more than one where tied)
    nbytes: list[int]

    def finish(self, held: Held) -> tuple[dict[str, tuple[str, int]], frozenset[int]]:
        """Wait for the hashes: fqn -> (digest, bytes) of the tensors whose bytes the
        arena holds already, and their slots. A slot whose tensor differs is forgotten
        by ``held`` (it is copied into)."""
        try:
            got = self.result()
        except Exception:
            futures_wait(self.jobs)
            got = [""] * len(self.candidates)  # a hash that failed: copy them all
        except BaseException:  # Ctrl-C: the caller's copy fails, nothing was copied
            futures_wait(self.jobs)
            raise
        verified: dict[str, tuple[str, int]] = {}
        same = []
        for (slot, digest), now, nbytes in zip(self.candidates, got, self.nbytes, strict=True):
            if now and now == digest:
                verified.update((f, (digest, nbytes)) for f in self.names[slot])
                same.append(slot)
            else:
                held.slots.pop(slot, None)
        return verified, frozenset(same)


def copy(
    arena: Any,
    state: tuple[
        Any, Callable[[int], torch.Tensor], dict[str, tuple[int, int] | None] | None, frozenset[str]
    ],
    pool: Executor | None,
    copy_all_but: Callable[[frozenset[int]], dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, tuple[str, int]]]:
    """Stage a state into ``arena`` (the stager's; ``arena.held`` says what it holds).
    ``state``: its layout, a function giving its k-th local tensor, the tensors' version
    counters, and the tensors not staged (``skip``). Hashes what the arena may hold
    already, then ``copy_all_but(slots)`` copies the rest. (Hashing first: copies run
    on torch's threads, which spin a while after each copy and would slow the hashes
    down.) Returns what ``copy_all_but`` does, and fqn -> (digest, bytes) of the
    tensors not copied (the arena holds them). Without a ``pool`` (not an incremental
    save, or a state a device's copy engine copies) everything is copied, and forgotten."""
    if pool is None:
        arena.held.slots.clear()
        return copy_all_but(frozenset()), {}
    check = start(arena.held, *state, pool)
    if check is None:
        return copy_all_but(frozenset()), {}
    verified, same = check.finish(arena.held)
    return copy_all_but(same), verified


def start(
    held: Held,
    layout: Any,
    tensor: Callable[[int], torch.Tensor],
    versions: dict[str, tuple[int, int] | None] | None,
    skip: frozenset[str],
    pool: Executor,
) -> Check | None:
    """Start hashing, on ``pool``, the tensors of ``layout`` (``tensor(k)``: the k-th,
    local) whose arena slot ``held`` knows and whose version counter has not moved on
    the same storage since (``versions``: now); forget every other slot ``held`` knows
    that is copied this time (all of them but ``skip``'s)."""
    if not held.slots:
        return None
    if versions is None or layout.cuda:
        held.slots.clear()
        return None
    candidates, tensors = [], []
    for slot, (digest, version) in list(held.slots.items()):
        k = layout.first[slot]
        fqn, t = layout.tensor_fqns[k], tensor(k)
        if fqn in skip:
            continue  # not copied: its slot keeps its bytes
        if (
            versions.get(fqn) == version
            and t.device.type == "cpu"
            and t.is_contiguous()
            and not t.is_conj()
            and not t.is_neg()
        ):
            candidates.append((slot, digest))
            tensors.append(t)
        else:
            del held.slots[slot]
    if not candidates:
        return None
    names = {slot: held.names(layout, slot) for slot, _ in candidates}
    result, jobs = start_hashing([tensor_bytes(t) for t in tensors], pool)
    return Check(candidates, result, jobs, names, [t.nbytes for t in tensors])
