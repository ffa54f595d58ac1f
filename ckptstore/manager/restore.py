"""Restoring a run: which checkpoint (latest, best, a step, a path), from which tier
(local first, the backup when missing or damaged there), and what to do with newer ones.

The half of :class:`~ckptstore.CheckpointManager` that reads; it decides on rank 0 and
tells every rank, so that all load the same checkpoint together.
"""

from __future__ import annotations

import builtins
import logging
from typing import TYPE_CHECKING, Any

from ckptstore.engine import groups, nodelocal
from ckptstore.engine.ops import (
    CheckpointInfo,
    list_checkpoints,
    load_into,
    read_dcp_metadata,
    read_manifest,
)
from ckptstore.errors import (
    CheckpointNotFoundError,
    CkptStoreError,
    CorruptCheckpointError,
    InvalidArgumentError,
    PartElsewhereError,
    without_verify_hint,
)
from ckptstore.layout import (
    LATEST_FILE,
    MANIFEST_FILE,
    STEP_NAME,
    checkpoint_name,
    split_checkpoint_path,
)
from ckptstore.manager.agreement import Flags, StepAgreement
from ckptstore.manager.branch import NEWER_CHOICES
from ckptstore.manager.load_errors import agreed_error
from ckptstore.manager.newer import NewerMixin
from ckptstore.manager.policies import CheckpointRecord, KeepBest
from ckptstore.manager.resumable import Resumable
from ckptstore.storage import StorageBackend, open_backend
from ckptstore.transfer import fetch

log = logging.getLogger("ckptstore")


