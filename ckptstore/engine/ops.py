"""One checkpoint: save a staged state, load into a state dict, verify (listing and
manifests: :mod:`ckptstore.engine.listing`, which needs no torch).

This layer knows the format and drives DCP; it knows nothing about asynchrony (that is
:mod:`ckptstore.engine.checkpointer`) or about policies (the manager). Everything here runs
on the calling thread; collectives go over the gloo group it is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.stateful import Stateful

from ckptstore.dcp import driver
from ckptstore.dcp import metadata as md_format
from ckptstore.dcp import packs as packs_mod
from ckptstore.dcp.incremental import IncrementalCache
from ckptstore.dcp.plancache import PlanCache
from ckptstore.dcp.planner import LocalPlans, SafeLoadPlanner, StagedSavePlanner
from ckptstore.dcp.reader import CkptStorageReader
from ckptstore.dcp.spec import SaveSpec
from ckptstore.dcp.writer import CkptStorageWriter
from ckptstore.engine import groups, nodelocal
from ckptstore.engine.compat import check_compatible

# The torch-free part (listing, manifests) lives in listing.py; these names stay importable
# from here as they always were.
from ckptstore.engine.listing import CheckpointInfo as CheckpointInfo
from ckptstore.engine.listing import checkpoint_url
from ckptstore.engine.listing import list_checkpoints as list_checkpoints
from ckptstore.engine.listing import read_manifest as read_manifest
from ckptstore.engine.listing import step_mismatch as step_mismatch
from ckptstore.engine.stager import StagedState
from ckptstore.errors import (
    HINT_DAMAGED_METADATA,
    CkptStoreError,
    CorruptCheckpointError,
    InvalidArgumentTypeError,
)
from ckptstore.format.checksum import digest
from ckptstore.format.manifest import Manifest
from ckptstore.format.shard import ShardReader
from ckptstore.layout import METADATA_FILE
from ckptstore.storage.base import StorageBackend


@dataclass(frozen=True)
class WriteStats:
    """What one rank measured while writing its part of a checkpoint."""

    manifest: Manifest | None  # on the coordinator only
    raw_bytes: int  # this rank's
    stored_bytes: int  # this rank's
    io_s: float  # this rank's write_data
    sink_s: float  # of which: writing to storage
    encode_s: float  # thread-seconds spent encoding on the codec pool
    total_s: float  # the whole DCP save, collectives included
    written: frozenset[str] | None = None  # several ranks: the tensors this rank wrote


def read_dcp_metadata(backend: StorageBackend, name: str, manifest: Manifest) -> Metadata:
    """DCP's metadata, read only after its size and checksum match the manifest."""
    md_name = md_format.metadata_file(manifest.files)
    where = f"{checkpoint_url(backend, name)}/{md_name or METADATA_FILE}"
    hint = HINT_DAMAGED_METADATA
    entry = manifest.files.get(md_name) if md_name is not None else None
    if md_name is None or entry is None or entry.kind != "file":
        raise CorruptCheckpointError(
            f"{where}: not listed in the manifest (or listed more than once); {hint}"
        )
    try:
        data = backend.read_bytes(f"{name}/{md_name}")
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{where}: file is missing; {hint}") from None
    if len(data) != entry.size_bytes:
        raise CorruptCheckpointError(
            f"{where}: {len(data)} B, the manifest says {entry.size_bytes} B; {hint}"
        )
    got = digest(data)
    if got != entry.xxh3_64:
        raise CorruptCheckpointError(
            f"{where}: checksum mismatch (expected {entry.xxh3_64}, got {got}); {hint}"
        )
    return md_format.loads(data, where, checked=True)


