"""Saves still in flight when the interpreter exits are finished, not lost.

A script that ends right after ``save_async`` (or a Lightning script calling
``trainer.save_checkpoint`` after ``fit``) without closing what saves leaves the save to
a writer thread. At exit, concurrent.futures stops accepting work before it joins its
threads, so that save's first submit to the codec pool failed and the save was lost,
with an error line and exit status 0. :func:`track` registers an object whose
``_finish_at_exit()`` waits for its saves; they all run from one of threading's exit
hooks, which run newest first: registered here, after concurrent.futures registered
its own (imported first below), they run before it.
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  (its exit hook is registered first: runs last)
import logging
import threading
import weakref
from typing import Any

log = logging.getLogger("ckptstore")

_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def track(obj: Any) -> None:
    """Call ``obj._finish_at_exit()`` at interpreter exit if ``obj`` is still alive."""
    _LIVE.add(obj)


def _finish_all() -> None:
    for obj in list(_LIVE):
        try:
            obj._finish_at_exit()
        except Exception as exc:  # nothing to raise into any more: say it
            log.error("at exit: %s: %s", type(exc).__name__, exc)


threading._register_atexit(_finish_all)  # type: ignore[attr-defined]
