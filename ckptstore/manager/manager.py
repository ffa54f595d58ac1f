"""``CheckpointManager``: when to save, what to keep, and resuming a run, on a Checkpointer.

::

    mgr = ckptstore.CheckpointManager(
        "runs/exp1",
        save=AnyOf(SaveEvery(steps=500), SaveEvery(epochs=1)),
        keep=AnyOf(KeepLast(3), KeepEvery(epochs=1), KeepBest(1, metric="val_loss")),
    )
    state = ckptstore.TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader)
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

Several ranks: at every :meth:`maybe_save` the ranks agree, with one tiny all-reduce on
a gloo group of the manager's own, on whether to save (a time-based policy is decided
by each rank's clock), whether to stop on a signal, and whether a rank has failed: a
rank whose loop raises tells the others, which then stop too instead of waiting.

Retention and the ``latest`` pointer run on rank 0, on a housekeeping thread, after each
commit and once at start-up (a crash between a save and its pruning is caught up). They
never delete the newest checkpoint, the one ``latest`` names, or anything that is not a
committed ckptstore checkpoint. A root belongs to one run (resumes included): retention
manages every committed checkpoint under it.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ckptstore.config import resolve_manifest_key
from ckptstore.engine import groups
from ckptstore.engine.checkpointer import Checkpointer
from ckptstore.engine.ops import (
    CheckpointInfo,
    fill_from_checkpoint,
    list_checkpoints,
    load_into,
    read_dcp_metadata,
    read_manifest,
)
from ckptstore.engine.pending import PendingSave
from ckptstore.errors import (
    BackgroundSaveError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptStoreError,
    CorruptCheckpointError,
    RankFailedError,
)
from ckptstore.integrations.trainstate import TrainState, _rank
from ckptstore.layout import FINALS_FILE, LATEST_FILE, MANIFEST_FILE, STEP_NAME, checkpoint_name
from ckptstore.manager import retention
from ckptstore.manager.policies import (
    EPOCH,
    ERROR,
    FINAL,
    INTERVAL,
    MANUAL,
    SIGNAL,
    AnyOf,
    CheckpointRecord,
    KeepBest,
    KeepEvery,
    KeepFinal,
    RetentionPolicy,
    SaveContext,
    SavePolicy,
)
from ckptstore.manager.replicate import BackupStatus, Replicator
from ckptstore.storage import StorageBackend, open_backend
from ckptstore.transfer import fetch

log = logging.getLogger("ckptstore")

# Parts of a TrainState whose shape only the checkpoint knows: loaded as stored.
_FLEXIBLE = ("counters", "extras", "scaler")
# What the ranks agree on every step: a save reason (by code), and a stop code.
_REASON_CODES = {None: 0, INTERVAL: 1, EPOCH: 2}
_CODE_REASONS = {v: k for k, v in _REASON_CODES.items()}
_ABORT = 255  # stop code: a rank's loop failed
_REPEAT_WINDOW_S = 1.0  # the same signal again within this: a duplicate, not a second


@dataclass(frozen=True)
class ManagedCheckpoint:
    """One committed checkpoint, as ``CheckpointManager.list()`` shows it."""

    step: int
    epoch: int | None
    reason: str | None  # why it was written (manifest)
    created_unix_s: float
    stored_bytes: int
    raw_bytes: int
    metrics: dict[str, float | None]
    tags: frozenset[str]  # "latest", "best", "final" (ended a completed run), "kept" (forever)
    url: str

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0


class CheckpointManager:
    """Save policies, retention, the ``latest`` pointer, ``best``, and full resume.

    ``save``: a :class:`~ckptstore.manager.policies.SavePolicy` (None: only on completion,
    signal and error). ``keep``: a :class:`~ckptstore.manager.policies.RetentionPolicy` (None:
    keep everything). ``enabled=False`` turns every write off (restore still reads).
    ``best_metric``/``best_mode`` name what "best" means (default: the metric of a
    ``KeepBest`` in ``keep``). Other keyword arguments configure the
    :class:`~ckptstore.Checkpointer` (``codec``, ``max_inflight``, ``threads``, ...).
    ``manifest_key`` (bytes) signs every manifest and is required of every checkpoint
    restored, listed, pruned or backed up, here and on the backup tier (see
    :class:`~ckptstore.engine.checkpointer.CheckpointerConfig`).
    Every rank constructs the manager (it creates process groups: a collective).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        save: SavePolicy | None = None,
        keep: RetentionPolicy | None = None,
        enabled: bool = True,
        best_metric: str | None = None,
        best_mode: str = "min",
        process_group: dist.ProcessGroup | None = None,
        storage_options: dict[str, Any] | None = None,
        backup: str | os.PathLike[str] | StorageBackend | None = None,
        backup_keep: RetentionPolicy | None = None,
        backup_options: dict[str, Any] | None = None,
        backup_max_queued: int = 1,
        backup_retry_max_s: float = 60.0,
        **checkpointer_config: Any,
    ) -> None:
        _check_policy(save, "save")
        _check_policy(keep, "keep")
        _check_policy(backup_keep, "keep")
        self.save_policy = save
        self.keep_policy = keep
        self.enabled = enabled
        found = _find(keep, KeepBest)
        if best_metric is None and isinstance(found, KeepBest):
            best_metric, best_mode = found.metric, found.mode
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.best_metric = best_metric
        self.best_mode = best_mode
        self._root = os.fspath(root) if isinstance(root, os.PathLike) else root
        self._storage_options = storage_options
        self._process_group = process_group
        # Signs and checks manifests here, on the backup and in restore-by-path too.
        self._manifest_key = resolve_manifest_key(checkpointer_config.get("manifest_key"))
        if not enabled:
            log.warning("checkpointing is disabled: nothing will be saved under %s", self._root)
            checkpointer_config.setdefault("sweep_grace_s", float("inf"))  # read-only
        self._ckpt: Checkpointer | None = None
        if (
            enabled
            or backup is not None
            or open_backend(self._root, storage_options=storage_options, create=False).list_names()
        ):
            self._ckpt = Checkpointer(
                self._root,
                process_group=process_group,
                storage_options=storage_options,
                **checkpointer_config,
            )
        # The caller's thread agrees with the other ranks on a group of its own.
        self._control = groups.dedicated_gloo_group(process_group)
        self._rank = groups.rank(self._control)
        self._world = groups.world_size(self._control)
        # Pointer updates and pruning: off the writer thread, in commit order.
        self._housekeeping = (
            ThreadPoolExecutor(1, thread_name_prefix="ckptstore-housekeeping")
            if enabled and self._rank == 0
            else None
        )
        self._lock = threading.Lock()
        self._last_done: int | None = None
        self._last_metrics: dict[str, float] | None = None
        self._last_epoch: int | None = None
        self._last_saved: int | None = None
        self._last_save_time = time.monotonic()
        self._boundary: dict[str, Any] | None = None
        self._stop: int | None = None
        self._stop_at = 0.0
        self._stop_saving = False
        self._guarding = False
        self._closed = False
        # The backup tier lives on rank 0, which sees the whole local root (one machine
        # or a shared file system). A missing bucket or wrong credentials fail here.
        self._remote: StorageBackend | None = None
        self._backup: Replicator | None = None
        self._has_backup = backup is not None
        self.backup_keep = backup_keep if backup_keep is not None else keep
        if backup is not None:
            self._open_backup(backup, backup_options, backup_max_queued, backup_retry_max_s)
        if enabled and self._rank == 0:
            self._prune()

    def _open_backup(
        self,
        backup: str | os.PathLike[str] | StorageBackend,
        options: dict[str, Any] | None,
        max_queued: int,
        retry_max_s: float,
    ) -> None:
        failure: BaseException | None = None
        outcome = "ok"
        if self._rank == 0:
            try:
                assert self._ckpt is not None
                self._remote = open_backend(backup, storage_options=options)
                if self.enabled:
                    self._backup = Replicator(
                        self._ckpt.backend,
                        self._remote,
                        keep=self.backup_keep,
                        max_queued=max_queued,
                        retry_max_s=retry_max_s,
                        on_backed_up=self._on_backed_up,
                        on_speed=self._ckpt.note_downstream,
                        manifest_key=self._manifest_key,
                    )
                else:
                    self._remote.check_access()
            except Exception as exc:
                failure, outcome = exc, f"{type(exc).__name__}: {exc}"
        outcome = str(groups.broadcast(outcome, self._control))
        if outcome == "ok" and self.enabled and self._ckpt is not None:
            # codec="auto" now minimises the time until backed up (every rank starts
            # compressed; rank 0 adapts to the upload speed it measures).
            self._ckpt.note_downstream(None)
        if outcome != "ok":
            self.close()
            if failure is not None:
                raise failure
            raise CkptStoreError(f"rank 0 could not open the backup {backup!r}: {outcome}")

    # ---- saving ---------------------------------------------------------------------
    def maybe_save(
        self,
        step: int,
        state: TrainState | dict[str, Any],
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
        if epoch is None and isinstance(state, TrainState):
            epoch = state.epoch
        if epoch is not None:
            self._last_epoch = epoch
        if isinstance(state, TrainState):
            state.step = steps_done
            state.epoch = epoch if epoch is not None else state.epoch
            self._track_best(state, metrics)
            self._boundary = state.boundary()
        reason = None
        if self.enabled and self.save_policy is not None and self._last_saved != steps_done:
            reason = self.save_policy.should_save(
                SaveContext(
                    steps_done=steps_done,
                    epoch=epoch,
                    end_of_epoch=end_of_epoch,
                    elapsed_s=time.monotonic() - self._last_save_time,
                    last_saved_step=self._last_saved,
                )
            )
        reason, stop = self._agree(reason, self._stop)
        if stop == _ABORT:
            raise RankFailedError("another rank's training loop failed: stopping this one too")
        if stop is not None:
            self._stop = self._stop or stop  # a signal to another rank stops this one too
            self._stop_saving = True
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
        state: TrainState | dict[str, Any],
        *,
        reason: str = MANUAL,
        epoch: int | None = None,
        metrics: dict[str, float] | None = None,
    ) -> PendingSave | None:
        """Save now, whatever the policy says; ``step`` as in :meth:`maybe_save` (the
        index of the step just done). None when checkpointing is disabled."""
        steps_done = _steps_done(step)
        self._last_done = steps_done
        if not self.enabled:
            return None
        if isinstance(state, TrainState):
            state.step = steps_done
            self._track_best(state, metrics)
        return self._save(steps_done, state, reason, epoch, metrics)

    def _save(
        self,
        steps_done: int,
        state: TrainState | dict[str, Any],
        reason: str,
        epoch: int | None,
        metrics: dict[str, float] | None,
        sd: dict[str, Any] | None = None,
    ) -> PendingSave:
        assert self._ckpt is not None
        name = checkpoint_name(steps_done)
        if self._ckpt.backend.exists(f"{name}/{MANIFEST_FILE}"):
            raise CheckpointExistsError(
                f"{self._ckpt.url}/{name} already exists: this run restored an earlier checkpoint "
                "and is training past it. Restore with newer='discard' to retire the newer "
                "checkpoints, or save into another root"
            )
        if sd is None:
            sd = state.state_dict() if isinstance(state, TrainState) else state
        if epoch is None:
            epoch = state.epoch if isinstance(state, TrainState) else self._last_epoch
        try:
            pending = self._ckpt.save_async(
                sd, steps_done, epoch=epoch, reason=reason, metrics=metrics
            )
        except BackgroundSaveError as exc:
            # An earlier save failed; this one was still started: keep track of it.
            if isinstance(exc.pending, PendingSave):
                self._track(exc.pending, steps_done)
            raise
        self._track(pending, steps_done)
        return pending

    def _track(self, pending: PendingSave, steps_done: int) -> None:
        self._last_saved = steps_done
        self._last_save_time = time.monotonic()
        if self._housekeeping is not None:
            pending.committed.add_done_callback(self._after_commit)

    def _after_commit(self, fut: Future[Any]) -> None:
        """Once a save is durable (on the writer thread): hand the rest to housekeeping."""
        if fut.exception() is None and self._housekeeping is not None:
            with contextlib.suppress(RuntimeError):  # shut down: nothing more to do
                self._housekeeping.submit(self._point_and_prune, fut.result().name)

    def _point_and_prune(self, name: str) -> None:
        assert self._ckpt is not None
        try:
            self._ckpt.backend.put_atomic(LATEST_FILE, f"{name}\n".encode())
        except CkptStoreError as exc:
            log.warning("could not update %s/%s: %s", self._ckpt.url, LATEST_FILE, exc)
        if self._backup is not None:
            self._backup.submit(name)
        self._prune()

    def _on_backed_up(self, name: str) -> None:
        """(backup thread) A checkpoint local retention had to spare may go now."""
        if self._housekeeping is not None:
            with contextlib.suppress(RuntimeError):  # shut down: nothing more to do
                self._housekeeping.submit(self._prune)

    def _track_best(self, state: TrainState, metrics: dict[str, float] | None) -> None:
        if not metrics or self.best_metric is None or self.best_metric not in metrics:
            return
        value = float(metrics[self.best_metric])
        old = state.best.get(self.best_metric)
        better = old is None or (value < old if self.best_mode == "min" else value > old)
        if better and value == value:  # not NaN
            state.best[self.best_metric] = value

    # ---- agreement between ranks ------------------------------------------------------
    def _agree(self, reason: str | None, stop: int | None) -> tuple[str | None, int | None]:
        """Every rank's save reason and stop code, agreed (the largest wins)."""
        if self._control is None:
            return reason, stop
        flags = torch.tensor([_REASON_CODES.get(reason, 1), stop or 0], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._control)
        return _CODE_REASONS[int(flags[0])], int(flags[1]) or None

    # ---- retention ------------------------------------------------------------------
    def _records(self, infos: builtins.list[CheckpointInfo]) -> builtins.list[CheckpointRecord]:
        assert self._ckpt is not None
        return retention.records(self._ckpt.backend, infos)

    def _prune(self) -> None:
        if self.keep_policy is None or self._ckpt is None:
            return
        try:
            spare = self._backup.busy() if self._backup is not None else set()
            retention.prune(
                self._ckpt.backend, self.keep_policy, spare=spare, manifest_key=self._manifest_key
            )
        except CkptStoreError as exc:  # storage trouble must not fail the save it follows
            log.warning("retention under %s failed: %s", self._ckpt.url, exc)

    def _read_latest(self) -> str | None:
        lines = self._read_lines(LATEST_FILE)
        return lines[0] if lines else None

    def _read_lines(self, name: str) -> builtins.list[str]:
        return [] if self._ckpt is None else retention.read_lines(self._ckpt.backend, name)

    def _record_final(self, name: str) -> None:
        assert self._ckpt is not None
        finals = self._read_lines(FINALS_FILE)
        if name not in finals:
            try:
                self._ckpt.backend.put_atomic(
                    FINALS_FILE, ("\n".join([*finals, name]) + "\n").encode()
                )
            except CkptStoreError as exc:
                log.warning("could not record %s as final: %s", name, exc)

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
        forever = _forever(self.keep_policy)
        if forever:
            kept = frozenset().union(*(p.keep(records) for p in forever))
        out = []
        for info, rec in zip(infos, records, strict=True):
            tags = set()
            if info.name == latest:
                tags.add("latest")
            if best is not None and rec.step == best.step:
                tags.add("best")
            if rec.reason == FINAL:
                tags.add("final")
            if rec.step in kept:
                tags.add("kept")
            m = info.manifest
            out.append(
                ManagedCheckpoint(
                    step=rec.step,
                    epoch=m.epoch,
                    reason=m.reason,
                    created_unix_s=m.created_unix_s,
                    stored_bytes=m.stored_bytes,
                    raw_bytes=m.raw_bytes,
                    metrics=dict(m.metrics),
                    tags=frozenset(tags),
                    url=info.url,
                )
            )
        return out

    def best(self) -> ManagedCheckpoint | None:
        """The best checkpoint by ``best_metric`` (signal and error saves never count)."""
        return next((e for e in self.list() if "best" in e.tags), None)

    def _best_record(self, records: builtins.list[CheckpointRecord]) -> CheckpointRecord | None:
        if self.best_metric is None:
            return None
        ranked = KeepBest(1, self.best_metric, self.best_mode).ranked(records)
        return ranked[0] if ranked else None

    # ---- restoring --------------------------------------------------------------------
    def restore(
        self,
        state: TrainState | dict[str, Any],
        which: str | int | None = "latest",
        *,
        newer: str = "keep",
    ) -> int:
        """Restore ``state`` from a checkpoint; return the steps it had done (0: none).

        ``which``: ``"latest"`` (default: the newest checkpoint that loads; a missing,
        stale or damaged ``latest`` pointer or checkpoint is skipped with a warning),
        ``"best"``, a step (``500`` or ``"step_00000500"``), the path of a checkpoint
        directory, or ``"none"``. Restoring an earlier checkpoint and training on would
        collide with the newer ones: ``newer="discard"`` deletes them (rank 0), else the
        first save past them fails.
        """
        if newer not in ("keep", "discard"):
            raise ValueError(f"newer must be 'keep' or 'discard', got {newer!r}")
        if which is None or which == "none":
            return 0
        if isinstance(which, str) and which not in ("latest", "best"):
            match = STEP_NAME.match(which)
            if which.isdigit() or match:
                which = int(match.group(1)) if match else int(which)
            else:
                return self._restore_path(state, which)
        if which == "best" and self.best_metric is None:
            raise ValueError("restore('best') needs best_metric= (or a KeepBest in keep=)")
        if self._ckpt is None:
            if which == "latest":
                log.info("nothing to resume under %s: starting from scratch", self._root)
                return 0
            raise CheckpointNotFoundError(f"no checkpoints under {self._root}")
        candidates = self._candidates(which)
        if not candidates:
            if which == "latest":
                log.info("nothing to resume under %s: starting from scratch", self._ckpt.url)
                return 0
            raise CheckpointNotFoundError(f"no {which} checkpoint under {self._ckpt.url}")
        skipped: builtins.list[str] = []
        for step in candidates:
            try:
                info = self._load_with_backup(state, step)
            except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                if len(candidates) == 1 or isinstance(which, int):
                    raise
                log.warning("skipping step %d: %s", step, exc)
                skipped.append(f"step {step} ({type(exc).__name__})")
                continue
            if skipped:
                log.warning("restored step %d after skipping %s", info.step, ", ".join(skipped))
            self._handle_newer(info, newer)
            return self._resumed(info)
        raise CorruptCheckpointError(
            f"no checkpoint under {self._ckpt.url} could be loaded (tried {', '.join(skipped)}); "
            "run Checkpointer(root).verify(step) to see what is damaged"
        )

    def _load_with_backup(self, state: TrainState | dict[str, Any], step: int) -> CheckpointInfo:
        """Load ``step`` from the local root; from the backup if it is missing or damaged
        locally (downloaded into the local root first, verified)."""
        fetched = self._fetch(step, replace=False)
        try:
            return self._load_step(state, step)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            if fetched or not self._fetch(step, replace=True):
                raise
            log.warning(
                "the local copy of step %d failed (%s); loaded the backup's copy", step, exc
            )
            return self._load_step(state, step)

    def _fetch(self, step: int, *, replace: bool) -> bool:
        """Rank 0 downloads ``step`` from the backup (if it has it and the local root does
        not, or ``replace``); every rank learns whether it did."""
        if not self._has_backup:
            return False
        outcome = "no"
        if self._rank == 0 and self._remote is not None and self._ckpt is not None:
            name = checkpoint_name(step)
            try:
                here = self._ckpt.backend.exists(f"{name}/{MANIFEST_FILE}")
                if (replace or not here) and self._remote.exists(f"{name}/{MANIFEST_FILE}"):
                    fetch(
                        self._remote,
                        self._ckpt.backend,
                        name,
                        replace=replace,
                        manifest_key=self._manifest_key,
                    )
                    outcome = "ok"
            except Exception as exc:
                log.warning("could not download %s from %s: %s", name, self._remote.url, exc)
        return groups.broadcast(outcome, self._control) == "ok"

    def _candidates(self, which: str | int) -> builtins.list[int]:
        """Steps to try, in order; decided on rank 0 and shared with every rank."""
        assert self._ckpt is not None
        decision: tuple[str, Any] = ("ok", [])
        failure: BaseException | None = None
        if self._rank == 0:
            try:
                decision = ("ok", self._order(which))
            except Exception as exc:
                failure = exc
                decision = ("error", f"{type(exc).__name__}: {exc}")
        decision = groups.broadcast(decision, self._control)  # type: ignore[assignment]
        if decision[0] == "error":
            if failure is not None:
                raise failure
            raise CkptStoreError(f"rank 0 could not choose a checkpoint to restore: {decision[1]}")
        return [int(s) for s in decision[1]]

    def _order(self, which: str | int) -> builtins.list[int]:
        assert self._ckpt is not None
        infos = self._ckpt.list()
        local_count = len(infos)
        if self._remote is not None:
            here = {i.name for i in infos}
            try:
                remote = [
                    i
                    for i in list_checkpoints(self._remote, manifest_key=self._manifest_key)
                    if i.name not in here
                ]
            except CkptStoreError as exc:
                log.warning("could not list the backup %s: %s", self._remote.url, exc)
                remote = []
            if remote:
                log.info(
                    "the backup %s also has %s", self._remote.url, ", ".join(i.name for i in remote)
                )
            infos = sorted(infos + remote, key=lambda i: i.manifest.step or 0)
        records = self._records(infos)
        if isinstance(which, int):
            return [which]
        if which == "best":
            assert self.best_metric is not None
            return [r.step for r in KeepBest(1, self.best_metric, self.best_mode).ranked(records)]
        order = sorted((r.step for r in records), reverse=True)
        pointed = self._read_latest()
        names = {i.name: (i.step or 0) for i in infos}
        if pointed is None and order and local_count:
            log.warning(
                "no %s pointer under %s: using the newest checkpoint", LATEST_FILE, self._ckpt.url
            )
        elif pointed is not None and pointed not in names:
            log.warning(
                "%s names %s, which is not a committed checkpoint: ignored", LATEST_FILE, pointed
            )
        elif pointed is not None and order and names[pointed] != order[0]:
            log.warning(
                "%s names %s but step %d is newer (a crash before the pointer moved?): using the newer",
                LATEST_FILE,
                pointed,
                order[0],
            )
        return order

    def _load_step(self, state: TrainState | dict[str, Any], step: int) -> CheckpointInfo:
        assert self._ckpt is not None
        if not isinstance(state, TrainState):
            return self._ckpt.load(state, step)
        # Every rank reads the metadata; they agree that all could before the collective
        # load, so that a rank that could not does not go its own way.
        metadata, problem = None, None
        try:
            metadata = self._ckpt.read_metadata(step)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            problem = exc
        _, failed = self._agree(None, 1 if problem is not None else None)
        if failed:
            raise problem or CorruptCheckpointError(
                f"step {step}: another rank could not read its metadata"
            )
        target = self._target(state, metadata)
        info = self._ckpt.load(target, step)
        state.load_state_dict(target)
        return info

    def _restore_path(self, state: TrainState | dict[str, Any], path: str) -> int:
        if "://" in path:
            root, name = path.rstrip("/").rsplit("/", 1)
        else:
            root, name = os.path.split(os.path.abspath(path))
        backend = open_backend(root, storage_options=self._storage_options, create=False)
        key = self._manifest_key
        with groups.caller_group(self._process_group) as group:
            if isinstance(state, TrainState):
                manifest = read_manifest(backend, name, manifest_key=key)
                target = self._target(state, read_dcp_metadata(backend, name, manifest))
                manifest = load_into(
                    target, backend, name, pool=None, group=group, manifest_key=key
                )
                state.load_state_dict(target)
            else:
                manifest = load_into(state, backend, name, pool=None, group=group, manifest_key=key)
        return self._resumed(CheckpointInfo(name, f"{backend.url}/{name}", manifest))

    def _target(self, state: TrainState, metadata: Any) -> dict[str, Any]:
        """What to load into: the state's own dict, with the flexible parts shaped as stored."""
        target = state.state_dict()
        stored = {str(p[0]) for p in _paths(metadata)}
        for part in ("scheduler", "scaler", "data", "extras"):
            if part in target and part not in stored:
                log.warning(
                    "the checkpoint has no %r: that part of the state is not restored", part
                )
                target.pop(part)
        for part in _FLEXIBLE:
            target.pop(part, None)
            fill_from_checkpoint(target, metadata, _under(part))
        mine = f"rank{_rank()}"  # the global rank, as TrainState saves it
        target.pop("rng", None)
        if state.rng and not fill_from_checkpoint(
            target, metadata, lambda p: p[:2] == ("rng", mine)
        ):
            log.warning(
                "the checkpoint has no generator state for %s (saved on fewer ranks?): not restored",
                mine,
            )
        return target

    def _handle_newer(self, info: CheckpointInfo, newer: str) -> None:
        if not self.enabled or self._ckpt is None or self._rank != 0:
            return
        later = [i for i in self._ckpt.list() if (i.step or 0) > (info.step or 0)]
        if not later:
            return
        if newer == "discard":
            for i in later:
                self._ckpt.backend.delete(i.name)
            self._ckpt.backend.put_atomic(LATEST_FILE, f"{info.name}\n".encode())
            log.warning(
                "retired %d checkpoint(s) newer than %s: %s",
                len(later),
                info.name,
                [i.name for i in later],
            )
        else:
            log.warning(
                "%d checkpoint(s) newer than %s exist (%s); training on will fail to save where "
                "they are: restore with newer='discard' to retire them",
                len(later),
                info.name,
                later[-1].name,
            )

    def _resumed(self, info: CheckpointInfo) -> int:
        steps = info.step or 0
        self._last_done = steps
        self._last_saved = steps
        self._last_epoch = info.manifest.epoch
        log.info("resumed from %s (step %d)", info.name, steps)
        return steps

    # ---- signals, completion, errors --------------------------------------------------
    @contextlib.contextmanager
    def guard(self, state: TrainState | dict[str, Any]) -> Iterator[CheckpointManager]:
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
                self._tell_others_and_leave()
                log.error("the loop failed on this rank; with several ranks the error is not saved")
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

    def _complete(self, state: TrainState | dict[str, Any]) -> None:
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
            self._agree(None, _ABORT)

    def _save_last(self, state: TrainState | dict[str, Any], reason: str) -> None:
        """Save the state of the last completed step after an error or interrupt."""
        if not self.enabled or self._last_done is None or self._last_saved == self._last_done:
            return
        sd = None
        if isinstance(state, TrainState) and self._boundary is not None:
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

    # ---- waiting and closing --------------------------------------------------------
    def wait(self) -> None:
        """Wait until every save in flight is durable and ``latest`` has moved; raise if
        a save failed."""
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
                groups.release(self._control)

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


