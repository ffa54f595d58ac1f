"""The two DCP entry points ckptstore drives, and the translation of DCP's failures.

We call ``_save_state_dict`` / ``_load_state_dict`` (what ``dcp.save`` / ``dcp.load``
wrap) rather than the public functions because the public ones warn on every call
without a process group (our single-process mode) and would pick a storage layer from
``checkpoint_id``; everything else (planning, collectives, dedup, resharding) is the
same code. Their signatures have been stable since torch 2.2; keyword arguments only.

DCP reports failures as ``CheckpointException``, a ``BaseException`` (``except
Exception`` misses it) holding one wrapped exception per failed rank. We re-raise the
failure itself, which is typed (our errors, or DCP's own ValueError/RuntimeError for
bad state), noting the other ranks that failed.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict_saver import _save_state_dict
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

from ckptstore.errors import CkptStoreError


def save(
    state_dict: dict[str, Any],
    writer: StorageWriter,
    planner: SavePlanner,
    process_group: dist.ProcessGroup | None,
) -> None:
    try:
        _save_state_dict(
            state_dict=state_dict,
            storage_writer=writer,
            process_group=process_group,
            no_dist=process_group is None,
            planner=planner,
        )
    except CheckpointException as exc:
        raise _unwrap(exc, "save", process_group) from None


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
