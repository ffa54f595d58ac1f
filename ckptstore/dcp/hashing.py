"""Hashing items for incremental saves (issue 19): xxh3-128 of their raw bytes, on a
pool, with the thread that waits for the digests hashing beside it.

:func:`start_hashing` queues the jobs and submits one pool task per job; each task
takes the next job still queued. The call that gives the digests first runs what is
still queued itself, then waits for the jobs the pool took. So a caller that waits
(a save hashing where the state lies, the writer before it decides what to link, the
commit of a save that trusts version counters) hashes at its own priority on its own
core instead of sleeping, and never waits for a job that no thread has started: a pool
thread that gets no CPU (a lower priority, cores kept busy by training) holds up at
most the job it is running.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import wait as futures_wait
from typing import Any

import xxhash

PIECE = 8 << 20  # large items are hashed in pieces of this size, on every thread
SHARED_BELOW = 1 << 20  # smaller pieces are hashed several to a job (start_hashing)


def _hash_all(pieces: list[Any]) -> list[str]:
    return [xxhash.xxh3_128_hexdigest(p) for p in pieces]


class _Queue:
    """Jobs that whichever thread comes first runs: a pool task or the waiter."""

    def __init__(self, jobs: list[list[Any]]) -> None:
        self._todo = collections.deque(enumerate(jobs))  # popleft: atomic
        self.out: list[list[str] | BaseException | object] = [None] * len(jobs)
        self.done = [threading.Event() for _ in jobs]

    def run_one(self) -> bool:
        """Run the next queued job; False when none is left. An interrupt (not an
        Exception) empties the queue: what no thread has started is then never run."""
        try:
            i, job = self._todo.popleft()
        except IndexError:
            return False
        try:
            self.out[i] = _hash_all(job)
        except BaseException as exc:  # raised to the waiter, not lost in a pool task
            self.out[i] = exc
            if not isinstance(exc, Exception):
                self.cancel()
        finally:
            job = []  # the items' bytes: not held by a stored error's traceback
            self.done[i].set()
        return True

    def cancel(self) -> None:
        """Drop the jobs no thread has started (each marked done, never run)."""
        while True:
            try:
                i, _ = self._todo.popleft()
            except IndexError:
                return
            self.out[i] = _CANCELLED
            self.done[i].set()

    def error(self) -> BaseException | None:
        """The error to raise: an interrupt before any Exception, else the first."""
        errors = [o for o in self.out if isinstance(o, BaseException)]
        first = next((e for e in errors if not isinstance(e, Exception)), None)
        return first or (errors[0] if errors else None)


_CANCELLED = object()  # a job dropped after an interrupt (which is what is raised)


def start_hashing(
    raws: list[Any], pool: Executor
) -> tuple[Callable[[], list[str]], list[Future[bool]]]:
    """Start hashing; the returned call gives each item's digest: xxh3-128 of its
    bytes, or, above one piece, of its pieces' digests (stable from save to save, which
    is all a comparison needs). It runs the jobs no pool thread has taken yet itself
    (module doc); one thread calls it, once. Also returns the pool's tasks, which read
    the items until they end (while that call runs, it reads them too).
    Pieces below :data:`SHARED_BELOW` share a job, up to a piece's bytes in all: the
    issue-19 bench state's 194 items below 256 KiB (13.5 MB) took 2.3-2.6 ms to hash one
    job each, 0.5 ms together (2 threads, this project's 2-core VM, medians of 200);
    larger ones keep a job each, for as many threads as a host has."""
    owner: list[int] = []  # each piece's item
    jobs: list[list[Any]] = []
    size = 0  # of the last job (PIECE: closed)
    for i, raw in enumerate(raws):
        for k in range(0, max(len(raw), 1), PIECE):
            piece = raw[k : k + PIECE]
            alone = len(piece) >= SHARED_BELOW
            if alone or not jobs or size + len(piece) > PIECE:
                jobs.append([])
                size = 0
            jobs[-1].append(piece)
            size = PIECE if alone else size + len(piece)
            owner.append(i)
    queue = _Queue(jobs)
    tasks: list[Future[bool]] = []
    try:
        for _ in jobs:
            tasks.append(pool.submit(queue.run_one))
    except BaseException:  # a pool shutting down: none left running on the items
        queue.cancel()
        futures_wait(tasks)
        raise

    def result() -> list[str]:
        try:
            while queue.run_one():
                pass
        except BaseException:  # an interrupt outside a job: what is left never runs
            queue.cancel()
            raise
        for done in queue.done:  # the jobs pool threads took (not those yet to start)
            done.wait()
        if (err := queue.error()) is not None:
            try:
                raise err
            finally:
                err = None  # no cycle through this frame
        parts: list[list[str]] = [[] for _ in raws]
        got: list[str] = []
        for out in queue.out:
            assert isinstance(out, list)
            got += out
        for i, d in zip(owner, got, strict=True):
            parts[i].append(d)
        return [
            p[0] if len(p) == 1 else xxhash.xxh3_128_hexdigest("".join(p).encode()) for p in parts
        ]

    return result, tasks
