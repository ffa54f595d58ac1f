"""``CkptStorageReader``: DCP plans the reads (and reshards); we fetch, check, decode.

DCP calls, in order (see ``torch.distributed.checkpoint.storage.StorageReader``)::

    read_metadata()          all ranks: returns metadata already checked by the caller
    set_up_storage_reader()  all ranks
    prepare_local_plan()     all ranks
    prepare_global_plan()    coordinator
    read_data()              all ranks, on the caller's thread

``read_data`` reads every chunk it needs in parallel on the codec pool. A read item that
covers a whole stored tensor and lands in a contiguous CPU tensor of the same dtype is
decoded straight into it; anything else (resharding, device or dtype change) decodes
into a temporary and is copied with DCP's narrowing rules. Temporaries are bounded by
``max_temp_bytes`` per batch; for a GPU target they are pinned and copied asynchronously.
"""

from __future__ import annotations

import ctypes
import functools
import io
import math
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ckptstore.dcp.packs import member_range
from ckptstore.errors import CheckpointNotFoundError, CorruptCheckpointError, PartElsewhereError
from ckptstore.format.manifest import Manifest
from ckptstore.format.shard import ShardReader, run_all
from ckptstore.layout import MANIFEST_FILE
from ckptstore.storage.base import StorageBackend

_MAX_TEMP_BYTES = 1 << 30


