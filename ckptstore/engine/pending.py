"""A save in flight (:class:`PendingSave`), its outcome (:class:`SaveResult`), and the
bookkeeping that makes background errors surface exactly once.

Threads: the training loop calls ``Checkpointer.save_async``; one writer thread per
checkpointer runs the saves in submission order; the codec pool encodes chunks for it.
A failed save's exception keeps its type: ``PendingSave.wait()`` and ``committed``
re-raise it as it is. If nobody waited on it, the next ``save_async``, ``wait`` or
``close`` raises :class:`~ckptstore.errors.BackgroundSaveError` naming the step, with
the original as ``__cause__``.
"""

from __future__ import annotations

import threading
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass

from ckptstore.errors import BackgroundSaveError, RanksDisagreeError
from ckptstore.format.manifest import Manifest
from ckptstore.units import format_bytes


@dataclass(frozen=True)
class SaveResult:
    """How one save went, from this rank's point of view. Times are seconds."""

    step: int
    name: str
    url: str
    codec: str  # the codec this rank's shard used
    raw_bytes: int  # this rank's state before encoding
    stored_bytes: int  # this rank's encoded bytes
    stall_s: float  # how long save_async blocked the caller, backpressure included
    backpressure_s: float  # of which: waiting for an earlier save to free a slot
    staging_s: float  # copying into staging buffers
    write_s: float  # on the writer thread: planning, encoding, writing, commit
    commit_s: float  # from the save_async call until durable
    staging_bytes: int  # host memory held by staging after this save
    manifest: Manifest | None  # the committed manifest (coordinator rank only)

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0

    def describe(self, linked_bytes: int = 0, ranks: int = 1) -> str:
        """The log line of a committed save (``linked_bytes``: raw bytes not written
        again, linked from the save before: ckptstore.dcp.incremental); its bytes are
        this rank's, which the line says when ``ranks`` > 1."""
        reason = self.manifest.reason if self.manifest is not None else None
        linked = f", {format_bytes(linked_bytes)} unchanged (linked)" if linked_bytes else ""
        mine = "this rank's part " if ranks > 1 else ""
        if ranks > 1 and self.manifest is not None and self.manifest.linked:
            # this rank's own part may link nothing while others link theirs
            files = self.manifest.files
            shared = sum(files[f].size_bytes for f in self.manifest.linked if f in files)
            n = len(self.manifest.linked)
            whole = "this disk's part" if self.manifest.part is not None else "the checkpoint"
            linked += (
                f"; {whole} links {n} file{'s' if n > 1 else ''} "
                f"({format_bytes(shared)}) of earlier ones"
            )
        return (
            f"{self.name} committed{f' ({reason})' if reason else ''}: {mine}"
            f"{format_bytes(self.raw_bytes)} -> {format_bytes(self.stored_bytes)} "
            f"({self.codec}, ratio {self.ratio:.2f}){linked}, stall {self.stall_s * 1e3:.0f} ms, "
            f"durable after {self.commit_s:.2f} s"
        )


class _ErrorRecord:
    __slots__ = ("error", "step", "surfaced")

    def __init__(self, step: int, error: BaseException) -> None:
        self.step = step
        self.error = error
        self.surfaced = False


class ErrorLedger:
    """Failed saves whose error nobody has seen yet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[_ErrorRecord] = []

    def record(self, step: int, error: BaseException) -> _ErrorRecord:
        rec = _ErrorRecord(step, error)
        with self._lock:
            self._records.append(rec)
        return rec

    def raise_unseen(self) -> None:
        """Raise :class:`BackgroundSaveError` for the oldest unseen failure, marking all seen."""
        err = self.take_unseen()
        if err is not None:
            raise err

    def take_unseen(self) -> BackgroundSaveError | None:
        """The error to raise for unseen failures (oldest first), marking them seen."""
        with self._lock:
            unseen = [r for r in self._records if not r.surfaced]
            for r in unseen:
                r.surfaced = True
            self._records = []
        if not unseen:
            return None
        first = unseen[0]
        steps = ", ".join(str(r.step) for r in unseen)
        more = f" (failed saves: steps {steps})" if len(unseen) > 1 else ""
        err = BackgroundSaveError(
            f"the background save of step {first.step} failed: {type(first.error).__name__}: "
            f"{first.error}{more}. "
            + (
                "Every later save fails the same way until every rank is started alike"
                if isinstance(first.error, RanksDisagreeError)
                else "Earlier checkpoints are intact; later saves may succeed"
            ),
            step=first.step,
        )
        err.__cause__ = first.error
        return err


class PendingSave:
    """A save in flight.

    ``staged`` resolves once the state has been copied (the caller may change its
    tensors); ``committed`` resolves to a :class:`SaveResult` once the checkpoint is
    durable, or to the save's exception.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.staged: Future[None] = Future()
        self.committed: Future[SaveResult] = Future()
        self._record: _ErrorRecord | None = None

    def done(self) -> bool:
        """True once the save committed or failed."""
        return self.committed.done()

    def wait(self, timeout: float | None = None) -> SaveResult:
        """Block until durable; return the result or raise the save's own error."""
        try:
            return self.committed.result(timeout)
        except (TimeoutError, futures.TimeoutError):  # distinct classes on Python 3.10
            raise
        except BaseException:
            if self._record is not None:
                self._record.surfaced = True
            raise

    def __repr__(self) -> str:
        state = (
            "committed"
            if self.done() and self.committed.exception() is None
            else ("failed" if self.done() else ("staged" if self.staged.done() else "staging"))
        )
        return f"PendingSave(step={self.step}, {state})"
