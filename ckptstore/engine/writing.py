"""The writer thread's side of a :class:`~ckptstore.engine.checkpointer.Checkpointer`
save: plan, encode, write and commit what was staged (:func:`~ckptstore.engine.ops.save_staged`),
report the result, and on failure still take part in the save's collectives, so that
every rank pairs the same saves.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ckptstore.codecs import RawCodec
from ckptstore.codecs.auto import AutoCodec
from ckptstore.codecs.base import Codec
from ckptstore.config import CheckpointerConfig, io_window
from ckptstore.dcp.spec import SaveSpec
from ckptstore.engine import groups
from ckptstore.engine.ops import SaveCache, save_staged
from ckptstore.engine.pending import ErrorLedger, PendingSave, SaveResult
from ckptstore.engine.stager import StagedState, StagingPool
from ckptstore.storage import StorageBackend

log = logging.getLogger("ckptstore")


class WriterMixin:
    """Runs on the checkpointer's writer thread; mixed into the checkpointer, whose
    constructor sets these attributes."""

    config: CheckpointerConfig
    _backend: StorageBackend
    _fixed_codec: Codec | None
    _auto: AutoCodec
    _threads: int
    _pool: ThreadPoolExecutor
    _group: Any
    _save_cache: SaveCache
    _staging: StagingPool
    _errors: ErrorLedger
    _lock: threading.Lock
    _inflight: dict[int, PendingSave]
    _slots: threading.Semaphore

    if TYPE_CHECKING:  # provided by Checkpointer

        @property
        def url(self) -> str: ...

    def _write(
        self,
        pending: PendingSave,
        staged: StagedState,
        name: str,
        metadata: dict[str, Any],
        info: dict[str, Any],
        start: float,
        stall_s: float,
        backpressure_s: float,
    ) -> None:
        try:
            codec = self._fixed_codec or self._auto.choose()
            began = time.perf_counter()
            spec = SaveSpec(
                codec=codec,
                step=pending.step,
                chunk_bytes=self.config.chunk_bytes,
                window=io_window(self._threads),
                metadata=metadata,
                manifest_key=self.config.manifest_key,
                **info,
            )
            stats = save_staged(
                staged,
                self._backend,
                name,
                spec,
                pool=self._pool,
                group=self._group,
                cache=self._save_cache,
            )
            self._auto.observe(
                codec, stats.raw_bytes, stats.stored_bytes, stats.sink_s, stats.encode_s
            )
            if stats.written is not None:
                self._staging.note_written(staged, stats.written)
            if (inc := self._save_cache.incremental) is not None:
                self._staging.note_hashed(staged, inc.hashed_tensors)
            now = time.perf_counter()
            result = SaveResult(
                step=pending.step,
                name=name,
                url=f"{self.url}/{name}",
                codec=codec.codec_id,
                raw_bytes=stats.raw_bytes,
                stored_bytes=stats.stored_bytes,
                stall_s=stall_s,
                backpressure_s=backpressure_s,
                staging_s=staged.copy_s,
                write_s=now - began,
                commit_s=now - start,
                staging_bytes=self._staging.allocated_bytes,
                manifest=stats.manifest,
            )
        except BaseException as exc:
            self._fail(pending, exc)
        else:
            inc = self._save_cache.incremental
            linked = inc.linked_bytes if inc is not None else 0
            log.info("%s", result.describe(linked, groups.world_size(self._group)))
            pending.committed.set_result(result)
        finally:
            self._finish(pending, staged)

    def _write_failure(
        self, pending: PendingSave, name: str, exc: BaseException, record: bool
    ) -> None:
        """This rank could not stage: still enter the save's collectives and fail them.

        Every rank must take part in every save; a rank that skipped one would pair its
        next save with the other ranks' current one. Single process: nothing to join.
        """
        try:
            if self._group is not None:
                with contextlib.suppress(
                    BaseException
                ):  # it fails, on every rank: that is the point
                    save_staged(
                        StagedState({}, {}, None, 0, 0, 0.0),
                        self._backend,
                        name,
                        SaveSpec(RawCodec(), step=pending.step, window=2),
                        pool=self._pool,
                        group=self._group,
                        failure=f"{type(exc).__name__}: {exc}",
                        cache=self._save_cache,  # its plans are dropped, as on every rank
                    )
        finally:
            if record:
                self._fail(pending, exc)
            self._finish(pending, None)

    def _fail(self, pending: PendingSave, exc: BaseException) -> None:
        log.error("saving step %d failed: %s: %s", pending.step, type(exc).__name__, exc)
        pending._record = self._errors.record(pending.step, exc)
        if not pending.committed.done():
            pending.committed.set_exception(exc)

    def _finish(self, pending: PendingSave, staged: StagedState | None) -> None:
        if staged is not None:
            self._staging.release(staged)
        with self._lock:
            self._inflight.pop(pending.step, None)
        self._slots.release()