class CkptStorageReader(StorageReader):
    def __init__(
        self,
        backend: StorageBackend,
        name: str,
        manifest: Manifest,
        metadata: Metadata,
        pool: Executor | None,
        *,
        max_temp_bytes: int = _MAX_TEMP_BYTES,
    ) -> None:
        super().__init__()
        self._backend = backend
        self._name = name
        self._manifest = manifest
        self._metadata = metadata
        self._pool = pool
        self._max_temp_bytes = max_temp_bytes
        self._shards: dict[str, ShardReader] = {}
        self._packs: dict[tuple[str, int], np.ndarray] = {}  # decoded packs, per load
        self._lock = threading.Lock()
        self._pinned_devices: set[int] = set()  # GPUs copied to from pinned temporaries
        # (fqn, chunk offsets) -> chunk sizes, to shape a stored tensor shard.
        self._chunk_sizes: dict[tuple[str, tuple[int, ...]], torch.Size] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                for chunk in md.chunks:
                    self._chunk_sizes[(fqn, tuple(chunk.offsets))] = chunk.sizes

    # ---- StorageReader --------------------------------------------------------------
    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CorruptCheckpointError(f"{self._where()}: has no per-rank metadata")
        return self._metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        try:
            self._read(plan.items, planner)
        finally:
            self.close()
            devices, self._pinned_devices = self._pinned_devices, set()
            _release_pinned(devices)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    # ---- ours -----------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            for shard in self._shards.values():
                shard.close()
            self._shards.clear()
            self._packs.clear()

    def _where(self) -> str:
        return f"{self._backend.url}/{self._name}"

    def _shard(self, file_name: str) -> ShardReader:
        with self._lock:
            shard = self._shards.get(file_name)
            if shard is not None:
                return shard
            entry = self._manifest.files.get(file_name)
            where = f"{self._where()}/{file_name}"
            part = self._manifest.part
            if entry is None and part is not None and file_name in part.elsewhere:
                raise PartElsewhereError(
                    f"{where} is on another node's disk: {self._where()} is this disk's part "
                    "of a checkpoint written to node-local disks, and this rank needs data "
                    "another node wrote. Restore with the same nodes and ranks per node as "
                    "the run that saved it, or from its backup (backup=, `ckptstore train "
                    "--backup URL`), where the nodes' parts are one checkpoint that a "
                    "cluster of any shape restores"
                )
            if entry is None or entry.kind != "shard":
                raise CorruptCheckpointError(
                    f"{where}: DCP metadata refers to a shard the manifest does not list"
                )
            try:
                reader = self._backend.open_reader(f"{self._name}/{file_name}")
            except FileNotFoundError:
                if not self._backend.exists(f"{self._name}/{MANIFEST_FILE}"):
                    # Not damage: deleted since the manifest was read (retention, a
                    # discard) by the run writing this root.
                    raise CheckpointNotFoundError(
                        f"{self._where()} was retired while loading (deleted by the run "
                        "writing that root); load the newer one"
                    ) from None
                raise CorruptCheckpointError(
                    f"{where}: shard file is missing; restore an earlier checkpoint"
                ) from None
            try:
                shard = ShardReader(
                    reader, where, size_bytes=entry.size_bytes, index_xxh3=entry.xxh3_64
                )
            except BaseException:
                reader.close()
                raise
            self._shards[file_name] = shard
            return shard

    def _locate_index(
        self, where: MetadataIndex
    ) -> tuple[ShardReader, int, tuple[int, int] | None]:
        """The shard and item holding ``where``, and the byte range inside that item
        for a packed tensor (None: the whole item)."""
        storage = self._metadata.storage_data.get(where)
        if (
            not isinstance(storage, dict)
            or not isinstance(storage.get("file"), str)  # a list would not even hash
            or "item" not in storage
        ):
            raise CorruptCheckpointError(f"{self._where()}: no storage entry for {where.fqn!r}")
        shard = self._shard(storage["file"])
        index = storage["item"]
        if not isinstance(index, int) or not 0 <= index < len(shard.items):
            raise CorruptCheckpointError(f"{shard.where}: no item {index!r} for {where.fqn!r}")
        md = self._metadata.state_dict_metadata.get(where.fqn)
        nbytes = (
            math.prod(md.size) * md.properties.dtype.itemsize
            if isinstance(md, TensorStorageMetadata)
            else -1
        )
        try:
            found = member_range(storage, nbytes)
        except ValueError as exc:
            raise CorruptCheckpointError(f"{shard.where}: {where.fqn!r}: {exc}") from None
        if found is not None and found[0] + found[1] > shard.items[index].nbytes:
            raise CorruptCheckpointError(
                f"{shard.where}: {where.fqn!r} lies past the end of item {index}"
            )
        return shard, index, found

    def read_whole(self, pairs: list[tuple[MetadataIndex, torch.Tensor]]) -> None:
        """Fill each target with the stored tensor at its index, which it matches exactly
        (whole, same dtype and size, contiguous on the CPU): a load without DCP's
        per-item planning, for callers that checked those conditions themselves."""
        jobs: list[Callable[[], None]] = []
        packed: list[tuple[ShardReader, int, int, int, torch.Tensor]] = []
        for index, target in pairs:
            shard, item, where = self._locate_index(index)
            if where is not None:  # a small tensor inside a pack: copied from it below
                if (
                    target.nbytes != where[1]
                    or target.device.type != "cpu"
                    or not target.is_contiguous()
                    or target.is_conj()
                    or target.is_neg()
                ):  # memmove below writes raw bytes: a contiguous CPU tensor of that size
                    raise ValueError(f"{index.fqn!r}: the target does not match what is stored")
                packed.append((shard, item, where[0], where[1], target))
                continue
            out = (
                target.detach().reshape(-1).view(torch.uint8).numpy()
                if target.numel()
                else np.empty(0, np.uint8)
            )
            if shard.items[item].dtype != target.dtype:
                raise CorruptCheckpointError(
                    f"{shard.where}: {index.fqn!r} is stored as {shard.items[item].dtype}, "
                    f"the metadata says {target.dtype}"
                )
            jobs.extend(shard.chunk_jobs(item, out))
        self._decode_packs({(s, i) for s, i, _, _, _ in packed}, jobs)
        # One memmove per member (a numpy view and slice of each cost ~8 µs a tensor):
        # _locate_index checked that the range lies inside the decoded pack, and the
        # target is contiguous and exactly that size.
        bases = {key: buf.ctypes.data for key, buf in self._packs.items()}
        memmove = ctypes.memmove
        for shard, item, offset, nbytes, target in packed:
            if nbytes:
                memmove(target.data_ptr(), bases[(shard.where, item)] + offset, nbytes)

    def _decode_packs(
        self, wanted: set[tuple[ShardReader, int]], jobs: list[Callable[[], None]]
    ) -> None:
        """Run ``jobs`` with those decoding each wanted pack not decoded yet."""
        for shard, item in wanted:
            if (shard.where, item) not in self._packs:
                buf = np.empty(shard.items[item].nbytes, np.uint8)
                self._packs[(shard.where, item)] = buf
                jobs.extend(shard.chunk_jobs(item, buf))
        run_all(jobs, self._pool)  # the shards stay open for the rest of the load

    def _read(self, items: list[ReadItem], planner: LoadPlanner) -> None:
        jobs: list[Callable[[], None]] = []
        finishers: list[Callable[[], None]] = []
        temp_bytes = 0

        def flush() -> None:
            nonlocal jobs, finishers, temp_bytes
            run_all(jobs, self._pool)
            for finish in finishers:
                finish()
            jobs, finishers, temp_bytes = [], [], 0

        ranged: list[tuple[ReadItem, ShardReader, int, int]] = []
        for req in items:
            shard, index, where = self._locate_index(req.storage_index)
            if where is not None:  # a small tensor inside a pack: after the rest
                ranged.append((req, shard, index, where[0]))
                continue
            entry = shard.items[index]
            if req.type == LoadItemType.BYTE_IO:
                buf = np.empty(entry.nbytes, dtype=np.uint8)
                shard.read_item(index, buf, None)
                planner.load_bytes(req, io.BytesIO(buf.tobytes()))
                continue
            target = planner.resolve_tensor(req).detach()
            sizes = self._chunk_sizes.get(
                (req.storage_index.fqn, tuple(req.storage_index.offset or ()))
            )
            if sizes is None:
                raise CorruptCheckpointError(
                    f"{self._where()}: no chunk metadata for {req.storage_index}"
                )
            if entry.dtype is None:
                raise CorruptCheckpointError(
                    f"{shard.where}: {entry.key!r} is a value, expected a tensor"
                )
            whole = tuple(req.lengths) == tuple(sizes) and not any(req.storage_offsets)
            if (
                whole
                and target.device.type == "cpu"
                and target.dtype == entry.dtype
                and target.is_contiguous()
                and not target.is_conj()  # raw bytes into a conj/neg view: read back
                and not target.is_neg()  # conjugated/negated; _place's copy_ honours it
                and target.numel() * target.element_size() == entry.nbytes
            ):
                out = (
                    target.reshape(-1).view(torch.uint8).numpy()
                    if entry.nbytes
                    else np.empty(0, np.uint8)
                )
                jobs.extend(shard.chunk_jobs(index, out))
                finishers.append(functools.partial(planner.commit_tensor, req, target))
                continue
            # Sizes come from the metadata: check them against the shard's index before
            # allocating (a lying chunk could ask for terabytes).
            if any(not isinstance(n, int) or n < 0 for n in sizes) or (
                math.prod(sizes) * entry.dtype.itemsize != entry.nbytes
            ):
                raise CorruptCheckpointError(
                    f"{shard.where}: {entry.key!r} holds {entry.nbytes} B, metadata says {list(sizes)} {entry.dtype}"
                )
            pinned = _pinned_for(target)
            if pinned:
                self._pinned_devices.add(target.device.index or 0)
            temp = torch.empty(sizes, dtype=entry.dtype, pin_memory=pinned)
            if temp_bytes and temp_bytes + entry.nbytes > self._max_temp_bytes:
                flush()
            temp_bytes += entry.nbytes
            out = (
                temp.reshape(-1).view(torch.uint8).numpy()
                if entry.nbytes
                else np.empty(0, np.uint8)
            )
            jobs.extend(shard.chunk_jobs(index, out))

            finishers.append(functools.partial(self._place, planner, req, target, temp))
        flush()
        self._decode_packs({(s, i) for _, s, i, _ in ranged}, [])
        for req, shard, index, offset in ranged:
            md = self._metadata.state_dict_metadata[req.storage_index.fqn]
            assert isinstance(md, TensorStorageMetadata)  # member_range checked its size
            src = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            if src.numel():
                raw = src.reshape(-1).view(torch.uint8).numpy()
                raw[:] = self._packs[(shard.where, index)][offset : offset + raw.nbytes]
            self._place(planner, req, planner.resolve_tensor(req).detach(), src)

    def _place(
        self, planner: LoadPlanner, req: ReadItem, target: torch.Tensor, src: torch.Tensor
    ) -> None:
        """Copy the part of stored tensor ``src`` that ``req`` asks for into ``target``."""
        piece = narrow_tensor_by_index(src, req.storage_offsets, req.lengths)
        if target.size() != piece.size():
            raise CorruptCheckpointError(
                f"{self._where()}: {req.storage_index.fqn!r} read {list(piece.size())}, target wants {list(target.size())}"
            )
        # Onto a GPU from a pinned temporary: asynchronous, on the caller's current
        # stream (so later work there sees it); decoding the next items overlaps the
        # transfer, and torch's pinned allocator keeps the temporary until it is done.
        target.copy_(piece, non_blocking=target.device.type == "cuda" and piece.is_pinned())
        planner.commit_tensor(req, target)


