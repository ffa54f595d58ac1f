"""When to save and what to keep: frozen dataclasses, pure functions of what they are shown.

No policy does I/O or keeps state: the manager shows a save policy a :class:`SaveContext`
after every step, and a retention policy the :class:`CheckpointRecord` of every committed
checkpoint (read from their manifests, so decisions survive a restart). Combine policies
with :class:`AnyOf`::

    save = AnyOf(SaveEvery(steps=500), SaveEvery(seconds=3600), SaveEvery(epochs=1))
    keep = AnyOf(KeepLast(3), KeepEvery(epochs=1), KeepBest(1, metric="val_loss", mode="min"))

Steps are counted as steps *done*: ``SaveEvery(steps=500)`` saves after 500, 1000, ...
completed steps, and that checkpoint is ``step_00000500``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ckptstore.errors import InvalidArgumentError, InvalidArgumentTypeError

# Reasons a checkpoint was written, as recorded in its manifest.
INTERVAL, EPOCH, FINAL, SIGNAL, ERROR, MANUAL = (
    "interval",
    "epoch",
    "final",
    "signal",
    "error",
    "manual",
)
REASONS = (INTERVAL, EPOCH, FINAL, SIGNAL, ERROR, MANUAL)


@dataclass(frozen=True)
class SaveContext:
    """What a save policy sees after a training step."""

    steps_done: int  # steps completed so far (the checkpoint's step if saved now)
    epoch: int | None  # 0-based epoch of the step just done
    end_of_epoch: bool  # that step ended its epoch
    elapsed_s: float  # seconds since the last save (or since the manager started)
    last_saved_step: int | None  # steps_done of the last save, if any


@runtime_checkable
class SavePolicy(Protocol):
    def should_save(self, ctx: SaveContext) -> str | None:
        """The reason to save now (``"interval"``, ``"epoch"``), or None."""


@dataclass(frozen=True)
class CheckpointRecord:
    """What a retention policy sees of one committed checkpoint."""

    step: int
    epoch: int | None = None
    reason: str | None = None
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    created_unix_s: float = 0.0


@runtime_checkable
class RetentionPolicy(Protocol):
    def keep(self, records: Sequence[CheckpointRecord]) -> frozenset[int]:
        """The steps to keep; every other one may be deleted (the manager adds guards)."""


def _positive(name: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not value > 0):
        raise InvalidArgumentError(f"{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class SaveEvery:
    """Save every ``steps`` steps, every ``seconds`` of wall time, or at the end of every
    ``epochs``-th epoch. Give exactly one."""

    steps: int | None = None
    seconds: float | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("steps", "seconds", "epochs") if getattr(self, n) is not None]
        if len(given) != 1:
            raise InvalidArgumentError(
                "SaveEvery takes exactly one of steps=, seconds=, epochs= "
                "(combine several with AnyOf(SaveEvery(steps=...), SaveEvery(seconds=...)))"
            )
        for n in given:
            _positive(n, getattr(self, n))
        if self.steps is not None and not isinstance(self.steps, int):
            raise InvalidArgumentError(f"steps must be an int, got {self.steps!r}")
        if self.epochs is not None and not isinstance(self.epochs, int):
            raise InvalidArgumentError(f"epochs must be an int, got {self.epochs!r}")

    def should_save(self, ctx: SaveContext) -> str | None:
        if self.steps is not None:
            return INTERVAL if ctx.steps_done % self.steps == 0 else None
        if self.seconds is not None:
            return INTERVAL if ctx.elapsed_s >= self.seconds else None
        assert self.epochs is not None
        if ctx.end_of_epoch and ctx.epoch is not None and (ctx.epoch + 1) % self.epochs == 0:
            return EPOCH
        return None


@dataclass(frozen=True)
class SaveAt:
    """Save when these many steps are done (``SaveAt(steps=(100, 1000))``)."""

    steps: frozenset[int]

    def __init__(self, steps: Sequence[int] | frozenset[int]) -> None:
        values = frozenset(steps)
        if not values or not all(isinstance(s, int) and s > 0 for s in values):
            raise InvalidArgumentError(f"SaveAt needs positive step counts, got {steps!r}")
        object.__setattr__(self, "steps", values)

    def should_save(self, ctx: SaveContext) -> str | None:
        return INTERVAL if ctx.steps_done in self.steps else None


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``n`` newest checkpoints."""

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise InvalidArgumentError(f"KeepLast needs n >= 1, got {self.n!r}")

    def keep(self, records: Sequence[CheckpointRecord]) -> frozenset[int]:
        return frozenset(sorted(r.step for r in records)[-self.n :])


