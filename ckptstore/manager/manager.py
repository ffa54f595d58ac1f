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
import inspect
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch.distributed as dist

from ckptstore.config import BackupConfig, ManagerConfig, manager_configs
from ckptstore.engine import groups
from ckptstore.engine.checkpointer import Checkpointer
from ckptstore.format.manifest import new_run_id
from ckptstore.manager import lease, partbackup
from ckptstore.manager.agreement import StepAgreement
from ckptstore.manager.backup_status import BackupStatus
from ckptstore.manager.guard import GuardMixin
from ckptstore.manager.housekeeping import HousekeepingMixin
from ckptstore.manager.listing import ManagedCheckpoint, describe
from ckptstore.manager.policies import (
    CheckpointRecord,
    KeepBest,
    RetentionPolicy,
    SavePolicy,
    find_policy,
    forever_parts,
)
from ckptstore.manager.replicate import Replicator
from ckptstore.manager.restore import RestoreMixin
from ckptstore.manager.resumable import ResumableCheck
from ckptstore.manager.saving import SavingMixin
from ckptstore.manager.visible import show_progress_by_default
from ckptstore.storage import StorageBackend, open_backend

log = logging.getLogger("ckptstore")


class CheckpointManager(SavingMixin, RestoreMixin, GuardMixin, HousekeepingMixin):
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
            manager_params=inspect.signature(CheckpointManager.__init__).parameters,
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
        self._links_read: tuple[str, bool] | None = None  # (housekeeping: read once)
        self._lease: lease.Lease | None = None
        try:  # one writer per root: a second is refused here, naming the first
            partbackup.agree_on_backup(backup, self._control)  # (else: a hang, not an error)
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
                    self._backup.wait(backup_timeout_s, give_up_after=5, closing=True)
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
