"""What a run shows by default: one line per save and "resumed from", on stderr.

Libraries should not configure logging, and ckptstore does not when the application
has: once the root logger has a handler (``logging.basicConfig``, a framework's setup,
pytest), ckptstore's records go there under the application's levels, and this handler
stays silent. Until then, as tqdm and Lightning do, ckptstore's INFO lines go to stderr.
Silence them with ``logging.getLogger("ckptstore").setLevel(logging.WARNING)`` or the
environment variable ``CKPTSTORE_QUIET=1``.
"""

from __future__ import annotations

import logging
import os
import sys

_LOGGER = "ckptstore"


class _UntilConfigured(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, for as long as the application has not configured logging itself."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def show_progress_by_default() -> None:
    """Called when a CheckpointManager starts; does nothing the second time, with
    ``CKPTSTORE_QUIET`` set, when the application configured logging, or when it set
    the ``ckptstore`` logger's level."""
    logger = logging.getLogger(_LOGGER)
    if os.environ.get("CKPTSTORE_QUIET", "") not in ("", "0"):
        return
    if any(isinstance(h, _UntilConfigured) for h in logger.handlers):
        return
    if logging.getLogger().handlers or logger.level != logging.NOTSET:
        return
    handler = _UntilConfigured(sys.stderr)
    handler.setFormatter(logging.Formatter("ckptstore: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
