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
      step_00000500.replacing/  REPLACING_SUFFIX: the new copy of a checkpoint being
                                replaced (transfer.replace_checkpoint), removed after
      .lock                     LOCK_FILE: flock-ed by a local writer
      .writer-lease             WRITER_LEASE_FILE: flock-ed by the run writing this root
      .pointer-<id>             POINTER_TEMP_PREFIX: a pointer being replaced
      .disk-id                  DISK_ID_FILE: names this disk, so that ranks can tell
                                node-local roots from a shared one
      step_00000600.damaged-<UTC>  damaged_name(): a damaged checkpoint moved aside for
                                inspection; never listed, loaded, swept or deleted by ckptstore
      step_00000700.retired-<UTC>  retired_name(): a checkpoint of a discarded branch (a
                                run resumed an earlier one), moved aside, kept likewise

Names read from storage are untrusted: :func:`check_name` accepts plain relative names
only, so that nothing read from a manifest can point outside the root. What is read
whole is capped by kind (:func:`read_limit_bytes`): a 16 GiB sparse ``latest`` is
refused as corrupt, not read until memory runs out.
"""

from __future__ import annotations

import os
import posixpath
import re
import time

MANIFEST_FILE = "manifest.json"
METADATA_FILE = ".metadata"
LATEST_FILE = "latest"  # the name of the newest committed checkpoint, replaced atomically
FINALS_FILE = "finals"  # names of checkpoints that ended a completed run, one per line
TEMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
WRITER_LEASE_FILE = ".writer-lease"  # holds the writer's host, pid and start time (JSON)
POINTER_TEMP_PREFIX = ".pointer-"  # put_atomic's temp files; sweep removes stale ones
DISK_ID_FILE = ".disk-id"  # a random id, written once (StorageBackend.disk_id)
REPLACING_SUFFIX = ".replacing"  # beside a checkpoint being replaced: the complete new copy

STEP_NAME = re.compile(r"^step_(\d{8,})$")
# The files ckptstore writes inside a checkpoint (object stores add "-<attempt>"), and
# the node-local backup's markers; a name holding anything else is someone else's
_OWN_FILE = re.compile(
    r"^(manifest\.json|\.lock|\.metadata(-[0-9a-f]{12})?|[^/]+\.distcp(\.refused)?)$"
)
# Temporary entries of the root: a save's directory (.tmp-<name>-<12 hex>), a delete's
# (.tmp-deleted-<name>-<12 hex>), put_atomic's file (.pointer-<name>-<12 hex>), and
# the start-up probe of versions before 2026-12-08 (.pointer-probe-<32 hex>)
_OWN_TEMP = re.compile(
    r"^(\.tmp-.+-[0-9a-f]{12}|\.pointer-.+-[0-9a-f]{12}|\.pointer-probe-[0-9a-f]{32})$"
)
DAMAGED_MARK = ".damaged-"
RETIRED_MARK = ".retired-"
# The largest step: the largest integer a JSON reader that parses numbers as doubles
# (jq, JavaScript) reads back exactly from a manifest. A larger step is a bug upstream.
MAX_STEP = 2**53 - 1

# The most bytes read whole from each kind of small file. Far above anything ckptstore
# writes (a manifest is ~200 B per file it lists; DCP's metadata ~100 B per chunk per
# rank), far below what would exhaust a machine's memory.
POINTER_MAX_BYTES = 1 << 20  # latest, finals: a few names
MANIFEST_MAX_BYTES = 256 << 20
SMALL_FILE_MAX_BYTES = 2 << 30  # anything else read whole: DCP's .metadata, copied pointers


def checkpoint_name(step: int) -> str:
    """``step_00000500``: eight digits at least, so names sort like steps.

    The public API checks steps first (``ckptstore.engine.arguments.check_step``, which says
    more); this refuses what slips past."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be an int in 0..{MAX_STEP}, got {step!r}")
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step :func:`checkpoint_name` made ``name`` of, or None for any other name."""
    digits = name.removeprefix("step_")
    return int(digits) if digits != name and digits.isascii() and digits.isdigit() else None


def damaged_name(name: str, unix_s: float) -> str:
    """Where a damaged checkpoint ``name`` is moved aside: ``step_00000030.damaged-20261203T101500Z``."""
    return f"{name}{DAMAGED_MARK}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(unix_s))}"


def is_damaged_name(name: str) -> bool:
    """A checkpoint moved aside as damaged (see :func:`damaged_name`)."""
    base, mark, _ = name.partition(DAMAGED_MARK)
    return bool(mark) and STEP_NAME.match(base) is not None


def retired_name(name: str, unix_s: float) -> str:
    """Where a checkpoint of a discarded branch is moved aside (a run restored an earlier
    one and trained on): ``step_00000030.retired-20261203T101500Z``."""
    return f"{name}{RETIRED_MARK}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(unix_s))}"


def set_aside_kind(name: str) -> str | None:
    """``"damaged"`` or ``"retired"`` for a checkpoint moved aside, else None."""
    for mark, kind in ((DAMAGED_MARK, "damaged"), (RETIRED_MARK, "retired")):
        base, found, _ = name.partition(mark)
        if found and STEP_NAME.match(base) is not None:
            return kind
    return None


def read_limit_bytes(name: str) -> int:
    """The most bytes a backend reads whole from ``name`` (by the kind of file its last
    component names); a larger file is refused as corrupt."""
    base = name.rsplit("/", 1)[-1]
    if base in (LATEST_FILE, FINALS_FILE):
        return POINTER_MAX_BYTES
    if base == MANIFEST_FILE:
        return MANIFEST_MAX_BYTES
    return SMALL_FILE_MAX_BYTES


def written_by_ckptstore(fname: str) -> bool:
    """Whether ``fname`` (inside a checkpoint, no directory) is one ckptstore writes."""
    return _OWN_FILE.match(fname) is not None


def own_temp_name(name: str) -> bool:
    """Whether ``name`` (in a root) is a temporary entry ckptstore makes and sweeps."""
    return _OWN_TEMP.match(name) is not None


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
