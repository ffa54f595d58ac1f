"""``Checkpointer``: asynchronous saves of numbered checkpoints under one root.

The training loop calls :meth:`Checkpointer.save_async`; it returns once the state is
copied into reused host buffers (or sooner, with ``block_until_staged=False``). One
writer thread per checkpointer then plans (DCP), encodes (codec pool), writes and
commits. At most ``max_inflight`` saves are in flight: the next one waits for a slot
instead of allocating more memory.

Multi-rank: every rank constructs the checkpointer (it creates its own gloo group, a
collective) and calls ``save_async`` / ``load`` for the same steps in the same order,
as with DCP. All ranks must see the same checkpoint root (a shared file system or an
object store).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata

from ckptstore.codecs import get_codec
from ckptstore.codecs.auto import AutoCodec
from ckptstore.config import CheckpointerConfig, checkpointer_config
from ckptstore.engine import at_exit, groups
from ckptstore.engine.arguments import check_info, check_metadata, check_step
from ckptstore.engine.ops import (
    CheckpointInfo,
    SaveCache,
    list_checkpoints,
    load_into,
    read_checked,
    verify,
)
from ckptstore.engine.pending import ErrorLedger, PendingSave, SaveResult
from ckptstore.engine.priority import lower_thread_priority
from ckptstore.engine.stager import StagedState, StagingPool
from ckptstore.engine.writing import WriterMixin
from ckptstore.errors import (
    CheckpointerClosedError,
    CheckpointNotFoundError,
    CkptStoreError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
)
from ckptstore.format.manifest import Manifest, check_run_id
from ckptstore.layout import MANIFEST_FILE, checkpoint_name
from ckptstore.storage import StorageBackend, open_backend

log = logging.getLogger("ckptstore")


class StagingGuard(Protocol):
    """Watches a state whose tensors are copied in the background (see ``save_async``)."""

    def snapshot(self) -> None:
        """On the caller's thread, once the state is prepared: note what may change."""

    def check(self) -> None:
        """On the writer thread, once the copy is done: raise if the state changed."""