@dataclass(frozen=True)
class KeepEvery:
    """Keep, forever, every checkpoint whose step is a multiple of ``steps``, or the last
    checkpoint of every ``epochs``-th epoch. Give exactly one."""

    steps: int | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise InvalidArgumentError("KeepEvery takes exactly one of steps=, epochs=")
        _positive("steps", self.steps)
        _positive("epochs", self.epochs)

    def keep(self, records: Sequence[CheckpointRecord]) -> frozenset[int]:
        if self.steps is not None:
            return frozenset(r.step for r in records if r.step % self.steps == 0)
        assert self.epochs is not None
        last_of_epoch: dict[int, int] = {}
        for r in records:
            if r.epoch is not None and (r.epoch + 1) % self.epochs == 0:
                last_of_epoch[r.epoch] = max(r.step, last_of_epoch.get(r.epoch, -1))
        return frozenset(last_of_epoch.values())


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``k`` best checkpoints by ``metric`` (``mode`` "min" or "max").

    Checkpoints written on a signal or an error never count (they are not evaluated
    states), nor ones whose metric is missing or not finite.
    """

    k: int
    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InvalidArgumentError(f"KeepBest needs k >= 1, got {self.k!r}")
        if self.mode not in ("min", "max"):
            raise InvalidArgumentError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise InvalidArgumentError(f"metric must be a name, got {self.metric!r}")

    def ranked(self, records: Sequence[CheckpointRecord]) -> list[CheckpointRecord]:
        """Eligible records, best first (ties: newer first)."""
        eligible = [
            r
            for r in records
            if r.reason not in (SIGNAL, ERROR)
            and isinstance(r.metrics.get(self.metric), (int, float))
            and math.isfinite(float(r.metrics[self.metric]))  # type: ignore[arg-type]
        ]
        sign = 1.0 if self.mode == "min" else -1.0
        return sorted(eligible, key=lambda r: (sign * float(r.metrics[self.metric]), -r.step))  # type: ignore[arg-type]

    def keep(self, records: Sequence[CheckpointRecord]) -> frozenset[int]:
        return frozenset(r.step for r in self.ranked(records)[: self.k])


@dataclass(frozen=True)
class KeepFinal:
    """Keep every checkpoint written when a run completed (reason ``"final"``)."""

    def keep(self, records: Sequence[CheckpointRecord]) -> frozenset[int]:
        return frozenset(r.step for r in records if r.reason == FINAL)


@dataclass(frozen=True)
class AnyOf:
    """Save if any policy says so (the first one's reason); keep what any policy keeps."""

    policies: tuple[SavePolicy | RetentionPolicy, ...]

    def __init__(self, *policies: SavePolicy | RetentionPolicy) -> None:
        if not policies:
            raise InvalidArgumentError("AnyOf needs at least one policy")
        object.__setattr__(self, "policies", tuple(policies))

    def should_save(self, ctx: SaveContext) -> str | None:
        for p in self.policies:
            if not isinstance(p, SavePolicy):
                raise InvalidArgumentTypeError(f"{p!r} is not a save policy")
            reason = p.should_save(ctx)
            if reason is not None:
                return reason
        return None

    def keep(self, records: Sequence[CheckpointRecord]) -> frozenset[int]:
        kept: set[int] = set()
        for p in self.policies:
            if not isinstance(p, RetentionPolicy):
                raise InvalidArgumentTypeError(f"{p!r} is not a retention policy")
            kept |= p.keep(records)
        return frozenset(kept)


def find_policy(policy: object, cls: type) -> object | None:
    if isinstance(policy, cls):
        return policy
    if isinstance(policy, AnyOf):
        for p in policy.policies:
            found = find_policy(p, cls)
            if found is not None:
                return found
    return None


def forever_parts(policy: object) -> list[RetentionPolicy]:
    """The parts of a retention policy that keep checkpoints for good (not KeepLast)."""
    if isinstance(policy, (KeepEvery, KeepFinal, KeepBest)):
        return [policy]
    if isinstance(policy, AnyOf):
        out: list[RetentionPolicy] = []
        for p in policy.policies:
            out += forever_parts(p)
        return out
    return []


def split_by_agreement(
    policy: SavePolicy, one_rank: bool = False
) -> tuple[SavePolicy | None, SavePolicy | None]:
    """``policy`` as (the part every rank answers alike from the step and epoch alone,
    the rest). With several ranks the rest (``SaveEvery(seconds=)``, a policy of the
    user's own unless it sets ``same_on_every_rank = True``) is agreed between the ranks
    and acted on one step late; the first part at once. ``one_rank``: all of it at once."""
    if one_rank:
        return policy, None
    parts = list(policy.policies) if isinstance(policy, AnyOf) else [policy]
    alike = [p for p in parts if _alike(p)]
    others = [p for p in parts if not _alike(p)]

    def join(ps: list[Any]) -> SavePolicy | None:
        return None if not ps else ps[0] if len(ps) == 1 else AnyOf(*ps)

    return join(alike), join(others)


def _alike(policy: Any) -> bool:
    if isinstance(policy, SaveEvery):
        return policy.seconds is None
    if isinstance(policy, SaveAt):
        return True
    if isinstance(policy, AnyOf):
        return all(_alike(p) for p in policy.policies)
    return getattr(policy, "same_on_every_rank", False) is True
