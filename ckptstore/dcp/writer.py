"""``CkptStorageWriter``: DCP plans and coordinates; we encode, checksum and commit.

DCP calls, in order (see ``torch.distributed.checkpoint.storage.StorageWriter``)::

    set_up_storage_writer()   all ranks
    prepare_local_plan()      all ranks
    prepare_global_plan()     coordinator: begins the pending checkpoint; its token
                              travels to every rank inside the plan
    write_data()              all ranks: one shard file per rank, fsynced
    finish()                  coordinator, after every rank's write succeeded:
                              .metadata, then the manifest, then the atomic commit
                              (once the hash of what it trusted unchanged matched)

Node-local disks (ranks whose roots have different ``disk_id``): each disk gets a part
of the checkpoint (its ranks' shards, and its own ``.metadata`` and manifest); the ranks
of a disk the coordinator's root is not on create that disk's part of the pending
checkpoint (``join_part``) and ``finish`` only prepares the parts; the engine commits
them after DCP returns, rank 0's last (:mod:`ckptstore.engine.nodelocal`).

All of it runs on the checkpointer's writer thread (or the caller's, for a synchronous
save); collectives between those steps go over ckptstore's own gloo group. If any rank
fails, DCP never calls ``finish``; the caller then calls :meth:`abort`.
"""

from __future__ import annotations

import dataclasses
import io
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ckptstore.dcp import metadata as md_format
from ckptstore.dcp import packs as packs_mod
from ckptstore.dcp.plancache import Outcome
from ckptstore.dcp.raw import item_key, tensor_bytes
from ckptstore.dcp.spec import PartFiles, SaveSpec
from ckptstore.errors import CkptStoreError, RanksDisagreeError
from ckptstore.format.checksum import digest
from ckptstore.format.manifest import FileEntry, Manifest, Part
from ckptstore.format.shard import ShardInfo, ShardWriter
from ckptstore.layout import METADATA_FILE
from ckptstore.storage import replace
from ckptstore.storage.base import PendingCheckpoint, StorageBackend

_DCP_VERSION = "1.0.0"  # the metadata version DCP's own FileSystemWriter writes


@dataclass(frozen=True)
class _RankPlan:
    name: str  # the checkpoint this rank believes it is saving
    packs: packs_mod.Packs = field(default_factory=dict)  # its small tensors' groups
    disk: str = ""  # its root's StorageBackend.disk_id()
    skipped: frozenset[str] = frozenset()  # tensors it did not stage: others write them
    incremental: bool = False  # its saves link what did not change (dcp.incremental)


@dataclass(frozen=True)
class _ShardPlan:
    token: str  # the pending checkpoint, as backend.attach() knows it
    prefix: str  # "__{rank}_"
    join: bool = False  # on a disk the coordinator's root is not on: join_part()
    commits: str | None = None  # the name this rank commits its disk's part as
    parts: bool = False  # the ranks write to several disks: commit_parts follows
    gen: str = ""  # the generation of the plans (dcp.plancache)
    cached: bool = False  # the items left out: the rank's cached final plan has them


def _check_incremental(flags: list[bool]) -> None:
    """Every rank saves incrementally or none does: their write results differ in kind.
    (``full_every=1`` saves as without ``incremental``: it counts as off.)"""
    if len(set(flags)) > 1:
        on, off = ([str(r) for r, f in enumerate(flags) if f is v][:8] for v in (True, False))
        cut = " (the first 8 of each)" if max(flags.count(True), flags.count(False)) > 8 else ""
        raise RanksDisagreeError(
            f"ranks disagree on incremental saves: on for rank(s) {', '.join(on)}, off for "
            f"{', '.join(off)}{cut}. Pass the same incremental= and full_every= on every "
            "rank (ckptstore train: the same --incremental and --full-every on every "
            "node's launcher)"
        )