@dataclass
class SaveCache:
    """What one checkpointer's saves reuse while the state's layout holds: how its small
    tensors are packed, DCP's plans, and the pickled ``.metadata``."""

    packs: packs_mod.PackCache = field(default_factory=packs_mod.PackCache)
    plans: PlanCache = field(default_factory=PlanCache)
    local_plans: LocalPlans = field(default_factory=LocalPlans)  # DCP's, by layout
    metadata: md_format.MetadataCache = field(default_factory=md_format.MetadataCache)
    # The coordinator: what the last save's global plan held (see CkptStorageWriter)
    items: set[tuple[str, str, tuple[int, ...]]] | None = None
    # Node-local disks (engine.nodelocal): on rank 0, the .metadata body and head each
    # committing rank holds; on a committing rank, the body and head it holds (ident, bytes)
    handed: dict[int, str] = field(default_factory=dict)
    held: tuple[str, bytes] | None = None
    # Incremental saves: this rank's last committed save, item by item (None: off)
    incremental: IncrementalCache | None = None
    # Of the save being written: raises if what staging trusted unchanged was not
    confirm: Callable[[], None] | None = None

    @classmethod
    def incremental_saves(cls, full_every: int) -> SaveCache:
        """The cache of a writer whose saves link what did not change (dcp.incremental);
        ``full_every=1``: every save writes everything, so nothing is hashed or noted
        (as without incremental saves)."""
        cache = cls()
        if full_every != 1:
            cache.incremental = IncrementalCache(full_every)
            cache.plans.itemized = True
        return cache


def save_staged(
    staged: StagedState,
    backend: StorageBackend,
    name: str,
    spec: SaveSpec,
    *,
    pool: Executor,
    group: dist.ProcessGroup | None,
    failure: str | None = None,
    cache: SaveCache | None = None,
) -> WriteStats:
    """Write ``staged`` as checkpoint ``name``; collective over ``group``. ``cache``:
    what the same caller's last save planned, reused while the state's layout holds.

    With ``failure`` set, this rank only enters the collectives to fail them (see
    :class:`CkptStorageWriter`); the save then raises on every rank.
    """
    start = time.perf_counter()
    flat, packs = packs_mod.pack(
        staged.flat,
        staged.mappings,
        arena=staged.arena.buffer if staged.arena is not None else None,
        layout=staged.layout,
        cache=cache.packs if cache is not None else None,
        skipped=staged.skipped,
    )
    writer = CkptStorageWriter(
        backend,
        name,
        spec,
        pool=pool,
        world_size=groups.world_size(group),
        failure=failure,
        packs=packs,
        disk=backend.disk_id() if group is not None else "",
        md_cache=cache.metadata if cache is not None else None,
        skipped=staged.skipped,
        cache=cache,
    )
    if cache is not None:
        cache.confirm = staged.found.confirm if staged.found.later is not None else None
    if cache is not None and cache.incremental is not None:
        cache.incremental.versions = staged.versions
        cache.incremental.given = staged.found.verified
        cache.incremental.hashed_tensors = {}
    try:
        if cache is not None and cache.incremental is not None and staged.arena is not None:
            cache.incremental.raws = staged.arena.raws()
        layout = None  # what the local plan depends on (dcp.planner.LocalPlans)
        if cache is not None and staged.layout is not None and staged.arena is not None:
            packed = tuple((name, flat[name].nbytes) for name in packs)  # (packs.pack)
            layout = (staged.layout, (staged.arena.pinned, staged.skipped, packed))
        planner = StagedSavePlanner(
            staged.mappings, cache.local_plans if cache is not None else None, layout
        )
        # Without autograd: a staged DTensor's to_local() is then its arena view itself
        # (IncrementalCache.bytes_of finds it), not a new view_as of it
        with torch.no_grad():
            driver.save(flat, writer, planner, group, cache.plans if cache is not None else None)
    except BaseException:
        writer.abort()
        if cache is not None and cache.incremental is not None:
            cache.incremental.drop()
        # what staging trusted: rank 0 checks it only as it commits, which a failure
        # elsewhere skips; settled before the caller hears of the failure
        staged.found.settle()
        raise
    finally:
        if cache is not None:
            cache.confirm = None  # it holds the state's tensors: not past the save
            if cache.incremental is not None:
                cache.incremental.raws = {}  # the arena's: not past the save
    if writer.node_local and group is not None:
        try:
            nodelocal.commit_parts(writer, backend, name, group)
        except BaseException:
            if cache is not None and cache.incremental is not None:
                cache.incremental.drop()
            raise
    if cache is not None and cache.incremental is not None:
        cache.incremental.commit()
    shard = writer.shard_info
    return WriteStats(
        manifest=writer.manifest,
        raw_bytes=shard.raw_bytes if shard else 0,
        stored_bytes=shard.stored_bytes if shard else 0,
        io_s=writer.io_seconds,
        sink_s=shard.sink_s if shard else 0.0,
        encode_s=shard.encode_s if shard else 0.0,
        total_s=time.perf_counter() - start,
        written=frozenset(writer.written) if group is not None else None,
    )


