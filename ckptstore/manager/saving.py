"""The saving half of ``CheckpointManager``: ``maybe_save`` (the save policy, the ranks'
agreement on it, and a pending stop), ``save``, and what every save does to the manager's
state (see :mod:`ckptstore.manager.manager`). Mixed into the manager, whose constructor
sets the attributes below.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ckptstore.engine.arguments import bad_step
from ckptstore.engine.checkpointer import Checkpointer
from ckptstore.engine.pending import PendingSave
from ckptstore.errors import (
    BackgroundSaveError,
    CheckpointExistsError,
    InvalidArgumentError,
    RankFailedError,
)
from ckptstore.layout import checkpoint_name
from ckptstore.manager.agreement import Flags, StepAgreement
from ckptstore.manager.guard import ABORT
from ckptstore.manager.policies import (
    MANUAL,
    SIGNAL,
    SaveContext,
    SavePolicy,
    split_by_agreement,
)
from ckptstore.manager.resumable import Resumable, ResumableCheck, copy_guard, track_best

if TYPE_CHECKING:
    from ckptstore.config import ManagerConfig

log = logging.getLogger("ckptstore")


class SavingMixin:
    """``maybe_save`` and ``save``; mixed into :class:`~ckptstore.CheckpointManager`."""

    enabled: bool
    config: ManagerConfig
    save_policy: SavePolicy | None
    best_metric: str | None
    best_mode: str
    _ckpt: Checkpointer | None
    _agreement: StepAgreement | None
    _resumable: ResumableCheck
    _split: tuple[Any, Any, Any]
    _last_done: int | None
    _last_saved: int | None
    _last_save_time: float
    _last_metrics: dict[str, float] | None
    _last_epoch: int | None
    _boundary: dict[str, Any] | None
    _stop: int | None
    _stop_saving: bool
    _full_next: bool
    _heal: bool
    _heal_pending: bool
    _healed_from: int
    _newer_kept: frozenset[int]
    _run_id: str
    _lineage: tuple[str, ...]
    _housekeeping: Any
    _part_backup: Any

    if TYPE_CHECKING:  # provided by the other mixins

        def _exit_on_signal(self, signum: int) -> None: ...
        def _after_commit(self, fut: Any) -> None: ...
        def _upload_part(self, fut: Any) -> None: ...

    # ---- saving ---------------------------------------------------------------------
    def maybe_save(
        self,
        step: int,
        state: Resumable | dict[str, Any],
        *,
        epoch: int | None = None,
        end_of_epoch: bool = False,
        metrics: dict[str, float] | None = None,
    ) -> PendingSave | None:
        """Call after every training step: saves if the save policy says so.

        Also where a pending stop (SIGINT/SIGTERM inside :meth:`guard`) takes effect:
        the state is saved and the process exits with 130 / 143. With several ranks
        every rank must call it once per step.
        """
        steps_done = _steps_done(step)
        self._last_done = steps_done
        self._last_metrics = dict(metrics) if metrics else None
        if self._resumable(state):
            epoch = state.epoch if epoch is None else epoch
            state.step, state.epoch = steps_done, epoch
            track_best(state, metrics, self.best_metric, self.best_mode)
            self._boundary = state.boundary()
        if epoch is not None:
            self._last_epoch = epoch
        reason = other = None  # other: a reason the ranks may not all see at this step
        if self.enabled and self.save_policy is not None and self._last_saved != steps_done:
            ctx = SaveContext(
                steps_done=steps_done,
                epoch=epoch,
                end_of_epoch=end_of_epoch,
                elapsed_s=time.monotonic() - self._last_save_time,
                last_saved_step=self._last_saved,
            )
            if self._split[0] is not self.save_policy:  # (per step: split once per policy)
                parts = split_by_agreement(self.save_policy, self._agreement is None)
                self._split = (self.save_policy, *parts)
            _, alike, others = self._split
            reason = alike.should_save(ctx) if alike is not None else None
            other = others.should_save(ctx) if others is not None else None
        if self._agreement is None:
            stop = self._stop
        else:  # agreed one step late, without waiting on the ring: manager/agreement.py
            late, stop = self._agreement.collect()
            if late is not None and self._last_saved != steps_done:
                reason = reason or late
            self._full_next = self._full_next or self._agreement.take_full()
            if stop is None:  # (a stop ends the run at this step: nothing more to agree)
                heal, self._heal = self._heal, False
                self._agreement.start(None if reason else other, self._stop, full=heal)
        if stop == ABORT:
            raise RankFailedError("another rank's training loop failed: stopping this one too")
        if stop is not None:
            self._stop = self._stop or stop  # a signal to another rank stops this one too
            self._stop_saving = True
            # Every rank stops at this step: a heal asked for since the last agreement
            # began rides on one more, so that the stop's save writes everything too; a
            # rank whose loop failed since joins it with the abort code
            if self._agree(None, stop)[1] == ABORT:
                raise RankFailedError("another rank's training loop failed: stopping this one too")
            if self.enabled and self._last_saved != steps_done:
                reason = reason or SIGNAL
        pending = None
        if reason is not None and self.enabled:
            try:
                pending = self._save(steps_done, state, reason, epoch, metrics)
            except BackgroundSaveError as exc:
                if stop is None:
                    raise
                log.error("%s", exc)  # a pending stop still ends the run with its status
        if stop is not None:
            self._exit_on_signal(stop)
        return pending

    def save(
        self,
        step: int,
        state: Resumable | dict[str, Any],
        *,
        reason: str = MANUAL,
        epoch: int | None = None,
        metrics: dict[str, float] | None = None,
        full: bool = False,
    ) -> PendingSave | None:
        """Save now, whatever the policy says; ``step`` as in :meth:`maybe_save` (the
        index of the step just done; ``full``: write every tensor, even incremental).
        None when checkpointing is disabled."""
        steps_done = _steps_done(step)
        self._last_done = steps_done
        if not self.enabled:
            return None
        if isinstance(state, Resumable):
            state.step = steps_done
            track_best(state, metrics, self.best_metric, self.best_mode)
        return self._save(steps_done, state, reason, epoch, metrics, full=full)

    def _save(
        self,
        steps_done: int,
        state: Resumable | dict[str, Any],
        reason: str,
        epoch: int | None,
        metrics: dict[str, float] | None,
        sd: dict[str, Any] | None = None,
        full: bool = False,
    ) -> PendingSave:
        assert self._ckpt is not None
        name = checkpoint_name(steps_done)
        here = self._ckpt.exists(steps_done)
        # (restore kept it on rank 0's disk: with node-local disks every rank refuses, not
        # only those of that disk, which then left the others waiting in the save)
        if here or steps_done in self._newer_kept:
            where = f"{self._ckpt.url}/{name}" if here else f"{name} (on rank 0's disk)"
            raise CheckpointExistsError(
                f"{where} already exists: this run restored an earlier checkpoint "
                "and is training past it. Restore with newer='discard' to move the newer "
                "ones aside (newer='refuse' says so before training), or save into another root"
            )
        if sd is None:
            sd = state.state_dict() if isinstance(state, Resumable) else state
        if epoch is None:
            epoch = state.epoch if isinstance(state, Resumable) else self._last_epoch
        guard = copy_guard(state, self.config.overlap_copy)  # None: copy before returning
        if self._full_next:  # (the ranks agreed on it at the same step)
            full, self._full_next = True, False
            self._heal_pending, self._healed_from = False, steps_done
        info: dict[str, Any] = {"epoch": epoch, "reason": reason, "metrics": metrics, "full": full}
        try:
            pending = self._ckpt.save_async(
                sd, steps_done, block_until_staged=guard is None, guard=guard, **info,
                run_id=self._run_id, lineage=self._lineage,
            )  # fmt: skip
        except BackgroundSaveError as exc:
            # An earlier save failed; this one was still started: keep track of it.
            if isinstance(exc.pending, PendingSave):
                self._track(exc.pending, steps_done, guard)
            raise
        self._track(pending, steps_done, guard)
        return pending

    def _track(self, pending: PendingSave, steps_done: int, guard: Any = None) -> None:
        if guard is not None:  # the loop waits for the copy before the state changes
            guard.hold(pending.staged)
        self._last_saved = steps_done
        self._last_save_time = time.monotonic()
        if self._housekeeping is not None:
            pending.committed.add_done_callback(self._after_commit)
        if self._part_backup is not None:  # this disk's part, once committed
            pending.committed.add_done_callback(self._upload_part)

    # ---- agreement between ranks ------------------------------------------------------
    def _agree(self, reason: str | None, stop: int | None, *, fold: bool = True) -> Flags:
        """Every rank's save reason and stop code, agreed (the largest wins); see now().
        A full save asked for (housekeeping's heal) rides along, as at every step."""
        if self._agreement is None:
            return reason, stop
        heal, self._heal = self._heal, False
        flags = self._agreement.now(reason, stop, fold=fold, full=heal)
        self._full_next = self._full_next or self._agreement.take_full()
        return flags


def _steps_done(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidArgumentError(
            f"step must be the loop's 0-based step index, got {bad_step(step)}"
        )
    return step + 1
