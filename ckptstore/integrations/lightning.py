"""PyTorch Lightning: checkpoints saved and loaded by ckptstore, in the background.

::

    from ckptstore.integrations.lightning import CkptStoreCheckpointIO

    trainer = L.Trainer(plugins=[CkptStoreCheckpointIO()], callbacks=[ModelCheckpoint(...)])
    trainer.fit(model, ckpt_path="last")                  # resumes from a ckptstore checkpoint
    model = load_module(MyModule, "checkpoints/last.ckpt")  # LightningModule.load_from_checkpoint

Each ``*.ckpt`` path Lightning asks for is a ckptstore checkpoint (a directory, or a
prefix in a bucket). :meth:`CkptStoreCheckpointIO.save_checkpoint` returns once the
checkpoint's tensors are copied into reused staging buffers; one writer thread encodes,
writes and commits it, and runs :meth:`~CkptStoreCheckpointIO.remove_checkpoint` calls
in the order they came, so ``save_top_k`` never deletes a checkpoint whose replacement
is still queued. Lightning saves on rank 0 only: these saves run no collective, so
``strategy="ddp"`` does not wait for ranks that never join. Saving over a committed
checkpoint (``last.ckpt``) writes the new one beside it (``last.ckpt.replacing``) and
then swaps the two names in one step (local disk on Linux: ``renameat2(RENAME_EXCHANGE)``),
so ``last.ckpt`` is a complete checkpoint at every moment. Where names cannot be
swapped (object stores) the old one is deleted and the new one moved into place: a
complete checkpoint is under one of the two names at every moment, and
:meth:`~CkptStoreCheckpointIO.load_checkpoint` reads the one beside when the name itself
is missing (Lightning's ``ckpt_path="last"`` does not look there). Do not wrap this plugin in Lightning's ``AsyncCheckpointIO``:
it is asynchronous already.

What Lightning's checkpoint holds comes back as saved, with these conversions: an
``argparse.Namespace`` is saved as a dict (``hparams`` of older scripts); dict keys
other than strings and ints come back as strings. Values that ``torch.load(...,
weights_only=True)`` refuses (a hyperparameter holding a class, say) fail the save at
once with :class:`~ckptstore.errors.UnsupportedStateError` naming the key.

``incremental=True`` (issue 19; off by default, as everywhere in ckptstore while it is
proven): a save links the tensors that did not change since the plugin's last save to
that directory (frozen weights in fine-tuning, and ``last.ckpt`` saved right after a
top-k checkpoint of the same step) instead of writing them again: hard links on local
disk, copies inside the store on S3. Each checkpoint still loads and deletes alone
(``save_top_k``'s removals included). The chain follows the saves in the order they
come, whatever their names; a save whose last one was removed or replaced since writes
everything. After ``trainer.fit(ckpt_path=...)`` the first save links from the
checkpoint loaded, where it lies in the directory saved to, if that one holds a note
(it linked something, or was the first save after a restore). On a local disk a
linked file is one copy: damage in it is damage to every checkpoint holding it. So
after a save that linked files, the writer thread reads that checkpoint through
(unless a newer one committed meanwhile), and if it is damaged the next save writes
everything (:meth:`CkptStoreCheckpointIO._check`).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from ckptstore.codecs import get_codec
from ckptstore.codecs.auto import AutoCodec
from ckptstore.config import CheckpointerConfig, default_threads, io_window, resolve_manifest_key
from ckptstore.dcp.spec import SaveSpec
from ckptstore.engine import at_exit
from ckptstore.engine.listing import read_manifest
from ckptstore.engine.oneshot import read
from ckptstore.engine.ops import SaveCache, save_staged, verify
from ckptstore.engine.priority import lower_thread_priority
from ckptstore.engine.stager import StagedState, StagingPool
from ckptstore.errors import (
    BackgroundSaveError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    without_verify_hint,
)
from ckptstore.format.manifest import Manifest
from ckptstore.integrations import lightning_shape
from ckptstore.integrations.lightning_find import last_checkpoint as last_checkpoint
from ckptstore.layout import split_checkpoint_path
from ckptstore.storage import StorageBackend, open_backend, replace

log = logging.getLogger("ckptstore")

_SHAPE_KEY = "lightning_shape"  # in the manifest's metadata: what the stored paths lose


@dataclass
class _Root:
    """A directory (or bucket prefix) saved to, opened once."""

    backend: StorageBackend
    auto: AutoCodec
    cache: SaveCache | None  # incremental saves: what the last save there holds
    saves: int = 0  # committed by this plugin (a check of one is moot once another is)
    full_next: bool = False  # a check found the newest damaged: link nothing next time


class CkptStoreCheckpointIO(CheckpointIO):  # type: ignore[misc]  # Any when mypy lacks lightning
    """Lightning's ``CheckpointIO`` over ckptstore: ``Trainer(plugins=[CkptStoreCheckpointIO()])``.

    ``codec`` (``"auto"``, ``"zstd"``, ``"none"``), ``threads`` (the codec pool),
    ``max_inflight`` (saves staged or being written at once; the next save waits for a
    slot) and ``storage_options`` (fsspec's, for ``s3://`` paths) as elsewhere in
    ckptstore. ``async_save=False`` makes every save return only once it is durable.
    ``incremental``, ``full_every`` and ``trust_version_counters``: as
    :class:`~ckptstore.CheckpointerConfig`'s (module doc).
    """

    def __init__(
        self,
        *,
        codec: str | dict[str, Any] = "auto",
        threads: int | None = None,
        max_inflight: int = 1,
        async_save: bool = True,
        storage_options: dict[str, Any] | None = None,
        pin_memory: bool | None = None,
        incremental: bool = False,
        full_every: int = 10,
        trust_version_counters: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
            raise InvalidArgumentError(f"max_inflight must be an int >= 1, got {max_inflight!r}")
        # checked as a Checkpointer's are (the same messages)
        CheckpointerConfig(
            incremental=incremental,
            full_every=full_every,
            trust_version_counters=trust_version_counters,
        )
        self.incremental = incremental
        self.full_every = full_every
        self.trust_version_counters = trust_version_counters
        self.codec = codec
        self.threads = threads or default_threads()
        self.max_inflight = max_inflight
        self.async_save = async_save
        self.storage_options = storage_options
        self.pin_memory = pin_memory
        self._fixed = None if codec == "auto" else get_codec(codec)
        self._lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._staging: StagingPool | None = None
        self._slots = threading.Semaphore(max_inflight)
        self._roots: dict[str, _Root] = {}
        self._restored: dict[str, tuple[str, Manifest]] = {}  # root -> checkpoint loaded
        self._queued: list[Future[None]] = []
        self._failures: list[tuple[str, BaseException]] = []
        self._warned = False

    # ---- Lightning's interface ------------------------------------------------------
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Stage ``checkpoint`` and queue its write as checkpoint ``path``.

        Raises an earlier background save's failure (after queueing this save) as
        :class:`~ckptstore.errors.BackgroundSaveError`.
        """
        options = self._options(storage_options)
        root, name = _split(path)
        if threading.current_thread() is not threading.main_thread() and not self._warned:
            self._warned = True
            log.warning(
                "CkptStoreCheckpointIO.save_checkpoint called from thread %r: if it is "
                "wrapped in Lightning's AsyncCheckpointIO, unwrap it (it is asynchronous "
                "already; the wrapper clones every tensor and lets save_top_k's removals "
                "overtake the saves it queues)",
                threading.current_thread().name,
            )
        state, shape = lightning_shape.prepare(checkpoint)
        _, staging = self._start()
        self._slots.acquire()
        try:
            staged = staging.stage(state)
        except BaseException:
            self._slots.release()
            raise
        counters = (_counter(checkpoint.get("global_step")), _counter(checkpoint.get("epoch")))
        future = self._queue(self._write, staged, root, name, shape, options, counters)
        if not self.async_save:
            future.result()
        self._raise_failures()

    def remove_checkpoint(self, path: Any) -> None:
        """Delete checkpoint ``path`` once every save queued before this call has run."""
        root, name = _split(path)
        future = self._queue(self._remove, root, name)
        if not self.async_save:
            future.result()
        self._raise_failures()

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path`` as Lightning's dict, after the saves queued before.

        ``weights_only`` is moot for ckptstore checkpoints (nothing else is ever
        unpickled); a plain file at ``path`` (Lightning's own format) is read with
        ``torch.load(weights_only=True)`` unless ``weights_only=False``.
        ``map_location``: a device (or its name) to move tensors to, a ``{from: to}``
        dict (applied to CPU tensors' ``"cpu"``), or None for the CPU.
        """
        self.wait()
        root, name = _split(path)
        if "://" not in os.fspath(path) and os.path.isfile(path):
            # A file Lightning's own TorchCheckpointIO wrote (resuming a run begun without
            # this plugin): read it as Lightning would, never unpickling code by default.
            safe = True if weights_only is None else weights_only
            loaded: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=safe)
            return lightning_shape.map_location(loaded, map_location)
        backend = open_backend(root, storage_options=self.storage_options, create=False)
        name = replace.readable_name(backend, name)
        location = f"{root.rstrip('/')}/{name}"
        state = read(location, threads=self.threads, storage_options=self.storage_options)
        manifest = read_manifest(backend, name, manifest_key=resolve_manifest_key())
        lightning_shape.restore_shape(state, manifest.metadata.get(_SHAPE_KEY, {}))
        if self.incremental:  # the next save to this root links from it (see _write)
            with self._lock:
                self._restored[_key(root, self.storage_options)] = (name, manifest)
        return lightning_shape.map_location(state, map_location)

    def teardown(self) -> None:
        """Wait for every queued save and removal, free threads and staging buffers;
        raise the first failure not raised yet. The plugin may be used again after."""
        try:
            self.wait()
        finally:
            with self._lock:
                writer, pool, staging = self._writer, self._pool, self._staging
                self._writer = self._pool = self._staging = None
            if writer is not None:
                writer.shutdown(wait=True)
            if pool is not None:
                pool.shutdown(wait=True)
            if staging is not None:
                staging.close()
        self._raise_failures()

    # ---- extra ----------------------------------------------------------------------
    def wait(self) -> None:
        """Block until every queued save and removal has run; raise a failure among them."""
        while True:  # (a save queues its check as it ends)
            with self._lock:
                queued, self._queued = self._queued, []
            if not queued:
                break
            for f in queued:
                f.exception()
        self._raise_failures()

    def _finish_at_exit(self) -> None:
        self.wait()  # (engine.at_exit)

    @property
    def staging_bytes(self) -> int:
        """Host memory held by staging buffers (allocated once, reused by later saves)."""
        staging = self._staging
        return staging.allocated_bytes if staging is not None else 0

    # ---- internals ------------------------------------------------------------------
    def _start(self) -> tuple[ThreadPoolExecutor, StagingPool]:
        with self._lock:
            if self._writer is None or self._staging is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="ckptstore-lightning")
                # below the training loop's priority, as a Checkpointer's (CheckpointerConfig.worker_nice)
                self._pool = ThreadPoolExecutor(
                    self.threads,
                    "ckptstore-codec",
                    initializer=lower_thread_priority,
                    initargs=(CheckpointerConfig.worker_nice,),
                )
                self._staging = StagingPool(slots=self.max_inflight, pin_memory=self.pin_memory)
                if self.incremental and self.full_every != 1:
                    self._staging.find_unchanged(self.threads, self.trust_version_counters)
                at_exit.track(self)  # a save queued as the script ends is still written
            return self._writer, self._staging

    def _options(self, storage_options: Any) -> dict[str, Any] | None:
        if storage_options is None:
            return self.storage_options
        if not isinstance(storage_options, dict):
            raise InvalidArgumentTypeError(
                f"storage_options must be a dict of fsspec options, got {type(storage_options).__name__}"
            )
        return {**(self.storage_options or {}), **storage_options}

    def _root(self, root: str, options: dict[str, Any] | None) -> _Root:
        """The root a save writes to, opened once; on first use, leftovers of saves that
        died there (a killed run) are removed. Writer thread only."""
        key = _key(root, options)
        with self._lock:
            found = self._roots.get(key)
            restored = self._restored.pop(key, None)
        if found is None:
            backend = open_backend(root, storage_options=options)
            removed = backend.sweep(60.0 if backend.capabilities.save_locks else 3600.0)
            if removed:
                log.info("removed %d leftover(s) of dead saves under %s", len(removed), backend.url)
            auto = AutoCodec(local=backend.capabilities.local, threads=self.threads)
            cache = SaveCache.incremental_saves(self.full_every) if self.incremental else None
            found = _Root(backend, auto, cache)
            with self._lock:
                self._roots[key] = found
        if restored is not None and found.cache is not None and found.cache.incremental:
            found.cache.incremental.restored_from(*restored)
        return found

    def _write(
        self,
        staged: StagedState,
        root: str,
        name: str,
        shape: dict[str, Any],
        options: dict[str, Any] | None,
        counters: tuple[int | None, int | None] = (None, None),
    ) -> None:
        """``counters``: Lightning's ``global_step`` and ``epoch``, for the manifest
        (``ckptstore ls`` and ``info`` show them)."""
        check = False  # (the save linked files on a local disk: read it through after)
        try:
            where = self._root(root, options)
            backend, auto, cache = where.backend, where.auto, where.cache
            codec = self._fixed or auto.choose()
            spec = SaveSpec(
                codec,
                window=io_window(self.threads),
                metadata={_SHAPE_KEY: shape},
                manifest_key=resolve_manifest_key(),
                overwrite=True,  # Lightning saves over its own (last.ckpt): replaced atomically
                full=where.full_next,
                step=counters[0],
                epoch=counters[1],
            )
            assert self._pool is not None
            stats = save_staged(
                staged, backend, name, spec, pool=self._pool, group=None, cache=cache
            )
            auto.observe(codec, stats.raw_bytes, stats.stored_bytes, stats.sink_s, stats.encode_s)
            where.saves += 1
            where.full_next = False
            inc = cache.incremental if cache is not None else None
            if inc is not None:
                assert self._staging is not None
                self._staging.note_hashed(staged, inc.hashed_tensors)
                log.info(
                    "%s/%s committed: %d B written, %d B linked",
                    backend.url, name, stats.raw_bytes, inc.linked_bytes,
                )  # fmt: skip
                check = bool(inc.linked_bytes) and backend.capabilities.local
            else:
                log.info("%s/%s committed", backend.url, name)
        except BaseException as exc:
            log.error("saving %s/%s failed: %s: %s", root, name, type(exc).__name__, exc)
            with self._lock:
                self._failures.append((f"saving {root}/{name}", exc))
        finally:
            if self._staging is not None:
                self._staging.release(staged)
            self._slots.release()
        if check:  # the save committed: whatever happens now, it is not a failed one
            try:
                self._queue(self._check, where, name, where.saves, self._pool)
            except RuntimeError as exc:  # executors shut down (teardown interrupted, exit)
                log.warning("%s/%s: not read through after its save (%s)", root, name, exc)

    def _queue(self, job: Any, *args: Any) -> Future[None]:
        """Run ``job`` on the writer thread after what is queued (``wait`` waits for it)."""
        writer, _ = self._start()
        future = writer.submit(job, *args)
        with self._lock:
            self._queued = [f for f in self._queued if not f.done()] + [future]
        return future

    def _check(self, where: _Root, name: str, count: int, pool: ThreadPoolExecutor) -> None:
        """Read checkpoint ``name`` through (its own files, and of each file it shares with
        earlier checkpoints the items it uses), unless a newer save has committed since.
        On a local disk a shared file is one copy (hard links): damaged, it is damaged in
        every checkpoint holding it, and every later save would link it too; so the next
        save writes everything (as the CheckpointManager's housekeeping read makes it do)."""
        if where.saves != count or not replace.is_committed(where.backend, name):
            return  # a newer one committed (its check reads the same files), or removed
        try:
            problems = verify(where.backend, name, pool, manifest_key=resolve_manifest_key())
        except Exception as exc:  # the check never fails a run; unreadable (EIO) is damaged
            problems = [f"could not read it through: {type(exc).__name__}: {exc}"]
        if problems and where.saves == count:
            where.full_next = True
            url = where.backend.url
            log.error(
                "%s/%s is damaged (%s): the next save to %s writes everything instead of "
                "linking its files; `ckptstore verify %s` names every checkpoint there that "
                "is damaged (a damaged shared file is damage in each one holding it)",
                url, name, without_verify_hint(problems[0]), url, url,
            )  # fmt: skip

    def _remove(self, root: str, name: str) -> None:
        try:
            backend = self._root(root, self.storage_options).backend
            backend.delete(name)
            backend.delete(replace.beside(name))
        except BaseException as exc:
            with self._lock:
                self._failures.append((f"removing {root}/{name}", exc))

    def _raise_failures(self) -> None:
        with self._lock:
            if not self._failures:
                return
            (what, exc), more = self._failures[0], len(self._failures) - 1
            self._failures.clear()
        extra = f" (and {more} more)" if more else ""
        raise BackgroundSaveError(f"{what} failed{extra}: {type(exc).__name__}: {exc}") from exc


def load_module(
    cls_or_module: Any,
    path: str | os.PathLike[str],
    *,
    map_location: Any | None = None,
    strict: bool = True,
    **kwargs: Any,
) -> Any:
    """``LightningModule.load_from_checkpoint`` for a ckptstore checkpoint.

    Given a class, builds it from the checkpoint's ``hyper_parameters`` (``kwargs``
    override them), then loads its ``state_dict``; given a module, loads into it. Calls
    the module's ``on_load_checkpoint`` first, as Lightning does. Returns the module.
    """
    checkpoint = CkptStoreCheckpointIO().load_checkpoint(path, map_location=map_location)
    module = cls_or_module
    if isinstance(cls_or_module, type):
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        module = cls_or_module(**{**hparams, **kwargs})
    elif kwargs:
        raise InvalidArgumentError(
            f"keyword arguments ({', '.join(sorted(kwargs))}) build a module from a class; "
            "a module was given"
        )
    if hasattr(module, "on_load_checkpoint"):
        module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module


def _counter(value: Any) -> int | None:
    """A count Lightning keeps (``global_step``, ``epoch``) as the manifest takes it."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _key(root: str, options: dict[str, Any] | None) -> str:
    return f"{root}\0{sorted((options or {}).items())!r}"


def _split(path: Any) -> tuple[str, str]:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentTypeError(f"path must be a str or os.PathLike, got {path!r}")
    root, name = split_checkpoint_path(os.fspath(path))
    if not name:
        raise InvalidArgumentError(f"{os.fspath(path)!r} does not name a checkpoint")
    return root, name
