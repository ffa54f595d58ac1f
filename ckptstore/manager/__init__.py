"""A run's checkpoints: when to save, what to keep, restore, replicate (the :class:`CheckpointManager`).

Its names are imported on first use (PEP 562): the manager needs torch, and the command
line imports :mod:`ckptstore.manager.policies` and its siblings without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckptstore.manager.listing import ManagedCheckpoint
    from ckptstore.manager.manager import CheckpointManager

_LAZY = {
    "CheckpointManager": "ckptstore.manager.manager",
    "ManagedCheckpoint": "ckptstore.manager.listing",
}

__all__ = ["CheckpointManager", "ManagedCheckpoint"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