class Checkpointer(WriterMixin):
    """Numbered checkpoints under ``root`` (a local path or an fsspec URL).

    ::

        with ckptstore.Checkpointer("runs/exp1") as ckpt:
            if ckpt.latest() is not None:
                ckpt.load(state)                        # resume from the latest
            for step in range(...):
                ...
                pending = ckpt.save_async(state, step)  # returns after one copy
        # leaving the block waits for the last save and raises if one failed

    Options: a :class:`~ckptstore.CheckpointerConfig` as ``config=``, or its fields as
    keyword arguments (``codec="zstd"``, ``max_inflight=2``, ...).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | StorageBackend,
        *,
        config: CheckpointerConfig | None = None,
        process_group: dist.ProcessGroup | None = None,
        storage_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise InvalidArgumentTypeError(
                f"pass either config= or keyword options ({', '.join(sorted(options))}), not both"
            )
        self.config = config if config is not None else checkpointer_config(options, "Checkpointer")
        options = dict(self.config.backend_options or {})
        self._backend: StorageBackend = (
            root
            if isinstance(root, StorageBackend)  # opened by its owner, options and all
            else open_backend(root, storage_options=storage_options, backend_options=options)
        )
        self._backend.check_access()  # a missing bucket or wrong credentials: fail now
        self._group = groups.dedicated_gloo_group(process_group)
        self._rank = groups.rank(self._group)
        threads = self._threads = self.config.resolved_threads
        # The codec pool (encoding, hashing) runs below the caller's priority, so that a
        # busy training loop gets the cores first. The writer thread does not: with
        # overlap_copy, optimizer.step() waits for the copy it makes, and its I/O
        # pipeline would stall behind every wake-up.
        self._pool = ThreadPoolExecutor(
            threads,
            "ckptstore-codec",
            initializer=lower_thread_priority,
            initargs=(self.config.worker_nice,),
        )
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ckptstore-writer")
        self._staging = StagingPool(
            slots=self.config.max_inflight,
            pin_memory=self.config.pin_memory,
            max_bytes=self.config.max_staging_bytes,
        )
        self._slots = threading.Semaphore(self.config.max_inflight)
        # used on the writer thread only
        self._save_cache = (
            SaveCache.incremental_saves(self.config.full_every)
            if self.config.incremental
            else SaveCache()
        )
        if self._save_cache.incremental is not None:
            self._staging.find_unchanged(threads, self.config.trust_version_counters)
        self._auto = AutoCodec(local=self._backend.capabilities.local, threads=threads)
        at_exit.track(self)  # a save in flight as the script ends is still written
        self._fixed_codec = None if self.config.codec == "auto" else get_codec(self.config.codec)
        self._errors = ErrorLedger()
        self._lock = threading.Lock()
        self._inflight: dict[int, PendingSave] = {}
        self._closed = False
        self._preread: tuple[str, str, Manifest, Metadata] | None = None
        # Each rank's disk: ranks with roots on different disks (node-local) save in
        # parts (ckptstore.engine.nodelocal); each disk's lowest rank sweeps it.
        self.disks: builtins.list[str] = (
            groups.all_gather(self._backend.disk_id(), self._group) if self._group else [self.url]
        )
        if self.first_on_disk:
            removed = self._backend.sweep(self._grace_s())
            if removed:
                log.info(
                    "removed %d leftover(s) of dead saves under %s: %s",
                    len(removed),
                    self.url,
                    removed,
                )

    def note_downstream(self, bytes_per_s: float | None) -> None:
        """A backup tier copies every checkpoint on at ``bytes_per_s`` (None: not yet
        measured): ``codec="auto"`` then minimises the time until backed up."""
        self._auto.downstream = True
        if bytes_per_s is not None and bytes_per_s > 0:
            self._auto.downstream_bps = bytes_per_s

    # ---- properties -----------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._backend.url

    @property
    def backend(self) -> StorageBackend:
        return self._backend

    @property
    def staging_bytes(self) -> int:
        """Host memory held by staging buffers (allocated once, reused by later saves)."""
        return self._staging.allocated_bytes

    @property
    def pinned_bytes(self) -> int:
        """Of :attr:`staging_bytes`, how much is pinned (page-locked for GPU copies)."""
        return self._staging.pinned_bytes

    # ---- saving ---------------------------------------------------------------------
    @property
    def node_local(self) -> bool:
        """Whether the ranks' roots lie on several disks (node-local: saved in parts)."""
        return len(set(self.disks)) > 1

    @property
    def first_on_disk(self) -> bool:
        """Whether this rank is the lowest of those whose root is on its disk: the one
        that sweeps it and, with node-local disks, commits and tends that disk's part."""
        return self.disks.index(self.disks[self._rank]) == self._rank

    def save_async(
        self,
        state_dict: dict[str, Any],
        step: int,
        *,
        metadata: dict[str, Any] | None = None,
        block_until_staged: bool = True,
        epoch: int | None = None,
        reason: str | None = None,
        metrics: dict[str, float] | None = None,
        run_id: str | None = None,
        lineage: tuple[str, ...] = (),
        guard: StagingGuard | None = None,
        full: bool = False,
    ) -> PendingSave:
        """Start saving ``state_dict`` as checkpoint ``step`` (``full``: write every
        tensor, even with ``incremental=True``).

        ``epoch``, ``reason``, ``metrics``, ``run_id`` and ``lineage`` (the runs this one
        branched from) go into the manifest, where listings, retention and the backup
        read them (the CheckpointManager sets them).

        Returns once the state is staged (the caller may then change its tensors; with
        ``trust_version_counters=True`` not a tensor an earlier save found unchanged
        until ``pending.committed``: it is hashed where it lies meanwhile). With
        ``block_until_staged=False`` the copy happens on the writer thread and the call
        returns once the staging buffer is reserved; then wait for ``pending.staged``
        before changing any tensor. Either way the call waits while ``max_inflight``
        saves are in flight (backpressure). ``metadata`` is JSON stored in the manifest.

        ``guard`` (with ``block_until_staged=False``): its ``snapshot()`` runs on the
        caller's thread once the state is prepared, its ``check()`` on the writer thread
        once the tensors are copied; if ``check()`` raises, the save is abandoned (logged,
        ``pending`` fails with that error, nothing is written, and no later call raises it
        again: the guard's owner handles it).

        If an earlier save failed and nobody waited on it (``PendingSave.wait()``), this
        save is still started and then :class:`~ckptstore.errors.BackgroundSaveError` is
        raised for the earlier one, with this save's handle as its ``pending``.
        """
        self._check_open()
        name = checkpoint_name(check_step(step))
        user_md = check_metadata(metadata)
        info = check_info(epoch, reason, metrics)
        info["run_id"] = None if run_id is None else check_run_id(run_id)
        if isinstance(lineage, str):
            raise InvalidArgumentTypeError(f"lineage must be a tuple of run ids, got {lineage!r}")
        info["lineage"] = tuple(check_run_id(r) for r in lineage)
        info["full"] = bool(full)
        with self._lock:
            if step in self._inflight:
                raise InvalidArgumentError(f"step {step} is already being saved; wait for it first")
        earlier = self._errors.take_unseen()
        start = time.perf_counter()
        self._slots.acquire()
        backpressure_s = time.perf_counter() - start
        pending = PendingSave(step)
        with self._lock:
            self._inflight[step] = pending
        try:
            # On the caller's thread: Stateful.state_dict() may run collectives on the
            # training group, and waiting for a staging buffer here is backpressure.
            prep = self._staging.prepare(state_dict)
            staged = self._staging.copy(prep) if block_until_staged else None
        except BaseException as exc:
            pending.staged.set_exception(exc)
            pending.committed.set_exception(exc)
            self._writer.submit(self._write_failure, pending, name, exc, False)
            raise
        if staged is not None:
            pending.staged.set_result(None)
        elif guard is not None:
            guard.snapshot()
        stall_s = time.perf_counter() - start

        def job() -> None:
            ready = staged
            if ready is None:
                try:
                    ready = self._staging.copy(prep)
                except BaseException as exc:
                    pending.staged.set_exception(exc)
                    self._write_failure(pending, name, exc, True)
                    return
                if guard is not None and not self._guard_passes(guard, pending, name, ready):
                    return
                pending.staged.set_result(None)
            self._write(pending, ready, name, user_md, info, start, stall_s, backpressure_s)

        self._writer.submit(job)
        if earlier is not None:
            earlier.pending = pending
            raise earlier
        return pending

    def _guard_passes(
        self, guard: StagingGuard, pending: PendingSave, name: str, staged: StagedState
    ) -> bool:
        try:
            guard.check()
        except BaseException as exc:
            log.error("saving step %d abandoned: %s", pending.step, exc)
            self._staging.release(staged)
            pending.staged.set_exception(exc)
            pending.committed.set_exception(exc)
            self._write_failure(pending, name, exc, False)
            return False
        return True

    def save(
        self, state_dict: dict[str, Any], step: int, *, metadata: dict[str, Any] | None = None
    ) -> SaveResult:
        """Save and wait until durable; raises the save's own error."""
        return self.save_async(state_dict, step, metadata=metadata).wait()

    # ---- waiting and closing --------------------------------------------------------
    def wait(self) -> None:
        """Block until every save in flight is durable; raise if one failed unseen."""
        self._drain()
        self._errors.raise_unseen()

    def _drain(self) -> None:
        with self._lock:
            pendings = list(self._inflight.values())
        for p in pendings:
            with contextlib.suppress(BaseException):
                p.committed.result()
        # Jobs submitted with block_until_staged=False may not be in _inflight yet.
        self._writer.submit(lambda: None).result()

    def _finish_at_exit(self) -> None:
        """(engine.at_exit) In one process, the saves still in flight are written. With
        several ranks nothing waits: a rank whose peers are gone would hang there."""
        if not self._closed and self._group is None:
            self.wait()

    def close(self) -> None:
        """Wait for saves in flight, release buffers and threads; raise if one failed."""
        if self._closed:
            return
        try:
            self._drain()
        finally:
            self._closed = True
            self._writer.shutdown(wait=True)
            self._pool.shutdown(wait=True)
            self._staging.close()
            groups.release(self._group)
        self._errors.raise_unseen()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_exc:  # the body's exception matters more; keep both visible
            log.error("while closing after an error: %s", close_exc)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointerClosedError(
                f"the Checkpointer for {self.url} is closed; create a new one"
            )

    # ---- reading --------------------------------------------------------------------
    def list(self) -> builtins.list[CheckpointInfo]:
        """Committed checkpoints, oldest step first. In-flight and damaged-manifest ones are not listed."""
        return list_checkpoints(self._backend, manifest_key=self.config.manifest_key)

    def exists(self, step: int) -> bool:
        """Whether checkpoint ``step`` is committed (its manifest is there; not verified)."""
        return self._backend.exists(f"{checkpoint_name(check_step(step))}/{MANIFEST_FILE}")

    def latest(self) -> CheckpointInfo | None:
        infos = self.list()
        return infos[-1] if infos else None

    def load(
        self,
        state_dict: dict[str, Any],
        step: int | None = None,
        *,
        allow_partial: bool = False,
        allow_cast: bool = False,
        source: StorageBackend | None = None,
    ) -> CheckpointInfo:
        """Load checkpoint ``step`` (default: the latest) into ``state_dict`` in place
        (from ``source``, another root such as the backup, if given).

        Waits for saves in flight first. Reshards: a checkpoint saved on N ranks loads on
        M. Raises :class:`~ckptstore.errors.CheckpointNotFoundError` if there is none.
        A tensor whose target's dtype cannot hold its values exactly (fp32 into fp16 or
        int64) is refused (:class:`~ckptstore.errors.IncompatibleCheckpointError`) unless
        ``allow_cast``; a widening (fp32 into fp64) converts.
        """
        self._check_open()
        self._drain()  # the writer thread and this one must not use the gloo group at once
        if step is None:
            latest = groups.decide(self.latest, self._group, what=f"list {self.url}")
            if latest is None:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint under {self.url}; nothing to load"
                )
            name = latest.name
        else:
            name = checkpoint_name(check_step(step))
        backend = self._backend if source is None else source
        preread, self._preread = self._preread, None
        if not preread or preread[:2] != (backend.url, name):
            preread = (backend.url, name, *self._read_once(backend, name, agree=True))
        manifest = load_into(
            state_dict,
            backend,
            name,
            pool=self._pool,
            group=self._group,
            allow_partial=allow_partial,
            allow_cast=allow_cast,
            manifest_key=self.config.manifest_key,
            preread=preread[2:],
        )
        if source is None and self._save_cache.incremental is not None:  # link from it next
            self._save_cache.incremental.restored_from(name, manifest)
        return CheckpointInfo(name, f"{backend.url}/{name}", manifest)

    def read_metadata(self, step: int, *, source: StorageBackend | None = None) -> Metadata:
        """DCP's metadata of checkpoint ``step`` (what it holds), checked and safely read."""
        self._check_open()
        self._drain()  # a collective on the group the writer thread uses
        name = checkpoint_name(check_step(step))
        backend = self._backend if source is None else source
        manifest, metadata = self._read_once(backend, name)
        # A restore reads the metadata, then loads: the load reads neither again.
        self._preread = (backend.url, name, manifest, metadata)
        return metadata

    def _read_once(
        self, backend: StorageBackend, name: str, *, agree: bool = False
    ) -> tuple[Manifest, Metadata]:
        """``name``'s manifest and metadata. Node-local disks: each rank reads its own
        part's, and with ``agree`` the ranks learn whether all could before any goes on
        (a load's collective would wait for a rank that raised alone)."""
        node_local = backend is self._backend and self.node_local
        group = None if node_local else self._group  # each disk's part has its own
        if not (node_local and agree and self._group is not None):
            return read_checked(backend, name, group, self.config.manifest_key)
        read, problem = None, None
        try:
            read = read_checked(backend, name, None, self.config.manifest_key)
        except Exception as exc:
            problem = exc
        sent = (
            problem
            if problem is None or groups.pickles(problem)
            else CkptStoreError(f"{type(problem).__name__}: {problem}")
        )
        told = groups.all_gather(sent, self._group)
        if problem is not None:
            raise problem
        failed = [(r, e) for r, e in enumerate(told) if e is not None]
        if failed:
            raise failed[0][1]  # (as that rank raised it: a damaged part is one here too)
        assert read is not None
        return read

    def verify(self, step: int) -> builtins.list[str]:
        """Check every byte of checkpoint ``step``; one line per problem, empty if intact."""
        self._check_open()
        return verify(
            self._backend,
            checkpoint_name(check_step(step)),
            self._pool,
            manifest_key=self.config.manifest_key,
        )

    def sweep(self, grace_s: float | None = None) -> builtins.list[str]:
        """Remove leftovers of dead saves; a save in progress is never removed."""
        return self._backend.sweep(self._grace_s() if grace_s is None else grace_s)

    def _grace_s(self) -> float:
        if self.config.sweep_grace_s is not None:
            return self.config.sweep_grace_s
        return 60.0 if self._backend.capabilities.save_locks else 3600.0

    def __repr__(self) -> str:
        return f"Checkpointer({self.url!r}, codec={self.config.codec!r}, max_inflight={self.config.max_inflight})"