def _pinned_for(target: torch.Tensor) -> bool:
    """Decode into pinned memory when the bytes go on to a GPU (3-5x faster copies).

    These temporaries come from torch's caching pinned allocator, which reuses them from
    one batch to the next (at most ``max_temp_bytes`` a batch, rounded up to powers of
    two) instead of pinning fresh memory for every tensor; :func:`_release_pinned`
    hands them back at the end of the load.
    """
    return target.device.type == "cuda" and torch.cuda.is_available()


def _release_pinned(devices: set[int]) -> None:
    """After a load that copied through pinned temporaries: wait for those copies (on
    the streams they were queued on, not the whole device) and return the pinned blocks
    that torch's allocator would otherwise keep for the life of the process."""
    if not devices:
        return
    for index in devices:
        torch.cuda.current_stream(index).synchronize()
    # Private, but the only way to give cached pinned blocks back; blocks still in use
    # elsewhere in the process (a DataLoader's, say) are not touched.
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def narrow_tensor_by_index(tensor: torch.Tensor, offsets: Any, sizes: Any) -> torch.Tensor:
    """The region of ``tensor`` at ``offsets`` of ``sizes`` (DCP's rule for a read item).

    Copied from ``torch.distributed._shard._utils`` (a deprecated private package) so
    that ckptstore does not depend on it.
    """
    narrowed = tensor
    for dim, (offset, size) in enumerate(zip(offsets, sizes, strict=True)):
        if size < tensor.size(dim):
            narrowed = narrowed.narrow(dim, offset, size)
    return narrowed
