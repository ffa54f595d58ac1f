"""The two DCP entry points ckptstore drives, and the translation of DCP's failures.

Loads call ``_load_state_dict`` (what ``dcp.load`` wraps) rather than the public
function, which warns on every call without a process group (our single-process mode)
and would pick a storage layer from ``checkpoint_id``; everything else (planning,
collectives, resharding) is the same code; its signature has been stable since torch
2.2, keyword arguments only. Saves run DCP's steps here (:func:`save`), through DCP's
own ``_DistWrapper``, so that plans can be reused while the state's layout holds.

DCP reports failures as ``CheckpointException``, a ``BaseException`` (``except
Exception`` misses it) holding one wrapped exception per failed rank. We re-raise the
failure itself, which is typed (our errors, or DCP's own ValueError/RuntimeError for
bad state), noting the other ranks that failed.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlan, SavePlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.storage import StorageReader
from torch.distributed.checkpoint.utils import _DistWrapper

from ckptstore.dcp.plancache import PlanCache
from ckptstore.dcp.writer import CkptStorageWriter
from ckptstore.errors import CkptStoreError


def save(
    state_dict: dict[str, Any],
    writer: CkptStorageWriter,
    planner: SavePlanner,
    process_group: dist.ProcessGroup | None,
    plans: PlanCache | None = None,
) -> None:
    """DCP's save (``_save_state_dict``: the same steps, collectives and planner calls),
    with two changes: plans are reused while the layout holds (``plans``: see
    :mod:`ckptstore.dcp.plancache`), and the last step broadcasts only the outcome,
    not the whole metadata (DCP returns it; ckptstore does not use it)."""
    dist_w = _DistWrapper(process_group, process_group is not None, 0)
    cache = plans if plans is not None else PlanCache()
    metadata: Metadata | None = None

    def local_step() -> SavePlan:
        planner.set_up_planner(
            state_dict=state_dict,
            storage_meta=writer.storage_meta(),
            is_coordinator=dist_w.is_coordinator,
        )
        writer.set_up_storage_writer(dist_w.is_coordinator, rank=dist_w.rank)
        return cache.local_plan(writer.prepare_local_plan(planner.create_local_plan()))

    def global_step(sent: list[SavePlan]) -> list[SavePlan]:
        nonlocal metadata
        full, steady = cache.expand(sent)
        if steady:
            global_plan, metadata = cache.cached_global_plan(full)
        else:
            global_plan, metadata = planner.create_global_plan(full)
        cache.note_global(full, metadata)
        return writer.prepare_global_plan(global_plan, gen=cache.new_gen(steady), steady=steady)

    def write_step() -> Any:
        final = planner.finish_plan(cache.final_plan(central))
        results = writer.write_data(final, planner)
        results.wait()
        return cache.written(central, results.value())

    def finish_step(gathered: list[Any]) -> None:
        assert metadata is not None
        writer.finish_outcome(metadata, cache.outcome(gathered))

    try:
        central: SavePlan = dist_w.reduce_scatter("plan", local_step, global_step)
        dist_w.all_reduce("write", write_step, finish_step)
    except BaseException as exc:
        cache.drop()  # on every rank: DCP's steps fail on all of them together
        if isinstance(exc, CheckpointException):
            raise _unwrap(exc, "save", process_group) from None
        raise
    cache.commit()


def load(
    state_dict: dict[str, Any],
    reader: StorageReader,
    planner: LoadPlanner,
    process_group: dist.ProcessGroup | None,
) -> None:
    try:
        _load_state_dict(
            state_dict=state_dict,
            storage_reader=reader,
            process_group=process_group,
            no_dist=process_group is None,
            planner=planner,
        )
    except CheckpointException as exc:
        raise _unwrap(exc, "load", process_group) from None


def _unwrap(exc: CheckpointException, action: str, pg: dist.ProcessGroup | None) -> Exception:
    failures = exc.failures
    rank = dist.get_rank(pg) if pg is not None else 0
    picked_rank = rank if rank in failures else min(failures)
    picked = failures[picked_rank]
    err = picked[0] if isinstance(picked, tuple) else picked
    if not isinstance(err, Exception):
        # A BaseException from a rank (KeyboardInterrupt, SystemExit): keep DCP's.
        return CkptStoreError(f"{action} failed on rank {picked_rank}: {err!r}")
    others = sorted(r for r in failures if r != picked_rank)
    where = f"rank {picked_rank}" + (f" (also failed on ranks {others})" if others else "")
    note = f"ckptstore: {action} failed on {where}"
    if hasattr(err, "add_note"):  # Python >= 3.11
        err.add_note(note)
    return err
