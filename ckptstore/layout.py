"""Every name ckptstore gives to things on storage, in one place.

::

    root/
      step_00000500/            checkpoint_name(500); STEP_NAME matches it
        manifest.json           MANIFEST_FILE: the commit point, written last
        .metadata               METADATA_FILE: DCP's metadata (".metadata-<attempt>" on object stores)
        __0_0.distcp ...        shard files, named by DCP's planner
      latest                    LATEST_FILE: names the newest committed checkpoint
      finals                    FINALS_FILE: checkpoints that ended a completed run
      .tmp-step_00000600-<id>/  TEMP_PREFIX: a save in flight, or a dead one (swept)
      .lock                     LOCK_FILE: flock-ed by a local writer
      .writer-lease             WRITER_LEASE_FILE: flock-ed by the run writing this root
      .pointer-<id>             POINTER_TEMP_PREFIX: a pointer being replaced

Names read from storage are untrusted: :func:`check_name` accepts plain relative names
only, so that nothing read from a manifest can point outside the root.
"""

from __future__ import annotations

import os
import posixpath
import re

MANIFEST_FILE = "manifest.json"
METADATA_FILE = ".metadata"
LATEST_FILE = "latest"  # the name of the newest committed checkpoint, replaced atomically
FINALS_FILE = "finals"  # names of checkpoints that ended a completed run, one per line
TEMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
WRITER_LEASE_FILE = ".writer-lease"  # holds the writer's host, pid and start time (JSON)
POINTER_TEMP_PREFIX = ".pointer-"  # put_atomic's temp files; sweep removes stale ones

STEP_NAME = re.compile(r"^step_(\d{8,})$")


def checkpoint_name(step: int) -> str:
    """``step_00000500``: eight digits at least, so names sort like steps."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return f"step_{step:08d}"


def check_name(name: str, *, what: str = "name") -> str:
    """Accept plain relative '/'-separated names only; refuse anything that could escape.

    Names come from manifests and DCP metadata, which are untrusted input:
    ``Path(root) / "/etc/passwd"`` is ``/etc/passwd``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    bad = (
        "\x00" in name
        or "\\" in name
        or any(c in name for c in "*?[]")  # fsspec's rm/find expand globs
        or name.startswith("/")
        or posixpath.normpath(name) != name
        or any(part in ("", ".", "..") for part in name.split("/"))
    )
    if bad:
        raise ValueError(f"refusing unsafe {what} {name!r}: only plain relative names are allowed")
    return name


def split_checkpoint_path(path: str) -> tuple[str, str]:
    """``(root, name)`` of a checkpoint's path or URL: ``s3://b/run/step_1`` ->
    ``("s3://b/run", "step_1")``; a local path is made absolute first."""
    text = os.fspath(path).rstrip("/")
    if "://" in text:
        scheme, rest = text.split("://", 1)
        parent, _, name = rest.rpartition("/")
        return f"{scheme}://{parent}", name
    return os.path.split(os.path.abspath(os.path.expanduser(text)))
