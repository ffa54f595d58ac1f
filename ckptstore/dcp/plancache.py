"""Plans reused while the state's layout holds: after the first save of a layout, a
save costs the coordinator a check per rank, not work per tensor (issue 17).

DCP plans every save from scratch: each rank sends its plan (an item per tensor shard),
the coordinator deduplicates and validates them all, builds ``.metadata`` and sends
every rank its final plan back; every rank then sends a result per item, and the whole
metadata is broadcast to all at the end. At 1,000 ranks that is minutes of serial work
on rank 0 per save. Here, once a save with a layout has gone through on every rank:

- a rank whose local plan is the one it sent then (items, packs, disk, what it
  skipped) sends :class:`Steady` instead: the name it saves and the plan's generation;
- when every rank does, the coordinator reuses that save's global plan and metadata,
  and sends each rank only its storage plan (the pending checkpoint's token) with
  ``cached=True``: the rank takes its final plan from its own cache;
- each rank then sends :class:`Written` (its shard file's name, size and checksum)
  instead of a result per item; where the file names are the last save's (local
  disks; object stores name files per attempt), the item table is reused as well;
- nothing is broadcast at the end but the outcome (see :mod:`ckptstore.dcp.driver`).

The cache advances only when DCP's steps went through on every rank (DCP agrees on
that: its last step broadcasts the outcome; a node-local commit that fails after it
fails on every rank alike, and leaves the plans valid), and any failed save empties it
on every rank (a rank that could not stage enters the save to fail it, with its own
cache), so the ranks' caches stay in step; a rank whose cache disagrees with the
coordinator's (a generation neither knows) fails that save, which empties all of them.
One :class:`PlanCache` per Checkpointer: two checkpointers never share plans.

Object stores name each attempt's files anew, so there the item table is renamed each
save (O(items) on the coordinator, and ``.metadata`` pickled again); the plans are
still reused. Rank 0 keeps every rank's local plan of the last save between saves (a
rank whose layout changes sends its whole plan, and the others' are needed to plan
again), as DCP's own ``enable_plan_caching`` does.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.storage import WriteResult

from ckptstore.dcp.metadata import StoredItem
from ckptstore.errors import CkptStoreError
from ckptstore.format.manifest import FileEntry


@dataclass(frozen=True)
class Steady:
    """A rank's local plan, when it is the one of generation ``gen``."""

    name: str  # the checkpoint this rank believes it is saving
    gen: str


# A rank's shard file and its facts (size_bytes, xxh3_64, raw_bytes); None: it wrote nothing
Fact = tuple[str, dict[str, Any]] | None


@dataclass(frozen=True)
class Written:
    """A rank's write results, when its items are those of the cached final plan."""

    fact: Fact