class RestoreMixin(NewerMixin):
    """``CheckpointManager.restore`` and what it needs; mixed into the manager, whose
    constructor sets these attributes (and those of :class:`NewerMixin`)."""

    best_metric: str | None
    best_mode: str
    _root: str
    _has_backup: bool
    _agreement: StepAgreement | None  # None with one rank
    _storage_options: dict[str, Any] | None
    _process_group: Any
    _last_done: int | None
    restored: str | None
    _last_saved: int | None
    _last_epoch: int | None
    _load_options: dict[str, bool] = {}  # noqa: RUF012 - set per restore(), never mutated
    _from_backup: frozenset[int] | set[int] = frozenset()  # steps only on the backup (node-local)
    _heal_pending: bool
    _healed_from: int
    _links_read: tuple[str, bool] | None

    if TYPE_CHECKING:  # provided by CheckpointManager

        def _agree(self, reason: str | None, stop: int | None, *, fold: bool = True) -> Flags: ...

        def _records(
            self, infos: builtins.list[CheckpointInfo]
        ) -> builtins.list[CheckpointRecord]: ...

        def _read_latest(self) -> str | None: ...

    def restore(
        self,
        state: Resumable | dict[str, Any],
        which: str | int | None = "latest",
        *,
        newer: str = "keep",
        allow_partial: bool = False,
        allow_cast: bool = False,
    ) -> int:
        """Restore ``state`` from a checkpoint; return the steps it had done (0: none).

        ``which``: ``"latest"`` (default: the newest checkpoint that loads; a missing,
        stale or damaged ``latest`` pointer or checkpoint is skipped with a warning),
        ``"best"``, a step (``500`` or ``"step_00000500"``), the path of a checkpoint
        directory, or ``"none"``.

        ``newer``: what to do with checkpoints newer than the one restored (with
        ``"none"``: with any checkpoint), here or on the backup, which training on would
        save over. ``"keep"`` (default) leaves them, with a warning: the first save past
        them fails. ``"refuse"`` raises :class:`~ckptstore.errors.NewerCheckpointsError`
        before anything is changed (what ``ckptstore train`` does without
        ``--discard-newer``). ``"discard"`` moves them aside as ``step_N.retired-<UTC>``
        (never deleted) and goes on as a new branch of the run.

        ``allow_partial`` leaves the parts of ``state`` the checkpoint lacks as they are;
        ``allow_cast`` loads tensors into targets of a dtype that cannot hold them exactly
        (both as in :meth:`Checkpointer.load`).

        Then (rank 0) a warning names the checkpoints of other runs found in the local
        root or the backup, which this run did not resume. :attr:`restored` names the
        checkpoint loaded (None: none; a checkpoint of step 0 returns 0 too).
        """
        if newer not in NEWER_CHOICES:
            raise InvalidArgumentError(
                f"newer must be one of {', '.join(NEWER_CHOICES)}, got {newer!r}"
            )
        self._load_options = {"allow_partial": allow_partial, "allow_cast": allow_cast}
        if self._agreement is not None:  # its collectives go after a step's agreement
            self._agreement.settle()
        self.restored = None
        steps = self._restore(state, which, newer)
        if self._ckpt is not None and self._ckpt.node_local:
            # Node-local disks: every rank returns once each disk's first rank has pruned,
            # set aside or retired that disk's parts; a rank that went on before found
            # them still there, and its next save failed alone.
            groups.all_gather(None, self._control)
        self._note_other_runs(resumed=self.restored is not None)
        return steps

    def _restore(
        self, state: Resumable | dict[str, Any], which: str | int | None, newer: str
    ) -> int:
        if which is None or which == "none":
            self._handle_newer(None, newer)
            return 0
        if isinstance(which, str) and which not in ("latest", "best"):
            match = STEP_NAME.match(which)
            if which.isdigit() or match:
                which = int(match.group(1)) if match else int(which)
            else:
                return self._restore_path(state, which, newer)
        if which == "best" and self.best_metric is None:
            raise InvalidArgumentError(
                "restore('best') needs best_metric= (or a KeepBest in keep=)"
            )
        if self._ckpt is None:
            if which == "latest":
                log.info("nothing to resume under %s: starting from scratch", self._root)
                return 0
            raise CheckpointNotFoundError(f"no checkpoints under {self._root}")
        candidates = self._candidates(which)
        if not candidates:
            if which == "latest":
                # (node-local parts complete on some disks only: refused, kept or retired)
                self._handle_newer(None, newer)
                log.info("nothing to resume under %s: starting from scratch", self._ckpt.url)
                return 0
            raise CheckpointNotFoundError(f"no {which} checkpoint under {self._ckpt.url}")
        skipped: builtins.list[str] = []
        damaged: set[int] = set()
        first: Exception | None = None
        for step in candidates:
            try:
                info = self._load_with_backup(state, step)
            except Exception as own:  # on every rank (the load is collective): one answer
                exc = agreed_error(step, own, self._control)
                last = len(candidates) == 1 or isinstance(which, int)
                if last or not isinstance(exc, (CorruptCheckpointError, CheckpointNotFoundError)):
                    if exc is own:
                        raise
                    raise exc from own
                if self._ckpt.first_on_disk:  # (the same agreed error on every rank)
                    log.warning("skipping step %d: %s", step, exc)
                skipped.append(f"step {step} ({type(exc).__name__})")
                first = first or exc
                if isinstance(exc, CorruptCheckpointError):
                    damaged.add(step)
                continue
            if skipped:
                log.warning("restored step %d after skipping %s", info.step, ", ".join(skipped))
            self._set_aside_newer(info, damaged)
            return self._resumed(info, newer)
        tried = f"no checkpoint under {self._ckpt.url} could be loaded (tried {', '.join(skipped)})"
        if not damaged:  # none damaged (another node's part, say): the first reason says why
            cls = PartElsewhereError if isinstance(first, PartElsewhereError) else None
            raise (cls or CheckpointNotFoundError)(f"{tried}: {first}")
        where = "ROOT" if not self._ckpt.node_local else "DIR on each node (its --ckpt-dir)"
        raise CorruptCheckpointError(
            f"{tried}; run `ckptstore verify {where}` to see what is damaged"
        )

    def _note_other_runs(self, *, resumed: bool) -> None:
        """Warn about checkpoints of another run than this one in either tier: a run
        started afresh where an earlier one saved. (Checkpoints without a recorded run
        count only when this run resumed nothing: an older ckptstore wrote them.)"""
        if self._rank != 0 or not self.enabled:
            return
        for backend in (None if self._ckpt is None else self._ckpt.backend, self._remote):
            if backend is None:
                continue
            try:
                infos = list_checkpoints(backend, manifest_key=self._manifest_key)
            except CkptStoreError as exc:
                log.warning("could not list %s: %s", backend.url, exc)
                continue
            others: dict[str, builtins.list[str]] = {}
            ours = {self._run_id, *self._lineage}  # (a branch goes on from its parents)
            for i in infos:
                run = i.manifest.run_id
                if run not in ours and (run is not None or not resumed):
                    others.setdefault(run or "(not recorded)", []).append(i.name)
            if others:
                log.warning(
                    "%s holds checkpoints of another run than this one (run %s), which this "
                    "run did not resume: %s. %sTo resume that run instead, restore it; to "
                    "keep runs apart, give each its own root and backup prefix",
                    backend.url,
                    self._run_id,
                    "; ".join(f"run {r}: {', '.join(n)}" for r, n in others.items()),
                    "The backup's retention leaves them alone and replaces one of the same "
                    "step with this run's. "
                    if backend is self._remote
                    else "",
                )

    def _load_with_backup(self, state: Resumable | dict[str, Any], step: int) -> CheckpointInfo:
        """Load ``step`` from the local root; from the backup if it is missing or damaged
        locally (downloaded into the local root first, verified; with ``enabled=False``,
        which writes nothing, read from the backup where it lies)."""
        if step in self._from_backup:  # node-local disks: every rank reads its part
            return self._load_from_backup(state, step)
        fetched = self.enabled and self._fetch(step, replace=False)
        try:
            return self._load_step(state, step)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            assert self._ckpt is not None
            if self._ckpt.node_local or not self.enabled:
                # Rank 0's download goes to rank 0's disk; a part damaged on another
                # stays as it is: every rank reads its part from the backup instead.
                # (Saving nothing: no download into the root either.)
                if not self._in_backup(step):
                    raise
                if self._ckpt.first_on_disk and not self.enabled:
                    log.warning(
                        "step %d is not loadable from %s (%s); loading the backup's copy "
                        "without downloading it (checkpointing is off: nothing is written)",
                        step, self._ckpt.url, without_verify_hint(str(exc)),
                    )  # fmt: skip
                elif self._ckpt.first_on_disk:  # (the same agreed error on every rank)
                    log.warning(
                        "the local copy of step %d failed on some node (%s); every rank "
                        "loads its part from the backup's copy", step,
                        without_verify_hint(str(exc)),
                    )  # fmt: skip
                try:
                    return self._load_from_backup(state, step)
                except (CorruptCheckpointError, CheckpointNotFoundError):
                    raise
                except Exception as failed:  # (the backup unreachable: the step is skipped)
                    log.warning("could not load step %d from the backup: %s", step, failed)
                    raise exc from failed
            if fetched or not self._fetch(step, replace=True):
                raise
            log.warning(
                "the local copy of step %d failed (%s); loaded the backup's copy",
                step,
                without_verify_hint(str(exc)),
            )
            return self._load_step(state, step)

    def _load_from_backup(self, state: Resumable | dict[str, Any], step: int) -> CheckpointInfo:
        assert self._remote is not None
        info = self._load_step(state, step, self._remote)
        log.info("restored step %d from the backup %s", step, self._remote.url)
        if self._backup is not None:
            self._backup.note_on_remote(info.name)
        return info

    def _in_backup(self, step: int, *, same_run: bool = False) -> bool:
        """Whether the backup holds ``step`` (rank 0 looks; every rank learns it);
        ``same_run``: whole, and of the run that wrote rank 0's local copy (a backup
        prefix shared by mistake may hold another run's step of that name)."""
        if not self._has_backup:
            return False

        def look() -> bool:
            try:
                name = f"{checkpoint_name(step)}/{MANIFEST_FILE}"
                if same_run and self._remote is not None and self._ckpt is not None:
                    key = self._manifest_key
                    there = read_manifest(self._remote, checkpoint_name(step), manifest_key=key)
                    here = read_manifest(
                        self._ckpt.backend, checkpoint_name(step), manifest_key=key
                    )
                    return there.part is None and there.run_id == here.run_id
                return self._remote is not None and self._remote.exists(name)
            except CheckpointNotFoundError:
                return False
            except Exception as exc:
                log.warning("could not look for step %d on the backup: %s", step, exc)
                return False

        return groups.decide(look, self._control, what="look in the backup")

    def _fetch(self, step: int, *, replace: bool) -> bool:
        """Rank 0 downloads ``step`` from the backup (if it has it and the local root does
        not, or ``replace``); every rank learns whether it did."""
        if not self._has_backup:
            return False
        outcome = "no"
        if self._rank == 0 and self._remote is not None and self._ckpt is not None:
            name = checkpoint_name(step)
            try:
                here = self._ckpt.exists(step)
                if (replace or not here) and self._remote.exists(f"{name}/{MANIFEST_FILE}"):
                    fetch(
                        self._remote,
                        self._ckpt.backend,
                        name,
                        replace=replace,
                        manifest_key=self._manifest_key,
                    )
                    outcome = "ok"
                    if self._backup is not None:
                        self._backup.note_on_remote(name)
            except Exception as exc:
                log.warning("could not download %s from %s: %s", name, self._remote.url, exc)
                if isinstance(exc, CorruptCheckpointError):  # a refusal then says so
                    self._damaged_on_backup = self._damaged_on_backup | {name}
        return groups.broadcast(outcome, self._control) == "ok"

    def _candidates(self, which: str | int) -> builtins.list[int]:
        """Steps to try, in order; decided on rank 0 and shared with every rank."""
        assert self._ckpt is not None
        steps = groups.decide(
            lambda: self._order(which), self._control, what="choose a checkpoint to restore"
        )
        if self._ckpt.node_local:
            # Node-local disks: a step committed on some disks only is not complete; one
            # only on the backup is read from there by every rank.
            mine = [i.step for i in self._ckpt.list() if i.step is not None]
            complete, rank0 = nodelocal.complete_steps(
                self._ckpt.backend, mine, self._ckpt.disks, self._control
            )
            self._from_backup = {s for s in steps if s not in rank0}
            dropped = [s for s in steps if s not in complete and s in rank0]
            # A node's disk lost (a replaced machine): such steps whole on the backup are
            # read from there by every rank (they were dropped, and the run refused to
            # go on over them or started over)
            whole = [s for s in dropped if self._has_backup and self._in_backup(s, same_run=True)]
            self._from_backup |= set(whole)
            if whole and self._rank == 0:
                log.warning(
                    "not complete on every node's disk, so read from the backup: steps %s",
                    whole,
                )
            dropped = [s for s in dropped if s not in whole]
            if dropped and self._rank == 0:
                log.warning("not complete on every node's disk, so not restored: steps %s", dropped)
            steps = [s for s in steps if s not in dropped]
        return [int(s) for s in steps]

    def _order(self, which: str | int) -> builtins.list[int]:
        assert self._ckpt is not None
        infos = self._ckpt.list()
        local_count = len(infos)
        if self._remote is not None:
            here = {i.name for i in infos}
            # With local checkpoints, the run is theirs: another run's on the backup are
            # not candidates (a fresh machine, with none, resumes the backup's newest).
            newest = infos[-1].manifest if infos else None
            ours = None if newest is None or newest.run_id is None else newest
            try:
                remote = [
                    i
                    for i in list_checkpoints(self._remote, manifest_key=self._manifest_key)
                    if i.name not in here
                    and (ours is None or i.manifest.run_id in (None, ours.run_id, *ours.lineage))
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

    def _load_step(
        self, state: Resumable | dict[str, Any], step: int, source: StorageBackend | None = None
    ) -> CheckpointInfo:
        assert self._ckpt is not None
        if not isinstance(state, Resumable):
            return self._ckpt.load(state, step, source=source, **self._load_options)
        # Every rank reads the metadata; they agree that all could before the collective
        # load, so that a rank that could not does not go its own way.
        target, problem = None, None
        try:
            target = state.load_target(self._ckpt.read_metadata(step, source=source))
        except Exception as exc:  # (each node-local disk has its own .metadata)
            problem = exc
        # (a step's stop or abort is kept for its next maybe_save, not read as a rank
        # that could not read the metadata)
        _, failed = self._agree(None, 1 if problem is not None else None, fold=False)
        if failed:
            raise agreed_error(step, problem, self._control)
        assert target is not None  # no rank failed, this one included
        info = self._ckpt.load(target, step, source=source, **self._load_options)
        state.load_state_dict(target)
        return info

    def _restore_path(self, state: Resumable | dict[str, Any], path: str, newer: str) -> int:
        root, name = split_checkpoint_path(path)
        backend = open_backend(root, storage_options=self._storage_options, create=False)
        key = self._manifest_key
        with groups.caller_group(self._process_group) as group:
            if isinstance(state, Resumable):
                manifest = read_manifest(backend, name, manifest_key=key)
                metadata = read_dcp_metadata(backend, name, manifest)
                target = state.load_target(metadata)
                manifest = load_into(
                    target,
                    backend,
                    name,
                    pool=None,
                    group=group,
                    manifest_key=key,
                    preread=(manifest, metadata),
                    allow_partial=self._load_options.get("allow_partial", False),
                    allow_cast=self._load_options.get("allow_cast", False),
                )
                state.load_state_dict(target)
            else:
                manifest = load_into(
                    state,
                    backend,
                    name,
                    pool=None,
                    group=group,
                    manifest_key=key,
                    allow_partial=self._load_options.get("allow_partial", False),
                    allow_cast=self._load_options.get("allow_cast", False),
                )
        info = CheckpointInfo(name, f"{backend.url}/{name}", manifest)
        return self._resumed(info, newer)

    def _resumed(self, info: CheckpointInfo, newer: str) -> int:
        """Go on from ``info`` (loaded), once the checkpoints past it are dealt with."""
        steps = info.step or 0
        self._last_done = steps
        self._last_saved = steps
        self._last_epoch = info.manifest.epoch
        self._heal_pending, self._healed_from = False, 0  # (a rollback: steps count anew)
        self._links_read = None  # (a step saved again gets its own read)
        if info.manifest.run_id is not None:
            # The same run goes on: its next checkpoints, and the backup's retention,
            # carry on with its id (a checkpoint without one: this run keeps its new id).
            self._set_run(info.manifest.run_id, info.manifest.lineage)
        self._handle_newer(info, newer)  # (a refusal: before "resumed from")
        log.info("resumed from %s (step %d)", info.name, steps)
        self.restored = info.name
        return steps
