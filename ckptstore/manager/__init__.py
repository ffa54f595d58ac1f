"""A run's checkpoints: when to save, what to keep, restore, replicate (the :class:`CheckpointManager`)."""

from ckptstore.manager.manager import CheckpointManager, ManagedCheckpoint

__all__ = ["CheckpointManager", "ManagedCheckpoint"]