class PlanCache:
    """The plans of the last save that went through, on one rank (module doc)."""

    def __init__(self) -> None:
        self.gen: str | None = None
        self.local: SavePlan | None = None  # this rank's full local plan
        self.final: SavePlan | None = None  # this rank's final plan
        # the coordinator's
        self.all_plans: list[SavePlan] | None = None  # every rank's full local plan
        self.metadata: Metadata | None = None
        # each part's item table, and the file names it holds: (ranks, others) -> ...
        self.storage: dict[Any, tuple[tuple[str | None, ...], dict[Any, Any]]] = {}
        self._next: dict[str, Any] = {}  # this save's, kept if it goes through
        self.itemized = False  # every rank sends its results item by item (incremental)
        self.saves = 0  # saves that went through (for tests and benchmarks)
        self.reused = 0  # of those, planned from this cache

    # ---- every rank -----------------------------------------------------------------
    def local_plan(self, plan: SavePlan) -> SavePlan:
        """What this rank sends for ``plan`` (a writer's local plan): ``Steady`` if it
        is the cached one but for the checkpoint's name."""
        self._next = {"local": plan}
        last = self.local
        if (
            self.gen is None
            or last is None
            or plan.items != last.items
            or plan.planner_data != last.planner_data
            or dataclasses.replace(plan.storage_data, name="") != last.storage_data
        ):
            return plan
        return SavePlan([], storage_data=Steady(plan.storage_data.name, self.gen))

    def final_plan(self, central: SavePlan) -> SavePlan:
        """This rank's final plan, given what the coordinator sent it."""
        storage = central.storage_data
        if getattr(storage, "cached", False):
            if self.final is None or storage.gen != self.gen:
                raise CkptStoreError(_OUT_OF_STEP)
            final = dataclasses.replace(self.final, storage_data=storage)
        else:
            final = central
        self._next.update(gen=storage.gen, final=final)
        return final

    def written(self, central: SavePlan, results: list[WriteResult]) -> Any:
        """What this rank sends for ``results``: ``Written`` if its plan was cached
        (unless ``itemized``: incremental saves move items between files each save)."""
        if self.itemized or not getattr(central.storage_data, "cached", False):
            return results
        return Written(_fact(results))

    def commit(self) -> None:
        """The save went through on every rank: it is the one to compare with next."""
        nxt, self._next = self._next, {}
        if "final" not in nxt:
            return
        reused = nxt["gen"] == self.gen
        self.gen, self.final = nxt["gen"], nxt["final"]
        self.local = dataclasses.replace(
            nxt["local"], storage_data=dataclasses.replace(nxt["local"].storage_data, name="")
        )
        if "metadata" in nxt:  # the coordinator
            self.all_plans = nxt["all_plans"]
            self.metadata = nxt["metadata"]
            self.storage = nxt["storage"]
        self.saves += 1
        self.reused += reused

    def drop(self) -> None:
        """The save failed (on any rank): plan the next one from scratch."""
        saves, reused, itemized = self.saves, self.reused, self.itemized
        self.__init__()  # type: ignore[misc]
        self.saves, self.reused, self.itemized = saves, reused, itemized

    # ---- the coordinator ------------------------------------------------------------
    def expand(self, plans: list[SavePlan]) -> tuple[list[SavePlan], bool]:
        """Every rank's full local plan, and whether all of them were the cached ones."""
        steady = [isinstance(p.storage_data, Steady) for p in plans]
        if not any(steady):
            return plans, False
        cached = self.all_plans
        if cached is None or len(cached) != len(plans):
            raise CkptStoreError(_OUT_OF_STEP)
        full = []
        for plan, old in zip(plans, cached, strict=True):
            if isinstance(plan.storage_data, Steady):
                if plan.storage_data.gen != self.gen:
                    raise CkptStoreError(_OUT_OF_STEP)
                name = plan.storage_data.name
                plan = dataclasses.replace(
                    old, storage_data=dataclasses.replace(old.storage_data, name=name)
                )
            full.append(plan)
        return full, all(steady)

    def cached_global_plan(self, plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        """The global plan of a save whose plans (``plans``: expanded) are all the
        cached ones: no items (each rank keeps its final plan), each rank's storage data
        (DCP's global plan keeps the local plans'), and the cached metadata."""
        assert self.metadata is not None
        return [SavePlan([], storage_data=p.storage_data) for p in plans], self.metadata

    def new_gen(self, steady: bool) -> str:
        return self.gen if steady and self.gen is not None else uuid.uuid4().hex

    def note_global(self, all_plans: list[SavePlan], metadata: Metadata) -> None:
        self._next.update(all_plans=all_plans, metadata=metadata)

    def outcome(self, gathered: list[Any]) -> Outcome:
        """Every rank's results, as the writer's ``finish`` reads them."""
        if not any(isinstance(g, Written) for g in gathered):
            memo: dict[Any, tuple[tuple[str | None, ...], dict[Any, Any]]] = {}
            self._next["storage"] = memo
            return Outcome([_fact(r) for r in gathered], gathered, memo)
        facts: list[Fact] = [w.fact for w in gathered]
        self._next["storage"] = self.storage
        return Outcome(facts, None, self.storage)


class Outcome:
    """Where every rank wrote its items: per-rank file facts (cheap), and the item
    tables of the checkpoint's parts (built once per layout and set of file names)."""

    def __init__(
        self,
        facts: list[Fact],
        results: list[list[WriteResult]] | None,
        memo: dict[Any, tuple[tuple[str | None, ...], dict[Any, Any]]],
    ) -> None:
        self.facts = facts
        self._results = results  # None: the items are the cached save's (PlanCache)
        self._memo = memo

    @classmethod
    def of(cls, results: list[list[WriteResult]]) -> Outcome:
        return cls([_fact(r) for r in results], results, {})

    def storage(self, ranks: tuple[int, ...], others: tuple[int, ...]) -> dict[Any, Any]:
        """The item table of the part written by ``ranks``: their items, and those of
        ``others`` (on other disks) that only others hold."""
        files = tuple(None if f is None else f[0] for f in self.facts)
        last = self._memo.get((ranks, others))
        if last is not None and last[0] == files:
            return last[1]
        table: dict[Any, Any] = {}
        if self._results is not None:
            for rank in (*others, *ranks):  # what both wrote: this part's copy
                for wr in self._results[rank]:
                    storage = {k: v for k, v in wr.storage_data.items() if k != "shard"}
                    table[wr.index] = StoredItem(storage)
        elif last is not None:  # the same items, in files named anew (object stores)
            renamed = {old: new for old, new in zip(last[0], files, strict=True) if old}
            table = _renamed(last[1], renamed)
        else:
            raise CkptStoreError(_OUT_OF_STEP)
        self._memo[(ranks, others)] = (files, table)
        return table

    def files(self, ranks: Any) -> tuple[dict[str, FileEntry], int, dict[str, str]]:
        """The shard files ``ranks`` wrote or linked, their raw bytes, and the linked
        files' first writers (dcp.incremental)."""
        files: dict[str, FileEntry] = {}
        linked: dict[str, str] = {}
        raw_bytes = 0
        for rank in ranks:
            fact = self.facts[rank]
            if fact is not None:
                name, shard = fact
                files[shard.get("name", name)] = FileEntry(
                    "shard", shard["size_bytes"], shard["xxh3_64"]
                )
                raw_bytes += shard["raw_bytes"]
                for link, entry in shard.get("links", {}).items():
                    files[link] = FileEntry("shard", entry["size_bytes"], entry["xxh3_64"])
                    linked[link] = entry["from"]
        return files, raw_bytes, linked

    def part_tables(
        self,
        parts: tuple[tuple[int, ...], ...],
        expand: Callable[[dict[Any, Any]], dict[Any, Any]] | None = None,
    ) -> tuple[dict[Any, Any], list[Any]]:
        """The item tables of node-local parts (``parts[p]``: the ranks whose part
        ``p`` is), as one table and each part's changes to it. An item that ranks of
        several parts wrote (replicated state) points, in each part, at that part's
        own copy (its last writer's), and in the common table at its last writer's;
        every other item at the one rank that wrote it. So the parts share one
        ``.metadata`` body and differ in a few entries (dcp.metadata.MetadataCache).
        ``expand``: applied to each part's changes (packs), and kept with them."""
        files = tuple(None if f is None else f[0] for f in self.facts)
        last = self._memo.get(("parts", parts))
        if last is not None and last[0] == files:
            return last[1]  # type: ignore[return-value]
        part_of = {r: p for p, ranks in enumerate(parts) for r in ranks}
        common: dict[Any, Any] = {}
        changes: list[dict[Any, Any]] = [{} for _ in parts]
        if self._results is not None:
            writer: dict[Any, int] = {}
            copies: dict[Any, dict[int, Any]] = {}  # replicated item -> part -> its copy
            for rank, results in enumerate(self._results):  # the last writer wins
                for wr in results:
                    stored = StoredItem({k: v for k, v in wr.storage_data.items() if k != "shard"})
                    before = writer.get(wr.index)
                    if before is not None:
                        mine = copies.setdefault(wr.index, {part_of[before]: common[wr.index]})
                        mine[part_of[rank]] = stored
                    writer[wr.index] = rank
                    common[wr.index] = stored
            for index, mine in copies.items():
                last_part = part_of[writer[index]]
                for p, stored in mine.items():
                    if p != last_part:
                        changes[p][index] = stored
            if expand is not None:
                changes = [expand(c) if c else c for c in changes]
        elif last is not None:  # the same items, in files named anew (object stores)
            renamed = {old: new for old, new in zip(last[0], files, strict=True) if old}
            old_common, old_changes = last[1]  # type: ignore[misc]
            common = _renamed(old_common, renamed)
            changes = [_renamed(c, renamed) for c in old_changes]
        else:
            raise CkptStoreError(_OUT_OF_STEP)
        self._memo[("parts", parts)] = (files, (common, changes))  # type: ignore[assignment]
        return common, changes


def _renamed(table: dict[Any, Any], renamed: dict[Any, Any]) -> dict[Any, Any]:
    return {i: StoredItem(s, file=renamed[s["file"]]) for i, s in table.items()}


def _fact(results: list[WriteResult]) -> Fact:
    if not results:
        return None
    first = results[0].storage_data
    return first["shard"].get("name", first["file"]), first["shard"]


_OUT_OF_STEP = (
    "this rank's plan cache is out of step with the coordinator's (a rank restarted "
    "alone, or missed a save); this save fails, and the next one plans from scratch"
)
