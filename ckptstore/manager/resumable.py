"""What the manager needs of a training state it keeps up to date and restores whole.

:class:`~ckptstore.TrainState` is the one ckptstore ships (``ckptstore.integrations``);
anything with these members works. A plain ``dict`` of tensors and ``Stateful`` objects
works too, without the counters, boundary snapshots and flexible parts.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeGuard, runtime_checkable

from torch.distributed.checkpoint.metadata import Metadata


@runtime_checkable
class Resumable(Protocol):
    """A run's state: saved with :meth:`state_dict`, restored with :meth:`load_target`
    then :meth:`load_state_dict`; ``step``, ``epoch`` and ``best`` are kept up to date by
    the manager."""

    step: int
    epoch: int
    best: dict[str, float]

    def state_dict(self) -> dict[str, Any]:
        """The state to save."""
        ...

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Apply a loaded state (the target :meth:`load_target` made, filled)."""
        ...

    def load_target(self, metadata: Metadata) -> dict[str, Any]:
        """What to load a checkpoint with this DCP metadata into."""
        ...

    def boundary(self) -> dict[str, Any]:
        """The small parts of the state at the end of a step (see TrainState.boundary)."""
        ...

    def optimizer_steps(self) -> int:
        """How many optimizer steps have run (to tell whether the model moved past a boundary)."""
        ...


def track_best(
    state: Resumable, metrics: dict[str, float] | None, metric: str | None, mode: str
) -> None:
    """Record ``metrics[metric]`` in ``state.best`` if it beats the value there
    (``mode``: "min" or "max"); a NaN never does."""
    if not metrics or metric is None or metric not in metrics:
        return
    value = float(metrics[metric])
    old = state.best.get(metric)
    better = old is None or (value < old if mode == "min" else value > old)
    if better and value == value:  # not NaN
        state.best[metric] = value


def copy_guard(state: Any, overlap: bool) -> Any:
    """A guard for copying ``state``'s tensors in the background while the loop goes on
    (``state.staging_guard()``, which TrainState has: see integrations/overlap.py), or
    None: then the save copies before returning."""
    make = getattr(state, "staging_guard", None) if overlap else None
    return make() if callable(make) else None


class ResumableCheck:
    """``isinstance(state, Resumable)``, asked once per state object: a runtime protocol
    check costs ~0.1 ms (it looks up each member), and a training loop passes the same
    object at every step."""

    def __init__(self) -> None:
        self._last: tuple[object, bool] | None = None

    def __call__(self, state: object) -> TypeGuard[Resumable]:
        if self._last is None or self._last[0] is not state:
            self._last = (state, isinstance(state, Resumable))
        return self._last[1]
