"""ckptstore's format behind DCP's own API: ``dcp.save``, ``dcp.async_save``, ``dcp.load``.

For trainers that call DCP themselves (torchtitan, plain DCP code)::

    import torch.distributed.checkpoint as dcp
    from ckptstore.integrations.dcp import StorageReader, StorageWriter

    dcp.save(state, storage_writer=StorageWriter("ckpt/step-100"))
    dcp.save(state, checkpoint_id="ckpt/step-200", storage_writer=StorageWriter())
    dcp.load(state, storage_reader=StorageReader("ckpt/step-200"))

Each save is a ckptstore checkpoint (checksummed chunks, an atomically committed
manifest, compressed if asked), readable by ``ckptstore.load``, ``ckptstore verify``
and the rest; multi-rank as DCP is (every rank calls ``dcp.save``; with
``no_dist=True`` one rank saves alone, without collectives). A writer or reader is
reusable: ``checkpoint_id=`` names where each call goes, as with DCP's own. A save into
an existing *empty* directory takes its place; into a committed checkpoint it fails
unless ``overwrite=True`` (DCP's ``FileSystemWriter`` overwrites by default; ckptstore
asks): then the new checkpoint is written complete beside the old and switched in, so
a reader finds one or the other, never neither (:mod:`ckptstore.storage.replace`).
Writers pickle (for ``AsyncCheckpointerType.PROCESS``) as their settings.

Stock DCP (``FileSystemReader``) cannot read a ckptstore checkpoint (chunked, checked,
maybe compressed); pointed at one it fails with a message that says to use
:class:`StorageReader` or ``ckptstore export --format dcp``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import StorageReader as _DCPReader
from torch.distributed.checkpoint.storage import StorageWriter as _DCPWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ckptstore.codecs import get_codec
from ckptstore.config import default_threads, io_window, resolve_manifest_key
from ckptstore.dcp import CkptStorageReader, CkptStorageWriter
from ckptstore.dcp.spec import SaveSpec
from ckptstore.engine.ops import read_dcp_metadata, read_manifest
from ckptstore.errors import InvalidArgumentError
from ckptstore.layout import split_checkpoint_path
from ckptstore.storage import open_backend, replace

__all__ = ["StorageReader", "StorageWriter"]


def _where(path: str | os.PathLike[str] | None, what: str) -> tuple[str, str]:
    if path is None:
        raise InvalidArgumentError(
            f"{what} needs a path: {what}('ckpt/step-100'), or checkpoint_id= in the dcp call"
        )
    root, name = split_checkpoint_path(os.fspath(path))
    if not name:
        raise InvalidArgumentError(f"{os.fspath(path)!r} does not name a checkpoint directory")
    return root, name


class _ByPath:
    """What DCP asks of a writer or reader about where it works: ``checkpoint_id`` (a
    path or URL, set at construction or by each call's ``reset``). Pickles as its
    settings: the working parts are made again by the next call."""

    path: str | None
    _inner: Any
    _pool: ThreadPoolExecutor | None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_inner": None, "_pool": None}

    @property
    def checkpoint_id(self) -> str | None:
        return self.path

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self._inner = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


class StorageWriter(_ByPath, _DCPWriter):
    """Writes ``dcp.save`` / ``dcp.async_save`` calls as ckptstore checkpoints.

    ``path``: the checkpoint (a directory or ``s3://`` prefix), or None to take each
    call's ``checkpoint_id``. ``codec``: ``"none"`` (default), ``"zstd"`` or a codec
    config. ``threads``: encode / upload workers (default: the cores). ``overwrite``:
    replace a committed checkpoint at the path (atomically where the storage can swap
    names) instead of refusing. A manifest key (``CKPTSTORE_MANIFEST_KEY``) signs the
    manifest as elsewhere.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        codec: str | dict[str, Any] = "none",
        threads: int | None = None,
        storage_options: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        get_codec(codec)  # an unknown codec fails here, not in the middle of a save
        self.path = None if path is None else os.fspath(path)
        self.codec = codec
        self.threads = threads
        self.storage_options = storage_options
        self.overwrite = overwrite
        self._inner: CkptStorageWriter | None = None
        self._pool: ThreadPoolExecutor | None = None

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        root, name = _where(self.path, "StorageWriter")
        backend = open_backend(root, storage_options=self.storage_options)
        if is_coordinator and backend.capabilities.local:
            target = os.path.join(backend.url, name)
            if os.path.isdir(target) and not os.path.islink(target) and not os.listdir(target):
                os.rmdir(target)  # DCP saves into a directory made for it: take its place
        threads = self.threads or default_threads()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="ckptstore-dcp")
        spec = SaveSpec(
            get_codec(self.codec),
            window=io_window(threads),
            manifest_key=resolve_manifest_key(),
            overwrite=self.overwrite,
        )
        # world_size=None: the ranks taking part, counted when their plans meet.
        self._inner = CkptStorageWriter(backend, name, spec, pool=self._pool, world_size=None)
        self._inner.set_up_storage_writer(is_coordinator, *args, **kwargs)

    def _writer(self) -> CkptStorageWriter:
        if self._inner is None:
            raise InvalidArgumentError("StorageWriter used outside dcp.save / dcp.async_save")
        return self._inner

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return self._writer().prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return self._writer().prepare_global_plan(plans)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        try:
            return self._writer().write_data(plan, planner)
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self._writer().finish(metadata, results)


class StorageReader(_ByPath, _DCPReader):
    """Reads ckptstore checkpoints for ``dcp.load``: every file checked against the
    manifest, DCP's metadata unpickled through ckptstore's allowlist. Non-tensor values
    are unpickled by the load planner: DCP's default one trusts them; pass
    ``planner=ckptstore.dcp.SafeLoadPlanner()`` for checkpoints you did not write."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        threads: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.path = None if path is None else os.fspath(path)
        self.threads = threads
        self.storage_options = storage_options
        self._inner: CkptStorageReader | None = None
        self._pool: ThreadPoolExecutor | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        root, name = _where(self.path, "StorageReader")
        backend = open_backend(root, storage_options=self.storage_options, create=False)
        name = replace.readable_name(backend, name)
        key = resolve_manifest_key()
        manifest = read_manifest(backend, name, manifest_key=key)
        metadata = read_dcp_metadata(backend, name, manifest)
        pool = ThreadPoolExecutor(self.threads or default_threads(), "ckptstore-dcp")
        self._inner = CkptStorageReader(backend, name, manifest, metadata, pool)
        self._pool = pool
        return self._inner.read_metadata(*args, **kwargs)

    def _reader(self) -> CkptStorageReader:
        if self._inner is None:
            raise InvalidArgumentError("StorageReader used outside dcp.load")
        return self._inner

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if self._inner is None:  # the metadata came from elsewhere: read ours
            self.read_metadata()
        self._reader().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return self._reader().prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return self._reader().prepare_global_plan(plans)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        try:
            return self._reader().read_data(plan, planner)
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
