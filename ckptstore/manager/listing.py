"""What ``CheckpointManager.list()`` shows of each committed checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ckptstore.engine.listing import CheckpointInfo
from ckptstore.manager.policies import FINAL, CheckpointRecord


@dataclass(frozen=True)
class ManagedCheckpoint:
    """One committed checkpoint, as ``CheckpointManager.list()`` shows it."""

    step: int
    epoch: int | None
    reason: str | None  # why it was written (manifest)
    created_unix_s: float
    stored_bytes: int
    raw_bytes: int
    metrics: dict[str, float | None]
    tags: frozenset[str]  # "latest", "best", "final" (ended a completed run), "kept" (forever)
    url: str

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0


def describe(
    infos: Sequence[CheckpointInfo],
    records: Sequence[CheckpointRecord],
    *,
    latest: str | None,
    best: CheckpointRecord | None,
    kept: frozenset[int],
) -> list[ManagedCheckpoint]:
    """One :class:`ManagedCheckpoint` per checkpoint, tagged ``latest``, ``best``,
    ``final`` (ended a completed run) and ``kept`` (by a keep-forever policy)."""
    out = []
    for info, rec in zip(infos, records, strict=True):
        tags = set()
        if info.name == latest:
            tags.add("latest")
        if best is not None and rec.step == best.step:
            tags.add("best")
        if rec.reason == FINAL:
            tags.add("final")
        if rec.step in kept:
            tags.add("kept")
        m = info.manifest
        out.append(
            ManagedCheckpoint(
                step=rec.step,
                epoch=m.epoch,
                reason=m.reason,
                created_unix_s=m.created_unix_s,
                stored_bytes=m.stored_bytes,
                raw_bytes=m.raw_bytes,
                metrics=dict(m.metrics),
                tags=frozenset(tags),
                url=info.url,
            )
        )
    return out