class CkptStorageWriter(StorageWriter):
    """Writes one checkpoint ``name`` under ``backend`` in ckptstore's format."""

    def __init__(
        self,
        backend: StorageBackend,
        name: str,
        spec: SaveSpec,
        *,
        pool: Executor,
        world_size: int | None,
        failure: str | None = None,
        packs: packs_mod.Packs | None = None,
        disk: str = "",
        md_cache: md_format.MetadataCache | None = None,
        skipped: frozenset[str] = frozenset(),
        cache: Any = None,
    ) -> None:
        """``world_size``: recorded in the manifest (None: the ranks whose plans meet on
        the coordinator). ``failure``: this rank could not stage its state; it still enters the save's
        collectives and fails them, so that every rank fails this save together and the
        ranks stay in step (a rank that skipped a save would pair its next one with the
        others' current one)."""
        super().__init__()
        self._disk = disk  # this rank's root's disk_id (several ranks: node-local disks?)
        self._failure = failure
        self._packs = packs or {}  # this rank's (packs_mod.pack); all ranks' on the coordinator
        self._md_cache = md_cache  # the last save's .metadata, reused if the same
        self._skipped = skipped  # this rank's tensors it did not stage (StagingPool)
        self._cache = cache  # engine.ops.SaveCache: its .items, on the coordinator
        self.written: set[str] = set()  # the tensors (and values) this rank wrote
        self._spec = spec
        self._rank = 0
        self._backend = backend
        self._name = name
        self._written = name  # where the coordinator writes: beside name when replacing it
        self._pool = pool
        self._world_size = world_size
        self._save_id = uuid.uuid4().hex
        self._pending: PendingCheckpoint | None = None
        self._committed = False
        self._is_coordinator = False  # (set_up_storage_writer)
        self._disks: list[str] = []  # each rank's disk (coordinator)
        # Node-local disks: this rank's part (if its disk is not the coordinator's), and
        # on the coordinator each disk's (.metadata, manifest) bytes, committed later.
        self.part: PendingCheckpoint | None = None
        self.part_name: str | None = None  # set on the rank that commits self.part
        self.parts: dict[str, PartFiles] = {}
        self.committers: dict[int, str] = {}  # rank -> the disk whose part it commits
        self._in_parts = False
        self.manifest: Manifest | None = None  # set on the coordinator once committed
        self.shard_info: ShardInfo | None = None  # this rank's shard, once written
        self.io_seconds = 0.0  # time this rank spent in write_data

    # ---- StorageWriter ------------------------------------------------------------
    def reset(self, checkpoint_id: Any = None) -> None:
        self._save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._is_coordinator = is_coordinator
        self._rank = int(kwargs.get("rank") or 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if self._failure is not None:
            raise CkptStoreError(
                f"rank {self._rank} could not stage its state for {self._name}: {self._failure}"
            )
        inc = self._cache is not None and self._cache.incremental is not None
        return dataclasses.replace(
            plan, storage_data=_RankPlan(self._name, self._packs, self._disk, self._skipped, inc)
        )

    def prepare_global_plan(
        self, plans: list[SavePlan], gen: str = "", steady: bool = False
    ) -> list[SavePlan]:
        """``steady``: ``plans`` are those of the last save (dcp.plancache), whose
        checks passed; each rank is sent only its storage plan."""
        names = [
            p.storage_data.name if isinstance(p.storage_data, _RankPlan) else None for p in plans
        ]
        if len(set(names)) != 1:
            shown = ", ".join(f"rank {r}: {n}" for r, n in enumerate(names[:8]))
            raise CkptStoreError(
                f"ranks are saving different checkpoints in one collective ({shown}); every rank "
                "must call save_async for the same steps, in the same order"
            )
        if not steady:
            _check_incremental([p.storage_data.incremental for p in plans])
        merged: packs_mod.Packs = {}
        for p in plans:
            merged.update(p.storage_data.packs)
        self._packs = merged
        if not steady:
            self._check_skipped(plans)
        if self._world_size is None:
            self._world_size = len(plans)
        self._disks = disks = [p.storage_data.disk for p in plans]
        if self.node_local and self._spec.overwrite:
            raise CkptStoreError(
                "overwrite=True needs every rank's root on one file system; these ranks "
                "write to different disks (node-local roots)"
            )
        if self._spec.overwrite:
            self._written = replace.begin_replace(self._backend, self._name)
        self._pending = self._backend.begin(self._written)
        token = self._pending.token
        first = {d: disks.index(d) for d in reversed(disks)}  # each disk's lowest rank
        self.committers = {r: d for d, r in first.items() if d != disks[0]}
        return [
            dataclasses.replace(
                plan,
                items=[] if steady else plan.items,
                planner_data=None if steady else plan.planner_data,
                storage_data=_ShardPlan(
                    token,
                    f"__{rank}_",
                    join=disks[rank] != disks[0],
                    commits=self._written if rank in self.committers else None,
                    parts=self.node_local,
                    gen=gen,
                    cached=steady,
                ),
            )
            for rank, plan in enumerate(plans)
        ]

    def _check_skipped(self, plans: list[SavePlan]) -> None:
        """Ranks stage only what they wrote last time (StagingPool.note_written): check
        that every tensor a rank skipped is still written by another on its disk (all
        the same disk but with node-local roots), against the last save's global plan;
        a save that would lose one fails instead."""
        if self._cache is None:
            return
        items: set[tuple[str, str, tuple[int, ...]]] = set()
        skipped: set[tuple[str, str]] = set()
        for p in plans:
            disk = p.storage_data.disk
            skipped.update((disk, fqn) for fqn in p.storage_data.skipped)
            for item in p.items:
                members = self._packs.get(item.index.fqn)
                if members is not None:
                    # as the member's own item would be keyed (a rank packs only from
                    # PACK_FROM small tensors: after skipping, it may not pack them)
                    items.update((disk, m.fqn, (0,) * len(m.shape)) for m in members)
                else:
                    items.add((disk, item.index.fqn, tuple(item.index.offset or ())))
        last, self._cache.items = self._cache.items, items
        if not skipped or last is None:
            return
        lost = sorted(k[1] for k in last - items if k[:2] in skipped)
        if lost:
            self._cache.items = None
            raise CkptStoreError(
                f"{len(lost)} tensor(s) would be missing from {self._name} (e.g. {lost[0]!r}): "
                "ranks skip staging what another rank wrote in the save before, and that "
                "rank no longer holds it. This save fails; the next one stages everything"
            )

    @property
    def cache(self) -> Any:
        """The ``engine.ops.SaveCache`` this save reuses (None: a one-shot save)."""
        return self._cache

    @property
    def node_local(self) -> bool:
        """Whether this save's ranks write to more than one disk (coordinator; on
        the others once ``write_data`` ran)."""
        return len(set(self._disks)) > 1 or self._in_parts

    @property
    def coordinator_disk(self) -> str:
        return self._disks[0]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        start = time.perf_counter()
        shard_plan: _ShardPlan = plan.storage_data
        pending = self._pending
        self._in_parts = shard_plan.parts
        if shard_plan.join:
            pending = self.part = self._backend.join_part(shard_plan.token, shard_plan.commits)
            self.part_name = shard_plan.commits
        elif pending is None or pending.token != shard_plan.token:
            pending = self._backend.attach(shard_plan.token)
        for item in plan.items:
            members = self._packs.get(item.index.fqn)
            if members is not None:
                self.written.update(m.fqn for m in members)
            else:
                self.written.add(item.index.fqn)
        results: list[WriteResult] = []
        if plan.items:
            results = self._write_shard(
                pending, f"{shard_plan.prefix}0.distcp", plan.items, planner
            )
        if not self._is_coordinator:  # the coordinator's: in finish, before it commits
            self._confirm()
        self.io_seconds = time.perf_counter() - start
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_shard(
        self,
        pending: PendingCheckpoint,
        base_name: str,
        items: list[WriteItem],
        planner: SavePlanner,
    ) -> list[WriteResult]:
        file_name = pending.stored_name(base_name)
        placed: list[tuple[str, int]] = []  # each item's file and index in it
        entries: list[tuple[str, Any, torch.dtype | None]] = []
        inc = None if self._cache is None else self._cache.incremental
        hashing = writer = None
        sizes: list[int] = []  # each item's raw bytes
        to_bytes = tensor_bytes if inc is None else inc.bytes_of  # (a staged tensor's: kept)

        def resolve(item: WriteItem) -> tuple[str, Any, torch.dtype | None]:
            data = planner.resolve_data(item)
            raw = data.getvalue() if isinstance(data, io.BytesIO) else to_bytes(data)
            sizes.append(len(raw))
            return item_key(item.index), raw, None if isinstance(data, io.BytesIO) else data.dtype

        try:
            if inc is not None:  # incremental saves: link what did not change
                inc.read_through = pending is self.part  # (a disk other than rank 0's)
                entries = [resolve(item) for item in items]
                fqns = [str(i.index.fqn) for i in items]
                hashing = inc.start(entries, fqns, self._pool, self._spec.full)
            writer = ShardWriter(
                pending.create_file(file_name, size_hint=hashing and hashing.expected),
                self._spec.codec, self._pool,
                chunk_bytes=self._spec.chunk_bytes, window=self._spec.window,
            )  # fmt: skip
            reuse = None
            if inc is None or hashing is None:  # written as resolved: one copy held at a time
                placed = [(file_name, writer.add(*resolve(item))) for item in items]
            else:
                names = (self._name, base_name, file_name)
                reuse, placed = inc.place(
                    writer, pending, self._backend, entries, hashing, names, self._spec
                )
            info = writer.finish()
        except BaseException:
            if writer is not None:
                writer.abort()
            if hashing is not None:  # they read the staging buffer: let them end first
                hashing.wait()
            raise
        if reuse is not None:  # the note is not state
            info = dataclasses.replace(info, raw_bytes=info.raw_bytes - reuse.note_bytes)
        self.shard_info = info
        shard: dict[str, Any] = {
            "name": file_name,
            "size_bytes": info.size_bytes,
            "xxh3_64": info.index_xxh3,
            "raw_bytes": info.raw_bytes,
        }
        if inc is not None and reuse is not None:
            links = inc.written(self._name, (base_name, file_name, info), entries, placed, reuse)
            if links:
                shard.update(links=links, raw_bytes=info.raw_bytes + reuse.raw_linked)
        results = []
        for n, (item, (in_file, index)) in enumerate(zip(items, placed, strict=True)):
            storage: dict[str, Any] = {"file": in_file, "item": index}
            if n == 0:  # the coordinator collects per-file facts from the first result
                storage["shard"] = shard
            results.append(
                WriteResult(index=item.index, size_in_bytes=sizes[n], storage_data=storage)
            )
        return results

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.finish_outcome(metadata, Outcome.of(results))

    def finish_outcome(self, metadata: Metadata, results: Outcome) -> None:
        """``finish``, given the ranks' results as :class:`Outcome` (cheap when the
        plans were reused: dcp.plancache)."""
        assert self._pending is not None, "finish() before prepare_global_plan()"
        metadata.storage_meta = StorageMeta(checkpoint_id=self._name, save_id=self._save_id)
        if hasattr(metadata, "version"):
            metadata.version = _DCP_VERSION
        if not self.node_local:
            manifest = self._describe(metadata, results, range(len(results.facts))).manifest
            self._confirm()
            self._pending.commit(manifest)
            self._committed = True
            if self._spec.overwrite:
                replace.finish_replace(self._backend, self._name, self._written)
            return
        # Node-local disks: a part per disk, pointing at its ranks' copies of what several
        # ranks wrote, committed by the engine once DCP returns; the parts share one .metadata
        # body (one pickle), and differ in what ranks on several disks wrote (part_tables).
        disks = list(dict.fromkeys(self._disks))
        ranks = range(len(results.facts))
        parts = tuple(tuple(r for r in ranks if self._disks[r] == d) for d in disks)
        items = metadata.state_dict_metadata
        expand = packs_mod.expander(self._packs, items) if self._packs else None
        common, changes = results.part_tables(parts, expand)
        for disk, mine, change in zip(disks, parts, changes, strict=True):
            others = [r for r in ranks if self._disks[r] != disk]
            self.parts[disk] = self._describe(
                metadata, results, mine, others, disk, (common, change)
            )
        if self._md_cache is not None:
            self._md_cache.keep_parts(disks)
        self._confirm()

    def _confirm(self) -> None:
        """Raise if what staging trusted unchanged was not (engine.unchanged). That hash
        reads the tensors where they lie; on the coordinator it runs on while ``finish``
        writes ``.metadata`` (1.3-1.7 ms less per save in issue 19's bench)."""
        if self._cache is not None and self._cache.confirm is not None:
            self._cache.confirm()

    def _describe(
        self,
        metadata: Metadata,
        results: Outcome,
        ranks: Any,
        others: Any = (),
        disk: str | None = None,
        tables: tuple[dict[Any, Any], dict[Any, Any]] | None = None,
    ) -> PartFiles:
        """The ``.metadata`` (written now on the coordinator's disk) and the manifest of
        the files ``ranks`` wrote; ``others``' shards, on other disks, listed as the
        part's ``elsewhere``. ``tables``: a node-local part's item table, as the one
        all parts share and this part's changes to it."""
        assert self._pending is not None
        elsewhere, elsewhere_raw, _ = results.files(others)
        files, raw_bytes, linked = results.files(ranks)
        storage_md, patch = tables or (results.storage(tuple(ranks), tuple(others)), {})

        def make() -> Metadata:
            md = dataclasses.replace(
                metadata,
                state_dict_metadata=dict(metadata.state_dict_metadata),
                planner_data=dict(metadata.planner_data)
                if isinstance(metadata.planner_data, dict)
                else metadata.planner_data,
                storage_data=dict(storage_md),
            )
            packs_mod.expand(md, self._packs)
            return md

        if self._md_cache is None:
            md = make()
            md.storage_data.update(patch)
            pp = md_format.PartPickle(None, md_format.dumps(md), None, b"", b"")
            md_digest = digest(pp.body)
        else:
            key = (  # every field of the metadata but storage_meta; the item table
                tuple(
                    getattr(metadata, f.name)
                    for f in dataclasses.fields(metadata)
                    if f.name not in ("storage_data", "storage_meta")
                ),
                storage_md,
                self._packs,
                tuple(ranks) if tables is None else None,
            )
            if tables is None:
                pp = self._md_cache.dumps_split(disk, key, make, metadata.storage_meta)
            else:
                pp = self._md_cache.dumps_part(key, make, metadata.storage_meta, disk, patch)
            md_digest = self._md_cache.digest_part(disk, pp)
        md_name = self._pending.stored_name(METADATA_FILE)
        size = len(pp.body) + len(pp.head) + len(pp.tail)
        if disk is None or disk == self._disks[0]:  # other disks' committers write theirs
            self._pending.write_file(md_name, pp.body + pp.head + pp.tail)
        files[md_name] = FileEntry("file", size, md_digest)
        part = None if disk is None else Part(disk, self._disks[0], elsewhere, elsewhere_raw)
        manifest = self._spec.manifest(files, raw_bytes, self._world_size or 1, part, linked)
        if disk is None or disk == self._disks[0]:
            self.manifest = manifest
        return PartFiles(
            pp.ident,
            pp.body,
            pp.tail,
            manifest.to_json(self._spec.manifest_key),
            pp.head,
            pp.shared,
        )

    def commit_coordinator_part(self) -> None:
        """Node-local disks: commit rank 0's part, the last one (coordinator)."""
        assert self._pending is not None, "finish() before prepare_global_plan()"
        self._pending.commit(self.parts[self._disks[0]].manifest)
        self._committed = True

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False  # never picked automatically from a path; ckptstore passes it in

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self._name, save_id=self._save_id)

    # ---- ours -----------------------------------------------------------------------
    def abort(self) -> None:
        """After a failed save: remove what the coordinator's pending checkpoint wrote
        (and this rank's part on a node-local disk)."""
        if self._pending is not None and not self._committed:
            self._pending.abort()
        self.release_part(abort=True)

    def release_part(self, *, abort: bool = False) -> None:
        """Let go of this rank's part (node-local disks); ``abort``: remove it too."""
        part, self.part = self.part, None
        if part is not None and abort:
            part.abort()
        elif part is not None:
            part.release()
