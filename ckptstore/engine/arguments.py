"""The checks of what a caller passes to a save (its step, metadata, epoch, reason and
metrics): each returns the value as stored, or raises a
:class:`~ckptstore.errors.InvalidArgumentError` that says what was wrong in the
caller's terms.
"""

from __future__ import annotations

import json
import math
import operator
import reprlib
from collections.abc import Mapping
from typing import Any

from ckptstore.errors import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    UnsupportedStateError,
)
from ckptstore.layout import MAX_STEP


def check_step(step: int) -> int:
    """``step`` if it is a valid step (an int in 0..MAX_STEP, not a bool), else
    :class:`~ckptstore.errors.InvalidArgumentError` (its ``TypeError`` leaf for a
    string, float or tensor)."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidArgumentTypeError(f"step must be a non-negative int, got {bad_step(step)}")
    if not 0 <= step <= MAX_STEP:
        raise InvalidArgumentError(f"step must be an int in 0..{MAX_STEP}, got {step!r}")
    return step


def bad_step(step: object) -> str:
    """A step that is not one, said short (a state dict's repr can be megabytes), with
    the likely cause: arguments passed in the other order (a mapping, a module), or an
    integer of NumPy's or a tensor's (``int(step)``)."""
    name = type(step).__name__
    if isinstance(step, Mapping) or callable(getattr(step, "state_dict", None)):
        what = f"with keys {reprlib.repr(list(step))}" if isinstance(step, Mapping) else ""
        return (
            f"{name} {what}".rstrip() + " (a state? Checkpointer.save takes (state_dict, "
            "step), CheckpointManager.save takes (step, state))"
        )
    if not isinstance(step, (bool, int)) and _integral(step):
        return f"{name} {reprlib.repr(step)} (pass int(step))"
    return f"{name} {reprlib.repr(step)}"


def _integral(value: object) -> bool:
    """Whether ``value`` is an integer of another type (NumPy's, a 0-d integer tensor)."""
    try:
        operator.index(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


def check_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise UnsupportedStateError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        return dict(json.loads(json.dumps(metadata, allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise UnsupportedStateError(
            f"metadata must be JSON (numbers, strings, lists, dicts; no NaN): {exc}"
        ) from None


def check_info(
    epoch: int | None, reason: str | None, metrics: dict[str, float] | None
) -> dict[str, Any]:
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        raise InvalidArgumentError(f"epoch must be a non-negative int, got {epoch!r}")
    if reason is not None and not isinstance(reason, str):
        raise InvalidArgumentError(f"reason must be a string, got {reason!r}")
    clean: dict[str, float | None] = {}
    for k, v in (metrics or {}).items():
        if not isinstance(k, str):
            raise InvalidArgumentError(f"metric names must be strings, got {k!r}")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"metric {k!r} must be a number, got {v!r}") from None
        clean[k] = f if math.isfinite(f) else None  # a NaN loss is recorded as null
    return {"epoch": epoch, "reason": reason, "metrics": clean}
