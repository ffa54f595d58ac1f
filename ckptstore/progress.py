"""Progress of long copies: bytes done of a total, on one line (``ckptstore sync``, ``pull``,
restores from a backup, the benchmarks)."""

from __future__ import annotations

import logging
import sys
import threading
import time

from ckptstore.units import format_bytes

log = logging.getLogger("ckptstore")


class Progress:
    """Bytes done of a total, printed at most every ``every_s`` (a ``\\r`` line on a tty)."""

    def __init__(self, what: str, total: int, *, every_s: float = 2.0, enabled: bool = True):
        self.what = what
        self.total = total
        self.done = 0
        self.payload = 0  # bytes the work moved in all (a copy: not what dst held)
        # seconds moving them took, where the work also waited (a node-local part's backup
        # waits for the other nodes' files); None: the work's whole time
        self.moving_s: float | None = None
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last = 0.0
        self._every_s = every_s
        self._enabled = enabled
        self._tty = enabled and sys.stderr.isatty()
        self._printed = False

    def restart(self, total: int, payload: int) -> None:
        """The work starts (again) at 0 of ``total``, moving ``payload`` bytes more."""
        with self._lock:
            self.done, self.total = 0, total
            self.payload += payload

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    def show(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._enabled or (not force and now - self._last < self._every_s):
            return
        if not self.total:  # not started (a wait before the work): nothing to show
            return
        self._last = now
        elapsed = max(now - self._start, 1e-9)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        # A copy to an object store counts its bytes twice: sent, then read back
        twice = " sent and read back" if self.payload and self.total > self.payload else ""
        line = (
            f"{self.what}: {pct:5.1f}% ({format_bytes(self.done)} of "
            f"{format_bytes(self.total)}{twice}, {format_bytes(self.done / elapsed)}/s)"
        )
        if self._tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
            self._printed = True
        else:
            log.info("%s", line)

    def finish(self) -> None:
        if self._printed:
            self.show(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()
