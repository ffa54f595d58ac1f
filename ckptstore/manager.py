"""``CheckpointManager``: when to save, what to keep, and resuming a run, on a Checkpointer.

::

    mgr = ckptstore.CheckpointManager(
        "runs/exp1",
        save=AnyOf(SaveEvery(steps=500), SaveEvery(epochs=1)),
        keep=AnyOf(KeepLast(3), KeepEvery(epochs=1), KeepBest(1, metric="val_loss")),
    )
    state = ckptstore.TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader)
    start = mgr.restore(state)                    # steps done by the restored run; 0 if none
    with mgr.guard(state):                        # saves on completion, Ctrl+C, SIGTERM, error
        for step in range(start, total_steps):
            ...
            mgr.maybe_save(step, state, epoch=epoch, metrics={"val_loss": val_loss})

``step`` is the loop's index of the step just completed; the checkpoint records the
steps *done* (``step + 1``), and ``restore`` returns that number, the index to resume at.

Signals: inside :meth:`guard`, the first SIGINT or SIGTERM is noted, and at the end of
the step in progress (the next :meth:`maybe_save`) the state is saved (reason
``"signal"``) and the process exits with 130 or 143. A second signal exits at once; the
save it interrupts is never committed, so nothing half-written is visible. With several
ranks, the ranks agree on the stop at every step (one tiny gloo all-reduce) so they all
save the same step.

Retention runs on rank 0 after each commit, and once at start-up (a crash between a
save and its pruning is caught up). It never deletes the newest checkpoint, the one
``latest`` names, or anything that is not a committed ckptstore checkpoint.
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
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ckptstore import _dist
from ckptstore.background import PendingSave
from ckptstore.checkpoint import (
    CheckpointInfo,
    fill_from_checkpoint,
    load_into,
    read_dcp_metadata,
    read_manifest,
)
from ckptstore.checkpointer import Checkpointer
from ckptstore.errors import CheckpointNotFoundError, CkptStoreError, CorruptCheckpointError
from ckptstore.policies import (
    ERROR,
    FINAL,
    MANUAL,
    SIGNAL,
    AnyOf,
    CheckpointRecord,
    KeepBest,
    RetentionPolicy,
    SaveContext,
    SavePolicy,
)
from ckptstore.storage import open_backend
from ckptstore.trainstate import TrainState

log = logging.getLogger("ckptstore")

LATEST_FILE = "latest"
# Parts of a TrainState whose shape only the checkpoint knows: loaded as stored.
_FLEXIBLE = ("counters", "extras", "scaler")


@dataclass(frozen=True)
class ManagedCheckpoint:
    """One committed checkpoint, as ``CheckpointManager.list()`` shows it."""

    step: int
    epoch: int | None
    reason: str | None
    created_unix_s: float
    stored_bytes: int
    raw_bytes: int
    metrics: dict[str, float | None]
    tags: frozenset[str]  # "latest", "best", "kept" (forever, by a KeepEvery/KeepFinal/KeepBest)
    url: str

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0


class CheckpointManager:
    """Save policies, retention, the ``latest`` pointer, ``best``, and full resume.

    ``save``: a :class:`~ckptstore.policies.SavePolicy` (None: only on completion,
    signal and error). ``keep``: a :class:`~ckptstore.policies.RetentionPolicy` (None:
    keep everything). ``enabled=False`` turns every write off (restore still reads).
    ``best_metric``/``best_mode`` name what "best" means (default: the metric of a
    ``KeepBest`` in ``keep``). Other keyword arguments configure the
    :class:`~ckptstore.Checkpointer` (``codec``, ``max_inflight``, ``threads``, ...).
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
        **checkpointer_config: Any,
    ) -> None:
        if save is not None and not isinstance(save, SavePolicy):
            raise TypeError(
                f"save must be a save policy such as SaveEvery(steps=500), got {save!r}"
            )
        if keep is not None and not isinstance(keep, RetentionPolicy):
            raise TypeError(f"keep must be a retention policy such as KeepLast(3), got {keep!r}")
        self.save_policy = save
        self.keep_policy = keep
        self.enabled = enabled
        found = _find_keep_best(keep)
        if best_metric is None and found is not None:
            best_metric, best_mode = found.metric, found.mode
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.best_metric = best_metric
        self.best_mode = best_mode
        self._root = os.fspath(root) if isinstance(root, os.PathLike) else root
        if not enabled:
            log.warning("checkpointing is disabled: nothing will be saved under %s", self._root)
            # Read-only: no start-up sweep, and no directory is created.
            checkpointer_config.setdefault("sweep_grace_s", float("inf"))
        self._ckpt: Checkpointer | None = None
        if (
            enabled
            or open_backend(self._root, storage_options=storage_options, create=False).list_names()
        ):
            self._ckpt = Checkpointer(
                self._root,
                process_group=process_group,
                storage_options=storage_options,
                **checkpointer_config,
            )
        # For agreeing on a stop at every step, on the caller's thread: a group of its own.
        self._control = _dist.dedicated_gloo_group(process_group)
        self._rank = _dist.rank(self._control)
        self._world = _dist.world_size(self._control)
        self._lock = threading.Lock()
        self._pending: list[PendingSave] = []
        self._last_done: int | None = None
        self._last_metrics: dict[str, float] | None = None  # of the last step done
        self._last_epoch: int | None = None
        self._last_saved: int | None = None
        self._last_save_time = time.monotonic()
        self._stop: int | None = None
        self._guarding = False
        self._closed = False
        if enabled and self._rank == 0:
            self._prune()

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
        the state is saved and the process exits with 130 / 143.
        """
        steps_done = _steps_done(step)
        self._last_done = steps_done
        self._last_metrics = dict(metrics) if metrics else None
        if epoch is not None:
            self._last_epoch = epoch
        if isinstance(state, TrainState):
            state.step = steps_done
            if epoch is not None:
                state.epoch = epoch
            self._track_best(state, metrics)
        stop = self._agree_stop()
        pending = None
        if self.enabled and self._last_saved != steps_done:
            reason = None
            if self.save_policy is not None:
                reason = self.save_policy.should_save(
                    SaveContext(
                        steps_done=steps_done,
                        epoch=epoch,
                        end_of_epoch=end_of_epoch,
                        elapsed_s=time.monotonic() - self._last_save_time,
                        last_saved_step=self._last_saved,
                    )
                )
            if reason is None and stop is not None:
                reason = SIGNAL
            if reason is not None:
                pending = self._save(steps_done, state, reason, epoch, metrics)
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
        """Save now, whatever the policy says (None when checkpointing is disabled)."""
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
    ) -> PendingSave:
        assert self._ckpt is not None
        sd = state.state_dict() if isinstance(state, TrainState) else state
        if epoch is None:
            epoch = state.epoch if isinstance(state, TrainState) else self._last_epoch
        pending = self._ckpt.save_async(sd, steps_done, epoch=epoch, reason=reason, metrics=metrics)
        self._last_saved = steps_done
        self._last_save_time = time.monotonic()
        if self._rank == 0:
            pending.committed.add_done_callback(self._after_commit)
        with self._lock:
            self._pending = [p for p in self._pending if not p.done()] + [pending]
        return pending

    def _after_commit(self, fut: Any) -> None:
        """On the writer thread, once a save is durable: move ``latest``, then prune."""
        if fut.exception() is not None:
            return
        result = fut.result()
        assert self._ckpt is not None
        try:
            self._ckpt.backend.put_atomic(LATEST_FILE, f"{result.name}\n".encode())
        except CkptStoreError as exc:
            log.warning("could not update %s/%s: %s", self._ckpt.url, LATEST_FILE, exc)
        self._prune()

    def _track_best(self, state: TrainState, metrics: dict[str, float] | None) -> None:
        if not metrics or self.best_metric is None or self.best_metric not in metrics:
            return
        value = float(metrics[self.best_metric])
        old = state.best.get(self.best_metric)
        better = old is None or (value < old if self.best_mode == "min" else value > old)
        if better and value == value:  # not NaN
            state.best[self.best_metric] = value

    # ---- retention ------------------------------------------------------------------
    def _prune(self) -> None:
        if self.keep_policy is None or self._ckpt is None:
            return
        try:
            infos = self._ckpt.list()
            if not infos:
                return
            records = [_record(i) for i in infos]
            keep = set(self.keep_policy.keep(records))
            keep.add(max(r.step for r in records))  # never the newest
            pointed = self._read_latest()
            by_name = {i.name: i for i in infos}
            if pointed in by_name:
                keep.add(by_name[pointed].step or 0)
            for info in infos:
                if info.step not in keep:
                    self._ckpt.backend.delete(info.name)
                    log.info("retention: deleted %s", info.name)
        except Exception as exc:  # a failed prune must not fail the save it follows
            log.warning("retention under %s failed: %s", self._ckpt.url, exc)

    def _read_latest(self) -> str | None:
        assert self._ckpt is not None
        try:
            return self._ckpt.backend.read_bytes(LATEST_FILE).decode().strip() or None
        except (FileNotFoundError, UnicodeDecodeError, CkptStoreError):
            return None

    # ---- listing ----------------------------------------------------------------------
    def list(self) -> builtins.list[ManagedCheckpoint]:
        """Committed checkpoints, oldest first, with reason, size, ratio, metrics and tags."""
        if self._ckpt is None:
            return []
        infos = self._ckpt.list()
        records = [_record(i) for i in infos]
        latest = self._read_latest()
        best = self._best_record(records)
        kept: frozenset[int] = frozenset()
        if self.keep_policy is not None:
            forever = _forever_policies(self.keep_policy)
            kept = (
                frozenset().union(*(p.keep(records) for p in forever)) if forever else frozenset()
            )
        out = []
        for info, rec in zip(infos, records, strict=True):
            tags = set()
            if info.name == latest:
                tags.add("latest")
            if best is not None and rec.step == best.step:
                tags.add("best")
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
        entries = self.list()
        for e in entries:
            if "best" in e.tags:
                return e
        return None

    def _best_record(self, records: builtins.list[CheckpointRecord]) -> CheckpointRecord | None:
        if self.best_metric is None:
            return None
        ranked = KeepBest(1, self.best_metric, self.best_mode).ranked(records)
        return ranked[0] if ranked else None

    # ---- restoring --------------------------------------------------------------------
    def restore(
        self, state: TrainState | dict[str, Any], which: str | int | None = "latest"
    ) -> int:
        """Restore ``state`` from a checkpoint; return the steps it had done (0: none).

        ``which``: ``"latest"`` (default: the newest checkpoint that loads; a missing,
        stale or damaged ``latest`` pointer or checkpoint is skipped with a warning),
        ``"best"``, a step number, the path of a checkpoint directory, or ``"none"``.
        """
        if which is None or which == "none":
            return 0
        if isinstance(which, str) and which not in ("latest", "best"):
            if which.isdigit():
                which = int(which)
            else:
                return self._restore_path(state, which)
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
                info = self._load_step(state, step)
            except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                if len(candidates) == 1 or isinstance(which, int):
                    raise
                log.warning("skipping step %d: %s", step, exc)
                skipped.append(f"step {step} ({type(exc).__name__})")
                continue
            if skipped:
                log.warning("restored step %d after skipping %s", info.step, ", ".join(skipped))
            return self._resumed(state, info)
        raise CorruptCheckpointError(
            f"no checkpoint under {self._ckpt.url} could be loaded (tried {', '.join(skipped)}); "
            "run Checkpointer(root).verify(step) to see what is damaged"
        )

    def _candidates(self, which: str | int) -> builtins.list[int]:
        """Steps to try, in order; decided on rank 0 and shared with every rank."""
        assert self._ckpt is not None
        order: builtins.list[int] = []
        if self._rank == 0:
            infos = self._ckpt.list()
            records = [_record(i) for i in infos]
            if isinstance(which, int):
                order = [which]
            elif which == "best":
                if self.best_metric is None:
                    raise ValueError("restore('best') needs best_metric= (or a KeepBest in keep=)")
                order = [
                    r.step for r in KeepBest(1, self.best_metric, self.best_mode).ranked(records)
                ]
            else:
                order = sorted((r.step for r in records), reverse=True)
                pointed = self._read_latest()
                names = {i.name: (i.step or 0) for i in infos}
                if pointed is None and order:
                    log.warning(
                        "no %s pointer under %s: using the newest checkpoint",
                        LATEST_FILE,
                        self._ckpt.url,
                    )
                elif pointed is not None and pointed not in names:
                    log.warning(
                        "%s names %s, which is not a committed checkpoint: ignored",
                        LATEST_FILE,
                        pointed,
                    )
                elif pointed is not None and order and names[pointed] != order[0]:
                    log.warning(
                        "%s names %s but step %d is newer (a crash before the pointer moved?): using the newer",
                        LATEST_FILE,
                        pointed,
                        order[0],
                    )
        shared = _dist.broadcast(order, self._control)
        assert isinstance(shared, builtins.list)
        return [int(s) for s in shared]

    def _load_step(self, state: TrainState | dict[str, Any], step: int) -> CheckpointInfo:
        assert self._ckpt is not None
        if not isinstance(state, TrainState):
            return self._ckpt.load(state, step)
        target = self._target(state, self._ckpt.read_metadata(step))
        info = self._ckpt.load(target, step)
        state.load_state_dict(target)
        return info

    def _restore_path(self, state: TrainState | dict[str, Any], path: str) -> int:
        root, name = (
            os.path.split(os.path.abspath(path))
            if "://" not in path
            else path.rstrip("/").rsplit("/", 1)
        )
        backend = open_backend(root, create=False)
        with _dist.caller_group(None) as group:
            if isinstance(state, TrainState):
                manifest = read_manifest(backend, name)
                target = self._target(state, read_dcp_metadata(backend, name, manifest))
                manifest = load_into(target, backend, name, pool=None, group=group)
                state.load_state_dict(target)
            else:
                manifest = load_into(state, backend, name, pool=None, group=group)
        return self._resumed(state, CheckpointInfo(name, f"{backend.url}/{name}", manifest))

    def _target(self, state: TrainState, metadata: Any) -> dict[str, Any]:
        """What to load into: the state's own dict, with the flexible parts shaped as stored."""
        target = state.state_dict()
        for part in _FLEXIBLE:
            target.pop(part, None)
            fill_from_checkpoint(target, metadata, _under(part))
        mine = f"rank{self._rank}"
        target.pop("rng", None)
        if state.rng and not fill_from_checkpoint(
            target, metadata, lambda p: p[:2] == ("rng", mine)
        ):
            log.warning(
                "the checkpoint has no generator state for %s (saved on fewer ranks?): not restored",
                mine,
            )
        return target

    def _resumed(self, state: TrainState | dict[str, Any], info: CheckpointInfo) -> int:
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
        except KeyboardInterrupt:
            self._save_last(state, SIGNAL)
            self.wait_quietly()
            raise SystemExit(128 + signal.SIGINT) from None
        except BaseException:
            if self._world > 1:
                log.error(
                    "an error escaped the loop; with several ranks it cannot be saved collectively"
                )
            else:
                self._save_last(state, ERROR)
            self.wait_quietly()
            raise
        else:
            self._save_last(state, FINAL)
            self.wait()
            if self._stop is not None:
                self._exit_on_signal(self._stop)
        finally:
            self._guarding = False
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _save_last(self, state: TrainState | dict[str, Any], reason: str) -> None:
        if not self.enabled or self._last_done is None or self._last_saved == self._last_done:
            return
        try:
            # The last step's metrics go with it (a final save can be the best one).
            self._save(self._last_done, state, reason, None, self._last_metrics).wait()
            log.warning("saved step %d (%s)", self._last_done, reason)
        except Exception as exc:
            log.error("the %s save of step %d failed: %s", reason, self._last_done, exc)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop is not None:
            os.write(
                2, b"ckptstore: second signal: exiting now; the save in progress is discarded\n"
            )
            os._exit(128 + signum)
        self._stop = signum
        name = signal.Signals(signum).name
        os.write(
            2,
            f"ckptstore: {name}: saving at the end of this step, then exiting (again: exit now)\n".encode(),
        )

    def _agree_stop(self) -> int | None:
        if self._control is None or not self._guarding:
            return self._stop
        flag = torch.tensor([self._stop or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._control)
        agreed = int(flag.item())
        if agreed and self._stop is None:
            self._stop = agreed  # another rank was signalled: stop here too, at the same step
        return agreed or None

    def _exit_on_signal(self, signum: int) -> None:
        self.wait_quietly()
        log.warning("stopped by %s after step %s", signal.Signals(signum).name, self._last_done)
        raise SystemExit(128 + signum)

    # ---- waiting and closing --------------------------------------------------------
    def wait(self) -> None:
        """Wait until every save in flight is durable; raise if one failed."""
        if self._ckpt is not None:
            self._ckpt.wait()

    def wait_quietly(self) -> None:
        try:
            self.wait()
        except Exception as exc:
            log.error("a save failed: %s", exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._ckpt is not None:
                self._ckpt.close()
        finally:
            _dist.release(self._control)

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


def _steps_done(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be the loop's 0-based step index, got {step!r}")
    return step + 1


def _record(info: CheckpointInfo) -> CheckpointRecord:
    m = info.manifest
    return CheckpointRecord(
        step=m.step or 0,
        epoch=m.epoch,
        reason=m.reason,
        metrics=dict(m.metrics),
        created_unix_s=m.created_unix_s,
    )


def _find_keep_best(policy: object) -> KeepBest | None:
    if isinstance(policy, KeepBest):
        return policy
    if isinstance(policy, AnyOf):
        for p in policy.policies:
            found = _find_keep_best(p)
            if found is not None:
                return found
    return None


def _forever_policies(policy: object) -> builtins.list[RetentionPolicy]:
    """The parts of a retention policy that keep checkpoints for good (not KeepLast)."""
    from ckptstore.policies import KeepEvery, KeepFinal

    if isinstance(policy, (KeepEvery, KeepFinal, KeepBest)):
        return [policy]
    if isinstance(policy, AnyOf):
        out: builtins.list[RetentionPolicy] = []
        for p in policy.policies:
            out += _forever_policies(p)
        return out
    return []
