"""The ``ckptstore`` command line: ``ckptstore ls|info|verify|export|import|prune|sync|pull|gc|train|bench``."""

from ckptstore.cli.main import main

__all__ = ["main"]
