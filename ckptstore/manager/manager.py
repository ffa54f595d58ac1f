"""``CheckpointManager``: when to save, what to keep, and resuming a run, on a Checkpointer.

::

    mgr = ckptstore.CheckpointManager(
        "runs/exp1",
        save=AnyOf(SaveEvery(steps=500), SaveEvery(epochs=1)),
        keep=AnyOf(KeepLast(3), KeepEvery(epochs=1), KeepBest(1, metric="val_loss")),
    )
    state = ckptstore.Resumable(model=model, optimizer=opt, scheduler=sched, dataloader=loader)
    step = mgr.restore(state)                     # steps done by the restored run; 0 if none
    with mgr.guard(state):                        # saves on completion, Ctrl+C, SIGTERM, error
        while step < total_steps:
            ...
            mgr.maybe_save(step, state, epoch=epoch, metrics={"val_loss": val_loss})
            step += 1

Steps: ``maybe_save(step)`` and ``save(step)`` take the loop's index of the step just
completed; the checkpoint records the steps *done* (``step + 1``): ``step_00000500`` is
the state after 500 steps. ``restore`` returns that number (the index to resume at), and
``restore(state, 500)`` or ``restore(state, "step_00000500")`` names that checkpoint.

Signals: inside :meth:`guard`, the first SIGINT or SIGTERM is noted, and at the end of
the step in progress (the next :meth:`maybe_save`) the state is saved (reason
``"signal"``) and the process exits with 130 or 143. A signal that arrives once that
save has started exits at once; the save is never committed, so nothing half-written is
visible. Repeats of the first signal before then are ignored (a terminal's Ctrl+C and
torchrun's forwarded copy of it arrive together).

Errors: an exception escaping :meth:`guard` is saved (reason ``"error"``) as the state of
the last completed step: the small parts (data position, generators, counters,
scheduler) come from a snapshot taken at the end of that step, and if the exception
came after ``optimizer.step()`` of the failing step nothing is saved, since model and
optimizer no longer match that step. Single process only.

Several ranks: the ranks agree, one step late and off the training thread (a tiny
all-reduce per step on a gloo group of the manager's own: manager/agreement.py), on
whether to save by a time-based policy, to stop on a signal, or to give up because
another rank's loop raised.

Retention and the ``latest`` pointer run on rank 0, on a housekeeping thread, after each
commit of this run (the first one catches up what a crash between a save and its pruning
left; nothing is deleted before this run has restored and committed a save). They never
delete the newest checkpoint, the newest one that verifies, the one ``latest`` names, or
anything that is not a committed ckptstore checkpoint. A root belongs to one run
(resumes included): retention manages every committed checkpoint under it. With
incremental saves, a checkpoint of this run that retention finds damaged makes the next
save a full one, so later checkpoints stop linking its files (manager/housekeeping.py).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch.distributed as dist

from ckptstore.config import BackupConfig, ManagerConfig, manager_configs
from ckptstore.engine import groups
from ckptstore.engine.arguments import bad_step
from ckptstore.engine.checkpointer import Checkpointer
from ckptstore.engine.pending import PendingSave
from ckptstore.errors import (
    BackgroundSaveError,
    CheckpointExistsError,
    InvalidArgumentError,
    RankFailedError,
)
from ckptstore.format.manifest import new_run_id
from ckptstore.layout import checkpoint_name
from ckptstore.manager import lease, partbackup
from ckptstore.manager.agreement import Flags, StepAgreement
from ckptstore.manager.backup_status import BackupStatus
from ckptstore.manager.guard import ABORT, GuardMixin
from ckptstore.manager.housekeeping import HousekeepingMixin
from ckptstore.manager.listing import ManagedCheckpoint, describe
from ckptstore.manager.policies import (
    MANUAL,
    SIGNAL,
    CheckpointRecord,
    KeepBest,
    RetentionPolicy,
    SaveContext,
    SavePolicy,
    find_policy,
    forever_parts,
    split_by_agreement,
)
from ckptstore.manager.replicate import Replicator
from ckptstore.manager.restore import RestoreMixin
from ckptstore.manager.resumable import Resumable, ResumableCheck, copy_guard, track_best
from ckptstore.manager.visible import show_progress_by_default
from ckptstore.storage import StorageBackend, open_backend

log = logging.getLogger("ckptstore")


class CheckpointManager(RestoreMixin, GuardMixin, HousekeepingMixin):
    """Save policies, retention, the ``latest`` pointer, ``best``, and full resume.

    Configure it with ``config=ManagerConfig(...)`` (and ``backup=BackupConfig(...)``),
    or with the same fields as keywords: ``save`` (a save policy; None: only on
    completion, signal and error), ``keep`` (a retention policy; None: keep
    everything), ``enabled=False`` (every write off; restore still reads),
    ``best_metric``/``best_mode`` (default: those of a ``KeepBest`` in ``keep``), and
    any :class:`~ckptstore.CheckpointerConfig` field (``codec``, ``max_inflight``,
    ``threads``, ``manifest_key``, ...). ``backup`` is a URL or a
    :class:`~ckptstore.BackupConfig`; with a URL, ``backup_keep``, ``backup_options``,
    ``backup_max_queued`` and ``backup_retry_max_s`` fill the rest of it.
    ``manifest_key`` signs every manifest and is required of every checkpoint restored,
    listed, pruned or backed up, here and on the backup tier.
    Every rank constructs the manager (it creates process groups: a collective).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        config: ManagerConfig | None = None,
        save: SavePolicy | None = None,
        keep: RetentionPolicy | None = None,
        enabled: bool = True,
        best_metric: str | None = None,
        best_mode: str = "min",
        process_group: dist.ProcessGroup | None = None,
        storage_options: dict[str, Any] | None = None,
        backup: str | os.PathLike[str] | StorageBackend | BackupConfig | None = None,
        backup_keep: RetentionPolicy | None = None,
        backup_options: dict[str, Any] | None = None,
        backup_max_queued: int = 1,
        backup_retry_max_s: float = 60.0,
        **checkpointer_options: Any,
    ) -> None:
        config, backup = manager_configs(
            config,
            backup,
            save=save,
            keep=keep,
            enabled=enabled,
            best_metric=best_metric,
            best_mode=best_mode,
            backup_keep=backup_keep,
            backup_options=backup_options,
            backup_max_queued=backup_max_queued,
            backup_retry_max_s=backup_retry_max_s,
            checkpointer_options=checkpointer_options,
        )
        self.config = config
        self.save_policy, self.keep_policy = config.save, config.keep
        self.enabled = enabled = config.enabled
        best_metric, best_mode = config.best_metric, config.best_mode
        found = find_policy(config.keep, KeepBest)
        if best_metric is None and isinstance(found, KeepBest):
            best_metric, best_mode = found.metric, found.mode
        self.best_metric, self.best_mode = best_metric, best_mode
        self._root = os.fspath(root) if isinstance(root, os.PathLike) else root
        self._storage_options = storage_options
        self._process_group = process_group
        ckpt_config = config.checkpointer
        # Signs and checks manifests here, on the backup and in restore-by-path too.
        self._manifest_key = ckpt_config.manifest_key
        if not enabled:
            log.warning("checkpointing is disabled: nothing will be saved under %s", self._root)
            if ckpt_config.sweep_grace_s is None:
                ckpt_config = dataclasses.replace(ckpt_config, sweep_grace_s=float("inf"))
        self._ckpt: Checkpointer | None = None
        # Opened once: a disabled manager without a backup must not create the root.
        backend = open_backend(
            self._root,
            storage_options=storage_options,
            create=enabled or backup is not None,
            backend_options=dict(ckpt_config.backend_options or {}),
        )
        if enabled or backup is not None or backend.list_names():
            self._ckpt = Checkpointer(backend, config=ckpt_config, process_group=process_group)
        # The ranks agree on a gloo group of the manager's own (manager/agreement.py).
        self._control = groups.dedicated_gloo_group(process_group)
        self._rank = groups.rank(self._control)
        self._world = groups.world_size(self._control)
        self._agreement = StepAgreement(self._control) if self._control is not None else None
        self._split: tuple[Any, SavePolicy | None, SavePolicy | None] = (None, None, None)
        self._resumable = ResumableCheck()  # maybe_save's, per state object
        # Pointer updates and pruning: off the writer thread, in commit order.
        self._housekeeping = (
            ThreadPoolExecutor(1, thread_name_prefix="ckptstore-housekeeping")
            if enabled and self._rank == 0
            else None
        )
        self._lock = threading.Lock()
        self._last_done: int | None = None
        self.restored: str | None = None  # the checkpoint restore() loaded (its name)
        self._newer_kept: frozenset[int] = frozenset()  # restore's newer="keep": not saved
        self._last_metrics: dict[str, float] | None = None
        self._last_epoch: int | None = None
        self._last_saved: int | None = None
        self._last_save_time = time.monotonic()
        self._boundary: dict[str, Any] | None = None
        self._stop: int | None = None
        self._stop_at = 0.0
        self._stop_saving = False
        self._full_next = False  # the next save writes everything (housekeeping's heal)
        self._heal = False  # rank 0: ask the ranks for that at the next step's agreement
        self._heal_pending, self._healed_from = False, 0  # (see housekeeping.py)
        self._guarding = False
        self._closed = False
        show_progress_by_default()  # save lines and "resumed from" on stderr (visible.py)
        # In every manifest, rank 0's on every rank; a restore adopts the checkpoint's.
        self._run_id = str(groups.broadcast(new_run_id(), self._control))
        self._lineage: tuple[str, ...] = ()  # the runs this one branched from
        # The backup tier (rank 0's, and each disk's part: partbackup). A missing bucket
        # or wrong credentials fail here.
        self._remote: StorageBackend | None = None
        self._backup: Replicator | None = None
        self._part_backup: partbackup.PartUploader | None = None  # node-local disks
        self._has_backup = backup is not None
        self.backup_config = backup
        self.backup_keep = config.keep if backup is None or backup.keep is None else backup.keep
        # No retention here: nothing is deleted before this run has restored and
        # committed a save of its own (the first commit's housekeeping catches up).
        self._committed: set[str] = set()  # saved by this manager: verified when written
        self._last_commit: str | None = None
        self._lease: lease.Lease | None = None
        try:  # one writer per root: a second is refused here, naming the first
            self._lease = lease.take(backend, self._control) if enabled else None
            if backup is not None:
                self._open_backup(backup)
        except BaseException:
            self.close()
            raise

    def _open_backup(self, backup: BackupConfig) -> None:
        assert self._ckpt is not None
        self._remote, self._backup, self._part_backup = partbackup.open_tiers(
            self._ckpt,
            backup,
            self._control,
            enabled=self.enabled,
            keep=self.backup_keep,
            max_queued=backup.max_queued,
            retry_max_s=backup.retry_max_s,
            on_backed_up=self._on_backed_up,
            on_speed=self._ckpt.note_downstream,
            manifest_key=self._manifest_key,
            run_id=self._run_id,
        )
        if self.enabled and self._ckpt is not None:
            # codec="auto" now minimises the time until backed up (every rank starts
            # compressed; rank 0 adapts to the upload speed it measures).
            self._ckpt.note_downstream(None)

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

    # ---- listing ----------------------------------------------------------------------
    def list(self) -> builtins.list[ManagedCheckpoint]:
        """Committed checkpoints, oldest first, with reason, size, ratio, metrics and tags."""
        if self._ckpt is None:
            return []
        infos = self._ckpt.list()
        records = self._records(infos)
        latest = self._read_latest()
        best = self._best_record(records)
        kept: frozenset[int] = frozenset()
        forever = forever_parts(self.keep_policy)
        if forever:
            kept = frozenset().union(*(p.keep(records) for p in forever))
        return describe(infos, records, latest=latest, best=best, kept=kept)

    def best(self) -> ManagedCheckpoint | None:
        """The best checkpoint by ``best_metric`` (signal and error saves never count)."""
        return next((e for e in self.list() if "best" in e.tags), None)

    def _best_record(self, records: builtins.list[CheckpointRecord]) -> CheckpointRecord | None:
        if self.best_metric is None:
            return None
        ranked = KeepBest(1, self.best_metric, self.best_mode).ranked(records)
        return ranked[0] if ranked else None

    # ---- waiting and closing --------------------------------------------------------
    def wait(self) -> None:
        """Wait until every save in flight is durable and ``latest`` moved; raise if one failed."""
        if self._ckpt is not None:
            self._ckpt.wait()
        if self._housekeeping is not None:
            self._housekeeping.submit(lambda: None).result()

    def wait_quietly(self) -> None:
        try:
            self.wait()
        except Exception as exc:
            log.error("a save failed: %s", exc)

    def close(self, *, wait_backup: bool = True, backup_timeout_s: float | None = None) -> None:
        """Finish every save in flight; then, with a backup, wait for its uploads (with
        progress; Ctrl+C stops waiting; so do 5 failed attempts in a row, or
        ``backup_timeout_s``) unless ``wait_backup=False``. What is left not backed up is
        named in a warning and in :meth:`backup_status`."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._ckpt is not None:
                self._ckpt.close()
        finally:
            try:
                if self._part_backup is not None:
                    self._part_backup.close(wait=wait_backup, timeout_s=backup_timeout_s)
                if self._backup is not None and wait_backup:
                    if self._housekeeping is not None:  # the last commit's submit, first
                        self._housekeeping.submit(lambda: None).result()
                    self._backup.wait(backup_timeout_s, give_up_after=5)
            except KeyboardInterrupt:
                log.warning("stopped waiting for the backup")
            finally:
                if self._backup is not None:
                    self._backup.close(wait=False)
                if self._housekeeping is not None:
                    self._housekeeping.shutdown(wait=True)
                if self._agreement is not None:  # the last step's, which every rank began
                    with contextlib.suppress(Exception):
                        self._agreement.collect(timeout_s=60)
                    self._agreement.close()
                groups.release(self._control)
                if self._lease is not None:
                    self._lease.release()

    def backup_status(self) -> BackupStatus | None:
        """Where the backup stands (rank 0; None elsewhere or without ``backup=``)."""
        return self._backup.status() if self._backup is not None else None

    def wait_backup(self, timeout_s: float | None = None) -> builtins.list[str]:
        """Wait until every committed checkpoint queued for backup is uploaded (rank 0);
        return those still not uploaded when ``timeout_s`` ran out."""
        self.wait()
        left = self._backup.wait(timeout_s) if self._backup is not None else []
        self.wait()  # retention that the finished uploads let go ahead
        return left

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(Exception):
                self.close()

    @property
    def checkpointer(self) -> Checkpointer | None:
        return self._ckpt


def _steps_done(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidArgumentError(
            f"step must be the loop's 0-based step index, got {bad_step(step)}"
        )
    return step + 1