def _under(part: str) -> Callable[[tuple[Any, ...]], bool]:
    return lambda path: bool(path) and path[0] == part


def _paths(metadata: Any) -> builtins.list[tuple[Any, ...]]:
    planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    out: builtins.list[tuple[Any, ...]] = []
    for fqn in metadata.state_dict_metadata:
        path = planner_data.get(fqn)
        out.append(path if isinstance(path, tuple) and path else tuple(fqn.split(".")))
    return out


def _steps_done(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be the loop's 0-based step index, got {step!r}")
    return step + 1


def _check_policy(policy: object, kind: str) -> None:
    """Refuse a policy of the wrong kind now, not at the first save or prune."""
    if policy is None:
        return
    members = policy.policies if isinstance(policy, AnyOf) else (policy,)
    for p in members:
        if isinstance(p, AnyOf):
            _check_policy(p, kind)
            continue
        wanted = SavePolicy if kind == "save" else RetentionPolicy
        if not isinstance(p, wanted):
            example = "SaveEvery(steps=500)" if kind == "save" else "KeepLast(3)"
            raise TypeError(f"{kind}= needs {wanted.__name__}s such as {example}; got {p!r}")


def _find(policy: object, cls: type) -> object | None:
    if isinstance(policy, cls):
        return policy
    if isinstance(policy, AnyOf):
        for p in policy.policies:
            found = _find(p, cls)
            if found is not None:
                return found
    return None


def _forever(policy: object) -> builtins.list[RetentionPolicy]:
    """The parts of a retention policy that keep checkpoints for good (not KeepLast)."""
    if isinstance(policy, (KeepEvery, KeepFinal, KeepBest)):
        return [policy]
    if isinstance(policy, AnyOf):
        out: builtins.list[RetentionPolicy] = []
        for p in policy.policies:
            out += _forever(p)
        return out
    return []
