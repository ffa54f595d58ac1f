"""The manager's guard: a save on completion (``"final"``), on SIGINT/SIGTERM
(``"signal"``, at the end of the step in progress) and on an exception escaping the
training loop (``"error"``, the state of the last completed step).

See :class:`~ckptstore.CheckpointManager` for the rules; this is the half of it that
handles signals and the end of a run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ckptstore.engine.checkpointer import Checkpointer
from ckptstore.engine.pending import PendingSave
from ckptstore.errors import RankFailedError
from ckptstore.layout import checkpoint_name
from ckptstore.manager.policies import ERROR, FINAL, SIGNAL
from ckptstore.manager.resumable import Resumable

log = logging.getLogger("ckptstore")

ABORT = 255  # stop code: a rank's loop failed
_REPEAT_WINDOW_S = 1.0  # the same signal again within this: a duplicate, not a second


class GuardMixin:
    """``CheckpointManager.guard`` and the signal handling behind it; mixed into the
    manager, whose constructor sets these attributes."""

    enabled: bool
    _ckpt: Checkpointer | None
    _control: Any
    _housekeeping: ThreadPoolExecutor | None
    _last_done: int | None
    _last_saved: int | None
    _last_metrics: dict[str, float] | None
    _boundary: dict[str, Any] | None
    _stop: int | None
    _stop_at: float
    _stop_saving: bool
    _guarding: bool

    if TYPE_CHECKING:  # provided by CheckpointManager

        def _save(
            self,
            steps_done: int,
            state: Resumable | dict[str, Any],
            reason: str,
            epoch: int | None,
            metrics: dict[str, float] | None,
            sd: dict[str, Any] | None = None,
        ) -> PendingSave: ...

        def _agree(self, reason: str | None, stop: int | None) -> tuple[str | None, int | None]: ...

        def _record_final(self, name: str) -> None: ...

        def wait(self) -> None: ...

        def wait_quietly(self) -> None: ...

    @contextlib.contextmanager
    def guard(self, state: Resumable | dict[str, Any]) -> Iterator[Any]:
        """Save on completion (``"final"``), on SIGINT/SIGTERM (``"signal"``, at the end of
        the step in progress) and on an exception escaping the block (``"error"``)."""
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        else:
            log.warning("guard() outside the main thread: signals are not handled")
        self._guarding = True
        try:
            yield self
        except SystemExit:
            self.wait_quietly()
            raise
        except RankFailedError:
            self.wait_quietly()
            raise
        except BaseException as exc:
            if self._control is not None:
                # Said first: telling the others may wait on ranks stuck in a collective
                log.error(
                    "the loop failed on this rank (%s: %s); telling the other ranks to stop at "
                    "their next step (with several ranks, no checkpoint is saved on an error)",
                    type(exc).__name__,
                    exc,
                )
                self._tell_others_and_leave()
            else:
                self._save_last(state, SIGNAL if isinstance(exc, KeyboardInterrupt) else ERROR)
            self.wait_quietly()
            if isinstance(exc, KeyboardInterrupt):
                raise SystemExit(128 + signal.SIGINT) from None
            raise
        else:
            self._complete(state)
        finally:
            self._guarding = False
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _complete(self, state: Resumable | dict[str, Any]) -> None:
        if self._control is not None:
            # Every rank, once more, before the final save's collectives: a rank whose
            # loop failed after the last step's agreement is waiting in this one.
            _, stop = self._agree(None, None)
            if stop == ABORT:
                self.wait_quietly()
                raise RankFailedError("another rank's training loop failed: stopping this one too")
        if self.enabled and self._last_done is not None:
            if self._last_saved != self._last_done:
                self._save(self._last_done, state, FINAL, None, self._last_metrics)
            self.wait()
            if self._housekeeping is not None:
                # Mark the last checkpoint as the end of a completed run (KeepFinal keeps
                # it), whether it was saved just now or by the policy at the last step.
                self._housekeeping.submit(
                    self._record_final, checkpoint_name(self._last_done)
                ).result()
        elif self._ckpt is not None:
            self.wait()

    def _tell_others_and_leave(self) -> None:
        """This rank's loop failed: join one last agreement with the abort code, so the
        other ranks stop at their next step instead of waiting for this one forever."""
        with contextlib.suppress(Exception):
            self._agree(None, ABORT)

    def _save_last(self, state: Resumable | dict[str, Any], reason: str) -> None:
        """Save the state of the last completed step after an error or interrupt."""
        if not self.enabled or self._last_done is None or self._last_saved == self._last_done:
            return
        sd = None
        if isinstance(state, Resumable) and self._boundary is not None:
            if state.optimizer_steps() != self._boundary["optimizer_steps"]:
                log.error(
                    "not saved: the %s came after optimizer.step() of the step following step %d, "
                    "so model and optimizer no longer match that step; the last checkpoint stands",
                    reason,
                    self._last_done,
                )
                return
            sd = state.state_dict()
            for part, value in self._boundary.items():
                if part in sd:  # data position, generators, counters, scheduler: as they were
                    sd[part] = value
        try:
            self._save(self._last_done, state, reason, None, self._last_metrics, sd=sd).wait()
            log.warning("saved step %d (%s)", self._last_done, reason)
        except Exception as exc:
            log.error("the %s save of step %d failed: %s", reason, self._last_done, exc)

    def _on_signal(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self._stop is not None:
            if self._stop_saving and not (
                signum == self._stop and now - self._stop_at < _REPEAT_WINDOW_S
            ):
                os.write(
                    2, b"ckptstore: second signal: exiting now; the save in progress is discarded\n"
                )
                os._exit(128 + signum)
            return  # a duplicate (a terminal's Ctrl+C plus torchrun's copy), or before the save
        self._stop = signum
        self._stop_at = now
        name = signal.Signals(signum).name
        os.write(
            2,
            f"ckptstore: {name}: saving at the end of this step, then exiting (again: exit now)\n".encode(),
        )

    def _exit_on_signal(self, signum: int) -> None:
        self.wait_quietly()
        log.warning("stopped by %s after step %s", signal.Signals(signum).name, self._last_done)
        raise SystemExit(128 + signum)
