"""A backup's first contact with its remote: a missing bucket or wrong credentials fail
the manager's construction at once; an unreachable one is only said (saves go on
locally, and the backup catches up once it answers)."""

from __future__ import annotations

import logging
import threading

from ckptstore.errors import StorageError
from ckptstore.storage import StorageBackend

log = logging.getLogger("ckptstore")


def probe_remote(remote: StorageBackend, timeout_s: float) -> None:
    """Missing bucket or wrong credentials: fail now. Unreachable: warn, go on."""
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            remote.check_access()
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=probe, name="ckptstore-backup-probe", daemon=True)
    t.start()
    t.join(timeout_s)
    if not result:
        log.warning(
            "backup: %s did not answer within %.0f s; saving locally, and backing up "
            "once it answers",
            remote.url,
            timeout_s,
        )
        return
    exc = result[0]
    if exc is None:
        return
    message = str(exc)
    if isinstance(exc, StorageError) and ("does not exist" in message or "denied" in message):
        raise exc
    log.warning(
        "backup: cannot reach %s now (%s); saving locally, and backing up once it answers",
        remote.url,
        message,
    )
