"""A run's checkpoints: when to save, what to keep, restore, replicate (the :class:`CheckpointManager`)."""

from ckptstore.manager.listing import ManagedCheckpoint
from ckptstore.manager.manager import CheckpointManager

__all__ = ["CheckpointManager", "ManagedCheckpoint"]