def read_checked(
    backend: StorageBackend, name: str, group: dist.ProcessGroup | None, key: bytes | None
) -> tuple[Manifest, Metadata]:
    """The manifest and DCP metadata of ``name``, checked: read by rank 0 of ``group``
    and broadcast (``.metadata`` is hundreds of MB at 1,000 ranks; issue 17), so pass a
    group only where every rank of it reads the same root."""

    def read() -> tuple[Manifest, Metadata]:
        manifest = read_manifest(backend, name, manifest_key=key)
        return manifest, read_dcp_metadata(backend, name, manifest)

    if group is None:
        return read()
    return groups.decide(read, group, what=f"read {backend.url}/{name}")


def load_into(
    state_dict: dict[str, Any],
    backend: StorageBackend,
    name: str,
    *,
    pool: Executor | None,
    group: dist.ProcessGroup | None,
    allow_partial: bool = False,
    allow_cast: bool = False,
    manifest_key: bytes | None = None,
    preread: tuple[Manifest, Metadata] | None = None,
) -> Manifest:
    """Load checkpoint ``name`` into ``state_dict`` in place (DCP semantics; reshards).
    ``preread``: its manifest and DCP metadata, already read and checked (not again).

    The manifest is checked (and its HMAC, with a ``manifest_key``) before any other
    file is read; ``.metadata`` is unpickled only after its checksum matches. A tensor
    whose stored values its target's dtype cannot hold exactly (fp32 into fp16) is
    refused unless ``allow_cast``.
    """
    if not isinstance(state_dict, dict):
        raise InvalidArgumentTypeError(
            f"state_dict must be a dict to load into, got {type(state_dict).__name__}"
        )
    if preread is None:
        manifest = read_manifest(backend, name, manifest_key=manifest_key)
        metadata = read_dcp_metadata(backend, name, manifest)
    else:
        manifest, metadata = preread
    keys = sorted(state_dict)
    target = {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in state_dict.items()}
    flat, mappings = check_compatible(
        target,
        metadata,
        checkpoint_url(backend, name),
        allow_partial=allow_partial,
        allow_cast=allow_cast,
    )
    reader = CkptStorageReader(backend, name, manifest, metadata, pool)
    try:
        if group is None:
            _load_flat(flat, mappings, target, metadata, reader, allow_partial)
        else:  # every rank takes DCP's path: its collectives pair the ranks' calls
            driver.load(target, reader, SafeLoadPlanner(allow_partial_load=allow_partial), group)
    finally:
        reader.close()
    for key in keys:
        value = state_dict[key]
        if isinstance(value, Stateful):
            value.load_state_dict(target[key])
        else:
            state_dict[key] = target[key]
    return manifest


