"""What the ranks agree on at each step, without a blocking collective on every step.

With several ranks, every rank must take the same decisions at the same step: save or
not (a time-based policy can answer differently per rank), stop (a signal may reach one
rank only), give up (another rank's loop failed). Agreeing with a blocking all-reduce
per step costs a round trip of the whole ring (~20-100 ms at 1,000 ranks on gloo).

:class:`StepAgreement` agrees one step late instead: each step starts an asynchronous
all-reduce of this step's flags and collects the previous step's, which has long
finished by then; what it says (a save, a stop, an abort) is acted on at this step, on
every rank alike. A save whose policy answers the same on every rank without asking
(every N steps, at given steps, every N epochs) is taken at once, as in one process. A
stop signal therefore stops every rank one step after it arrives; an abort (a rank's
loop failed) stops the others one step after they last met it. A request for a full
save (rank 0's housekeeping found this run's newest checkpoint damaged: its files must
not be linked again) rides along the same way, and is kept until taken.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from typing import Any

import torch
import torch.distributed as dist

from ckptstore.engine import groups
from ckptstore.manager.policies import EPOCH, INTERVAL

log = logging.getLogger("ckptstore")

_REASON_CODES = {None: 0, INTERVAL: 1, EPOCH: 2}
_CODE_REASONS = {v: k for k, v in _REASON_CODES.items()}
Flags = tuple[str | None, int | None]


class StepAgreement:
    """The agreements of one manager's ranks over its dedicated gloo group.

    The per-step all-reduce is launched and waited for on a thread of its own: the
    training thread writes two flags, hands them over, and collects the outcome at the
    next step (launching a gloo all-reduce costs ~50-150 us of the caller's time on a
    busy 2-core machine, most of the per-step budget; waiting there for one long
    finished cost another ~30-90 us a step, measured). The thread is ended at exit, a
    manager never closed included, before the interpreter stops: a thread still waiting
    inside torch then aborts the process when it takes the GIL back. So does a gloo
    worker thread that lets go of the flag tensors late (:func:`groups.wait_released`),
    which closing waits for. Every other
    collective on the group runs on the caller's thread, and only once nothing is in
    flight (:meth:`settle`, :meth:`now`): one thread's order per rank, the same on every
    rank.
    """

    def __init__(self, group: Any) -> None:
        self._group = group
        self._in_flight = False
        self._ready: Flags | None = None  # collected by settle(), not yet by collect()
        self._closed = False
        self._full = False  # a full save was asked for by some rank: see take_full()
        # Two flag tensors (reason, stop, full), used in turn: the one in flight is never
        # written to. Reused rather than made each step (the per-step cost is what matters).
        self._buffers = (torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
        # written through numpy: torch's indexing costs ~70 us a step, a view ~8 us
        self._views = tuple(b.numpy() for b in self._buffers)
        self._quiet: list[int] = []  # (see _new_now)
        self._new_now()
        self._turn = 0
        self._max = dist.AllreduceOptions()
        self._max.reduceOp = dist.ReduceOp.MAX  # type: ignore[assignment]
        self._requests: queue.SimpleQueue[torch.Tensor | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def now(
        self, reason: str | None, stop: int | None, *, fold: bool = True, full: bool = False
    ) -> Flags:
        """Agree at once (a blocking all-reduce): the largest reason and stop code win;
        ``full`` as in :meth:`start`. ``fold``: fold in a step's agreement still in
        flight; else it is kept for the next :meth:`collect` (an agreement about
        something else: restore's)."""
        late: Flags = (None, None)
        if fold:
            late = self.collect()
        else:
            self.settle()  # (restore() has; nothing may be in flight on the group)
        codes = zip(_codes(reason, stop, full), _codes(*late), strict=True)
        self._now_view[:] = [max(a, b) for a, b in codes]  # (late's full: already kept)
        _LIVE.add(self)  # (its tensor is let go of before the interpreter stops)
        try:
            dist.all_reduce(self._now, op=dist.ReduceOp.MAX, group=self._group)
        except BaseException:
            # torch's frames in the traceback hold the tensor as long as the exception
            # lives (to the end, if uncaught), and gloo may still reduce into it
            self._new_now()
            raise
        return self._decode(self._now_view)

    def _new_now(self) -> None:
        """A new tensor for :meth:`now` (on the caller's thread), and the counts of
        every tensor a collective is given, taken while none holds them: the step
        buffers' are those of the first call (later, the agreement thread may hold one)."""
        self._now = torch.zeros(3, dtype=torch.int64)
        self._now_view = self._now.numpy()
        self._held = (*self._buffers, self._now)
        counts = groups.held_counts(self._held)
        self._quiet = counts if not self._quiet else [*self._quiet[:2], counts[2]]

    def start(self, reason: str | None, stop: int | None, *, full: bool = False) -> None:
        """Begin this step's agreement of ``reason``, ``stop`` and ``full`` (this rank
        asks for a full save), collected (with :meth:`collect`) at the next step; every
        rank begins one per step. Once closed, nothing (the group is gone)."""
        if self._in_flight or self._ready is not None:
            raise RuntimeError("StepAgreement.start(): collect() the last one first")
        if self._closed:
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="ckptstore-agreement", daemon=True
            )
            self._thread.start()
            _LIVE.add(self)
        self._turn ^= 1
        view = self._views[self._turn]
        view[0], view[1], view[2] = _codes(reason, stop, full)
        self._in_flight = True
        self._requests.put(self._buffers[self._turn])

    def collect(self, timeout_s: float | None = None) -> Flags:
        """The agreement in flight, waited for (None, None when there is none)."""
        if self._ready is not None:
            flags, self._ready = self._ready, None
            return flags
        if not self._in_flight:
            return None, None
        try:
            done = self._results.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(
                f"the ranks' step agreement did not complete within {timeout_s:g} s"
            ) from None
        self._in_flight = False
        if isinstance(done, BaseException):
            raise done
        return self._decode(self._views[self._turn])  # (the buffer just reduced)

    def take_full(self) -> bool:
        """Whether a rank asked for a full save in an agreement collected since the last
        call: the same answer on every rank, at the same step."""
        full, self._full = self._full, False
        return full

    def _decode(self, flags: Any) -> Flags:
        """Flags from a reduced buffer (a tensor, or its numpy view); a full save asked
        for is kept for :meth:`take_full`."""
        code, stop, full = flags.tolist()
        self._full = self._full or bool(full)
        return _CODE_REASONS[code], stop or None

    def settle(self) -> None:
        """Before another collective on the group: let the agreement in flight finish
        (its outcome kept for the next :meth:`collect`)."""
        if self._in_flight:
            self._ready = self.collect()

    def close(self, wait_s: float = 5.0) -> None:
        """End the agreement thread (after the last :meth:`collect`; one still in
        flight is waited for up to ``wait_s``), and wait until gloo has let go of the
        flag tensors (up to ``wait_s`` more); later :meth:`start` calls begin nothing."""
        self._closed = True
        if self._thread is not None:
            self._requests.put(None)
            self._thread.join(timeout=wait_s)
            if self._thread.is_alive():
                log.warning("the ranks' last step agreement did not complete in %g s", wait_s)
                return  # (its all-reduce still holds a flag tensor)
            self._thread = None
        if not groups.wait_released(self._held, self._quiet, wait_s):
            log.warning("gloo still held the step agreement's tensors after %g s", wait_s)

    def _run(self) -> None:
        while (flags := self._requests.get()) is not None:
            try:
                self._group.allreduce([flags], self._max).wait()
            except BaseException as exc:  # (raised by the training thread's collect())
                self._results.put(exc)
            else:
                self._results.put(None)  # (the outcome is in the buffer)


_LIVE: weakref.WeakSet[StepAgreement] = weakref.WeakSet()  # those that ran a collective


@atexit.register
def _end_threads() -> None:
    """At exit, before the interpreter stops other threads: end every agreement thread
    (one waiting for its all-reduce gets up to 60 s) and wait for gloo to let go."""
    for agreement in list(_LIVE):  # the other ranks are at their last step too
        agreement.close(wait_s=60)


def _codes(reason: str | None, stop: int | None, full: bool = False) -> tuple[int, int, int]:
    return _REASON_CODES.get(reason, 1), stop or 0, int(full)
