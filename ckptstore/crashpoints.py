"""Named crash points in the commit protocol: a hook for the crash tests, nothing else.

When the environment variable ``CKPTSTORE_CRASH_AT`` names one of :data:`CRASH_POINTS`
at the time ckptstore is imported, the process kills itself with ``SIGKILL`` the first
time it reaches that point (``NAME@N``: the N-th time): the tests then check, in a fresh process, that nothing
committed was lost and nothing half-written is visible (``tests/test_crash_points.py``).

The variable is read once, at import. Unset (every run outside the crash tests),
:func:`crash_point` compares a module global with ``None`` and returns.
"""

from __future__ import annotations

import os
import signal

#: Every point the library calls :func:`crash_point` at, in commit-protocol order.
CRASH_POINTS = (
    # Local disk (ckptstore/storage/local.py)
    "local.commit.before_manifest",  # data files and .metadata written and fsynced
    "local.commit.before_rename",  # manifest written, temp directory fsynced
    "local.commit.before_root_fsync",  # renamed to the final name, root not yet fsynced
    "local.put_atomic.before_replace",  # pointer temp file written and fsynced
    "local.delete.before_rmtree",  # renamed out of the way (doomed), root fsynced
    # Object stores (ckptstore/storage/objectstore.py, s3.py)
    "s3.upload.before_complete",  # every part of a multipart upload sent
    "fsspec.commit.before_manifest",  # every data object written, before the manifest PUT
    "fsspec.delete.after_manifest",  # the manifest deleted, the data objects not yet
    # Retention (ckptstore/retention.py)
    "retention.after_delete",  # one checkpoint deleted, the next not yet
)

_CRASH_AT, _, _NTH = (os.environ.get("CKPTSTORE_CRASH_AT") or "").partition("@")
_reached = [int(_NTH) if _NTH.isdigit() else 1]  # times left to reach it, this one included


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``CKPTSTORE_CRASH_AT`` named ``name`` at import."""
    if _CRASH_AT and name == _CRASH_AT:
        _reached[0] -= 1
        if _reached[0] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