def _load_flat(
    flat: dict[str, Any],
    mappings: dict[str, Any],
    target: dict[str, Any],
    metadata: Metadata,
    reader: CkptStorageReader,
    allow_partial: bool,
) -> None:
    """One process's load: tensors stored whole that land unchanged in a contiguous CPU
    tensor (the common case: same model, one process) are read straight in, without
    DCP's per-item planning (~50 µs a tensor); the rest goes through DCP."""
    stored = metadata.state_dict_metadata
    exact: list[tuple[MetadataIndex, torch.Tensor]] = []
    rest: dict[str, Any] = {}
    for fqn, obj in flat.items():
        md = stored.get(fqn)
        if (
            type(obj) in _PLAIN_TENSORS
            and isinstance(md, TensorStorageMetadata)
            and len(md.chunks) == 1
            and obj.device.type == "cpu"
            and obj.dtype == md.properties.dtype
            and obj.size() == md.size == md.chunks[0].sizes
            and not any(md.chunks[0].offsets)
            and obj.is_contiguous()
            and not obj.is_conj()
            and not obj.is_neg()
        ):
            exact.append((md_format.metadata_index(fqn, md.chunks[0].offsets), obj))
        else:
            rest[fqn] = obj
    reader.read_whole(exact)
    if not rest:
        return
    driver.load(rest, reader, SafeLoadPlanner(allow_partial_load=allow_partial), None)
    for fqn, obj in rest.items():
        if not isinstance(obj, torch.Tensor):  # values are replaced, tensors filled in place
            set_element(target, mappings[fqn], obj)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def fill_from_checkpoint(
    target: dict[str, Any], metadata: Metadata, select: Callable[[tuple[Any, ...]], bool]
) -> int:
    """Add to ``target`` every entry the checkpoint holds at a path ``select`` accepts,
    shaped as stored (tensors of the stored size and dtype, values as placeholders), so
    that loading fills them whatever the target held there. Returns how many.

    For parts whose shape only the checkpoint knows: counters, user extras, this
    rank's generator states.
    """
    planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    added = 0
    for fqn, md in metadata.state_dict_metadata.items():
        path = planner_data.get(fqn)
        if not isinstance(path, tuple) or not path:
            path = tuple(fqn.split("."))
        if not select(path):
            continue
        value: Any = None
        if isinstance(md, TensorStorageMetadata):
            value = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        set_element(target, path, value)
        added += 1
    return added


def verify(
    backend: StorageBackend,
    name: str,
    pool: Executor | None,
    *,
    manifest_key: bytes | None = None,
) -> list[str]:
    """Check every byte of checkpoint ``name`` against its manifest.

    Returns one line per problem (empty: all is well). Reads every file in full, but
    of a file linked from an earlier checkpoint (incremental) only the items this one
    uses (:func:`items_used`). With a
    ``manifest_key``, an unsigned or wrongly signed manifest is the only problem
    reported: nothing else is read.
    """
    try:
        manifest = read_manifest(backend, name, manifest_key=manifest_key)
    except CkptStoreError as exc:
        return [str(exc)]
    mismatch = step_mismatch(backend, name, manifest)
    if mismatch is not None:
        return [mismatch]
    problems = []
    used: dict[str, set[int]] = {}
    try:
        used = items_used(read_dcp_metadata(backend, name, manifest), manifest.linked)
    except CkptStoreError as exc:
        problems.append(str(exc))
    for file_name, shard in open_shards(backend, name, manifest, problems):
        try:
            shard.verify(pool, used.get(file_name))
        except CkptStoreError as exc:
            problems.append(str(exc))
    return problems


def items_used(metadata: Metadata, files: Iterable[str]) -> dict[str, set[int]]:
    """For each of ``files``, the indices of the items ``metadata`` reads from it.

    A file an incremental save linked from an earlier checkpoint also holds that save's
    items that changed since (superseded: no load of this checkpoint reads them), so
    damage there is no damage to this checkpoint; every other file is checked whole.
    """
    used: dict[str, set[int]] = {name: set() for name in files}
    for stored in metadata.storage_data.values():
        if not isinstance(stored, dict):
            continue  # (a malformed entry: load says so)
        where, item = stored.get("file"), stored.get("item")
        if isinstance(where, str) and where in used and isinstance(item, int):
            used[where].add(item)
    return used


def open_shards(
    backend: StorageBackend, name: str, manifest: Manifest, problems: list[str]
) -> Iterator[tuple[str, ShardReader]]:
    """Each shard file the manifest lists, open and with its index checked, in name order.

    A file that is missing or whose index does not check out becomes a line in
    ``problems`` instead; each file is closed when the caller moves on.
    """
    for file_name, entry in sorted(manifest.files.items()):
        if entry.kind != "shard":
            continue
        where = f"{checkpoint_url(backend, name)}/{file_name}"
        try:
            reader = backend.open_reader(f"{name}/{file_name}")
        except FileNotFoundError:
            problems.append(f"{where}: file is missing")
            continue
        except CkptStoreError as exc:
            problems.append(str(exc))
            continue
        try:
            try:
                shard = ShardReader(
                    reader, where, size_bytes=entry.size_bytes, index_xxh3=entry.xxh3_64
                )
            except CkptStoreError as exc:
                problems.append(str(exc))
                continue
            yield file_name, shard
        finally:
            reader.close()
