"""One error for every rank when a restore could not load a step on some of them.

Ranks fail to load a step in their own ways: one finds its node-local disk's part
damaged, another finds nothing, a third reads fine and hears of the failure from DCP
(another rank's error) or from the agreement before the load. Restore decides per error
whether to skip the step and whether to move it aside as damaged, so the ranks must
decide alike: :func:`agreed_error` gathers every rank's error and gives each the same
kind.
"""

from __future__ import annotations

from typing import Any

from ckptstore.engine import groups
from ckptstore.errors import (
    CheckpointNotFoundError,
    CkptStoreError,
    CorruptCheckpointError,
    PartElsewhereError,
    RankFailedError,
)


def agreed_error(step: int, problem: Exception | None, group: Any) -> Exception:
    """What every rank raises when some could not load ``step`` (``problem``: this
    rank's error, None: it could), the same kind on all: damaged where any rank found
    damage, else not found where any rank found nothing, else another rank's failure.
    A rank whose own error is of that kind raises it. (Each rank's own error differed:
    which disks restore then moved the step aside on did too, and a rank that raised
    alone left the others waiting in the next collective.)"""
    sent: Exception | None = problem
    if problem is not None and not groups.pickles(problem):  # sent to every rank: its text
        sent = CkptStoreError(f"{type(problem).__name__}: {problem}")
    told = groups.all_gather(sent, group)
    failed = [(r, t) for r, t in enumerate(told) if t is not None]
    chosen = [f for f in failed if _kind(f[1]) == min(_kind(t) for _, t in failed)]
    rank, why = chosen[0]
    if problem is not None and _kind(problem) == _kind(why):
        return problem
    cls: type[CkptStoreError] = RankFailedError
    if isinstance(why, CorruptCheckpointError):
        cls = CorruptCheckpointError
    elif isinstance(why, CheckpointNotFoundError):
        cls = PartElsewhereError if isinstance(why, PartElsewhereError) else CheckpointNotFoundError
    return cls(f"step {step}: rank {rank} could not load it: {why}")


def _kind(exc: BaseException) -> int:
    """0: damaged; 1: not found; 2: anything else."""
    if isinstance(exc, CorruptCheckpointError):
        return 0
    return 1 if isinstance(exc, CheckpointNotFoundError) else 2
