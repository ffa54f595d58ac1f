"""What every ``ckptstore`` command shares: errors with exit codes, argument types,
opening roots and naming checkpoints (local paths and ``s3://`` URLs alike), and
plain-text tables.

Exit codes: 0 all is well; 1 the operation failed or found damage; 2 a usage error (bad
arguments, a root or checkpoint that is not there). Tables and results go to stdout,
progress and notes to stderr, so that ``--json`` output and pipes stay clean.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ckptstore.engine.listing import list_checkpoints
from ckptstore.errors import (
    EXIT_FAILED,
    EXIT_USAGE,
    CkptStoreError,
    CliError,
    StorageError,
    WriterLeaseError,
)
from ckptstore.layout import MANIFEST_FILE, STEP_NAME, checkpoint_name
from ckptstore.storage import LocalBackend, StorageBackend, open_backend
from ckptstore.units import format_bytes

OK, FAILED, USAGE = 0, EXIT_FAILED, EXIT_USAGE

CREDENTIALS_HINT = (
    "credentials and endpoint come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
    "AWS_ENDPOINT_URL (S3-compatible services), AWS_DEFAULT_REGION or AWS_PROFILE"
)


@functools.cache
def manifest_key() -> bytes | None:
    """``$CKPTSTORE_MANIFEST_KEY``, read once: the command line takes the key from there only."""
    from ckptstore.config import resolve_manifest_key  # the codecs (numpy): not for --help

    return resolve_manifest_key()


def usage_error(message: str) -> CliError:
    return CliError(message, USAGE)


@contextlib.contextmanager
def usage_errors(*types: type[Exception]) -> Iterator[None]:
    """Exceptions of ``types`` raised inside become usage errors (exit status 2)."""
    try:
        yield
    except types as exc:
        raise usage_error(str(exc)) from None


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer no smaller than ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def local_path(text: str) -> str:
    return os.path.abspath(os.path.expanduser(text.removeprefix("file://")))


def open_root(
    url: str, *, must_exist: bool = True, create: bool = False, root_only: bool = False
) -> StorageBackend:
    """The backend of a checkpoint root; a usage error if it is plainly not there.

    A local root must be an existing directory (unless ``create``); an object-store
    root must be reachable (its bucket exists, the credentials work). An empty prefix
    in a bucket cannot be told from a missing one: it is a root with no checkpoints.
    ``root_only``: a checkpoint given instead is a usage error (a command that works
    on whole roots would find nothing in it, and say all is well).
    """
    refuse_empty(url)
    if not is_url(url):
        path = local_path(url)
        if os.path.exists(path) and not os.path.isdir(path):
            raise usage_error(f"{url} is a file, not a checkpoint root (a directory)")
        if (create or not must_exist or root_only) and os.path.isfile(
            os.path.join(path, MANIFEST_FILE)
        ):
            raise not_a_root(url)
        if must_exist and not create and not os.path.isdir(path):
            raise usage_error(
                f"{url}: no such directory; check the path (ckptstore ls PARENT lists the "
                "checkpoints of a root)"
            )
        return LocalBackend(path, create=create)
    try:
        backend = open_backend(url, create=create)
    except ValueError as exc:
        raise usage_error(f"cannot open {url}: {exc}; check the URL (s3://bucket/prefix)") from None
    try:
        backend.check_access()
    except StorageError as exc:
        message = str(exc)
        code = USAGE if ("does not exist" in message or "denied" in message) else FAILED
        if "credentials" not in message:
            message += f"; {CREDENTIALS_HINT}"
        raise CliError(message, code) from None
    if root_only and backend.exists(MANIFEST_FILE):
        raise not_a_root(url)
    return backend


def refuse_inside_checkpoint(path: str, what: str) -> None:
    """A usage error if local ``path`` is, or lies inside, a committed checkpoint or a
    root that holds some (a file written there would lie among their files, or replace
    ``latest``), or is a directory that holds some (``--force`` would delete them).
    ``what``: the argument, for the message."""
    full = os.path.realpath(os.path.expanduser(path.removeprefix("file://")))
    here = full
    while True:
        if os.path.isfile(os.path.join(here, MANIFEST_FILE)):
            raise usage_error(
                f"{what} {path} is inside the committed checkpoint {here}: a file written "
                "there would lie among its files; give a path outside every checkpoint"
            )
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    if os.path.isdir(full) and _holds_checkpoints(full):
        raise usage_error(
            f"{what} {path} holds checkpoints: writing it would replace them; give a path "
            "outside every checkpoint root"
        )
    if _holds_checkpoints(os.path.dirname(full)):
        raise usage_error(
            f"{what} {path} is inside the checkpoint root {os.path.dirname(full)}; give a "
            "path outside every checkpoint root"
        )


def _holds_checkpoints(directory: str) -> bool:
    """Whether a local directory holds a committed checkpoint (one level down)."""
    try:
        with os.scandir(directory) as entries:
            return any(
                e.is_dir() and os.path.isfile(os.path.join(e.path, MANIFEST_FILE)) for e in entries
            )
    except OSError:
        return False


def other_checkpoints(backend: StorageBackend) -> list[str]:
    """The committed checkpoints in a local root under names other than ``step_N``
    (Lightning's ``*.ckpt``, an export's), sorted; none on object stores (one listing
    there says nothing about manifests). Not ``step_N.<anything>`` (a checkpoint set
    aside as damaged or retired, a replace's leftover) nor temp directories."""
    if not backend.capabilities.local:
        return []
    try:
        return sorted(
            n
            for n in backend.list_names()
            if not STEP_NAME.match(n.split(".", 1)[0])
            and not n.startswith(".")
            and backend.exists(f"{n}/{MANIFEST_FILE}")
        )
    except (OSError, StorageError):
        return []


def named_otherwise(backend: StorageBackend, target: str) -> str:
    """For a root with no ``step_N`` checkpoints: a hint naming the checkpoints in it
    under other names (Lightning's ``*.ckpt``, an export's), which a command takes one
    at a time; empty if there are none (local roots only: one listing)."""
    names = other_checkpoints(backend)
    if not names:
        return ""
    shown = ", ".join(sorted(names)[:4]) + (" ..." if len(names) > 4 else "")
    example = "last.ckpt" if "last.ckpt" in names else sorted(names)[0]
    return (
        f"; it holds {len(names)} checkpoint(s) under other names ({shown}, as Lightning "
        f"names them): give one, e.g. {target.rstrip('/')}/{example}"
    )


def refuse_empty(text: str) -> None:
    """A root or checkpoint argument that is empty or blank (an unset shell variable)
    is a usage error, never the current directory."""
    if not text.strip():
        raise usage_error(
            "a checkpoint root or checkpoint must not be empty: give a directory or an s3:// URL"
        )


def split_checkpoint(text: str) -> tuple[str, str] | None:
    """``ROOT/NAME`` -> (ROOT, NAME); None when there is no parent to split off."""
    refuse_empty(text)
    stripped = text.rstrip("/")
    if is_url(stripped):
        scheme, rest = stripped.split("://", 1)
        parent, _, name = rest.rpartition("/")
        if not parent or not name:
            return None
        return f"{scheme}://{parent}", name
    path = local_path(stripped)
    parent, name = os.path.split(path)
    if not name or parent == path:
        return None
    return parent, name


def resolve_checkpoint(
    text: str, step: int | None, *, what: str = "checkpoint", quiet: bool = False
) -> tuple[StorageBackend, str]:
    """The (root, name) a CKPT argument means: ``ROOT/step_00000500``, a checkpoint saved
    by path (``ckpt/final``), ``ROOT --step 500``, or ``ROOT`` alone (its newest
    checkpoint, said on stderr). A usage error if there is no committed checkpoint there.
    """
    if step is not None:
        backend = open_root(text)
        name = checkpoint_name(step)
        if not backend.exists(f"{name}/{MANIFEST_FILE}"):
            raise usage_error(
                f"no committed checkpoint {name} under {backend.url}; ckptstore ls "
                f"{text} lists them (--all shows uncommitted and damaged ones)"
            )
        return backend, name
    found = find_named(text)
    if found is not None:
        backend, name, present = found
        if not present:
            raise usage_error(
                f"{backend.url}/{name} is not there; ckptstore ls {backend.url} lists the "
                "checkpoints of that root"
            )
        if not backend.exists(f"{name}/{MANIFEST_FILE}"):
            raise CliError(
                f"{backend.url}/{name} is not a committed checkpoint (no {MANIFEST_FILE}: a save "
                "that did not finish, or a damaged one); pick another with ckptstore ls "
                f"{backend.url}, and ckptstore gc {backend.url} removes dead saves",
                USAGE,
            )
        return backend, name
    backend = open_root(text)
    infos = list_checkpoints(backend, manifest_key=manifest_key())
    if not infos:
        raise usage_error(
            f"no committed checkpoint under {backend.url}"
            + (
                named_otherwise(backend, text)
                or f": pass a checkpoint (ROOT/step_00000500) or a root that holds some "
                f"(ckptstore ls {text} --all shows uncommitted and damaged ones)"
            )
        )
    newest = infos[-1]
    if not quiet:
        note(f"{what}: the newest under {backend.url}, {newest.name} (choose with --step N)")
    return backend, newest.name


def find_named(text: str) -> tuple[StorageBackend, str, bool] | None:
    """If ``text`` names one checkpoint (a ``step_*`` name, or a directory holding a
    manifest): its root, its name and whether anything is there under that name."""
    split = split_checkpoint(text)
    if split is None:
        return None
    parent, name = split
    if not is_url(parent) and not os.path.isdir(parent):
        if STEP_NAME.match(name):
            raise usage_error(
                f"{parent}: no such directory; check the path (ckptstore ls ROOT lists the "
                "checkpoints of a root)"
            )
        return None
    if STEP_NAME.match(name):
        backend = open_root(parent)
        return backend, name, name in backend.list_names()
    if is_url(parent):
        backend = open_backend(parent, create=False)
        if backend.exists(f"{name}/{MANIFEST_FILE}"):
            backend = open_root(parent)
            return backend, name, True
        return None
    if os.path.isfile(os.path.join(parent, name, MANIFEST_FILE)):
        return open_root(parent), name, True
    return None


def not_a_root(url: str) -> CliError:
    """A command asked to write into a committed checkpoint as if it were a root."""
    return usage_error(
        f"{url} is a checkpoint, not a checkpoint root: give the root that holds it, or another one"
    )


@contextlib.contextmanager
def writer_lease(backend: StorageBackend, refused: str) -> Iterator[None]:
    """Hold ``backend``'s writer lease while a command changes what a run would (deletes
    or moves checkpoints aside): a run writing the root refuses the command, which says
    ``refused`` after naming it; the command in turn holds a run off until it ends."""
    from ckptstore.manager import lease  # (imports torch.distributed)

    if backend.exists(MANIFEST_FILE):
        raise not_a_root(backend.url)
    try:
        held = lease.acquire(backend, full_disk_ok=True)  # (prune frees a full disk)
    except WriterLeaseError as exc:
        who = lease.describe_holder(exc.holder)
        raise CliError(f"{backend.url} is being written by {who}: {refused}") from None
    try:
        yield
    finally:
        if held is not None:
            held.release()


# ---- output -------------------------------------------------------------------------
def note(message: str) -> None:
    """A line for the person at the terminal (stderr: stdout stays parseable)."""
    print(f"ckptstore: {message}", file=sys.stderr, flush=True)


def status(text: str | None) -> None:
    """A transient "what I am doing" line on a terminal (nothing when not attached to
    one, so logs and pipes stay quiet); None clears it."""
    if not sys.stderr.isatty():
        return
    sys.stderr.write("\r\x1b[K" + (f"ckptstore: {text} ..." if text else ""))
    sys.stderr.flush()


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, allow_nan=False, default=str)
    sys.stdout.write("\n")


def size(n: float) -> str:
    """1234567 -> '1.23 MB'."""
    return format_bytes(n)


def local_time(unix_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_s))


def iso_utc(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.timezone.utc).isoformat(
        timespec="seconds"
    )


def metrics_text(metrics: dict[str, Any]) -> str:
    parts = []
    for k, v in sorted(metrics.items()):
        parts.append(f"{k}={'nan' if v is None else f'{v:.4g}'}")
    return " ".join(parts)


def table(rows: Sequence[Sequence[str]], header: Sequence[str], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; columns in ``right`` are right-aligned."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        out = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(out).rstrip())
    return "\n".join(lines)


def disk_bytes(root: str, manifests: dict[str, Any]) -> int:
    """What the files these checkpoints (name -> manifest) list take on the local disk
    ``root``: a file hard-linked into several (incremental saves) counted once, by
    inode. Two checkpoints that hold the same bytes in files of their own count twice
    (it was by size and checksum until 2026-12-07: two identical full saves were
    counted once). Without links (no manifest names a linked file) nothing is stat'ed."""
    if not any(m.linked for m in manifests.values()):
        return sum(m.stored_bytes for m in manifests.values())
    seen: set[tuple[int, int]] = set()
    total = 0
    for name, m in manifests.items():
        for fname, e in m.files.items():
            try:
                st = os.stat(os.path.join(root, name, fname))
            except OSError:  # gone or unreadable: as listed
                total += e.size_bytes
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += e.size_bytes
    return total


Links = dict[str, list[tuple[tuple[int, int], int, int]]]


def file_links(backend: StorageBackend, names: Iterable[str]) -> Links | None:
    """On a local disk, each checkpoint's files as (inode, size, hard links); None
    elsewhere (on object stores each checkpoint holds its own copies)."""
    if not backend.capabilities.local:
        return None
    out: Links = {}
    for name in names:
        files = out.setdefault(name, [])
        for top, _, found in os.walk(os.path.join(backend.url, name)):
            for f in found:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(top, f))
                    files.append(((st.st_dev, st.st_ino), st.st_size, st.st_nlink))
    return out


def freed_bytes(links: Links, names: set[str]) -> int:
    """What deleting the checkpoints ``names`` frees: each file whose every hard link is
    in them (one kept elsewhere, a later checkpoint or one set aside, keeps it)."""
    seen: dict[tuple[int, int], list[int]] = {}
    for name in names:
        for inode, nbytes, nlink in links.get(name, []):
            seen.setdefault(inode, [nbytes, nlink, 0])[2] += 1
    return sum(nbytes for nbytes, nlink, count in seen.values() if count >= nlink)


def refuse_parts(
    command: str, src: StorageBackend, infos: Sequence[Any], dst: StorageBackend
) -> None:
    """``sync``/``pull`` copy whole checkpoints: a source's ``infos`` that are one node's
    parts of a run saved to node-local disks are refused at once (each would fail alone,
    "rerun after fixing the cause": no help), and so is a local destination holding such
    parts (whole checkpoints would mix with them, and repair none). Parts lie on
    node-local disks only: an object store is not listed for them."""

    def named(parts: list[str]) -> str:
        return ", ".join(parts[:3]) + (" ..." if len(parts) > 3 else "")

    parts = [i.name for i in infos if i.manifest.part is not None]
    if parts:
        raise CliError(
            f"{src.url} holds one node's parts of checkpoints saved to node-local disks "
            f"({named(parts)}): {command} copies whole checkpoints only. Back such a run up "
            "while it trains (ckptstore train --backup URL, CheckpointManager(backup=...)): "
            "each node uploads its part, and the backup holds whole checkpoints"
        )
    if not dst.capabilities.local:
        return
    try:
        parts = [i.name for i in list_checkpoints(dst) if i.manifest.part is not None]
    except (CkptStoreError, OSError):
        return  # (not there yet, or unreadable: the copy says so itself)
    if parts:
        raise CliError(
            f"{dst.url} holds one node's parts of checkpoints saved to node-local disks "
            f"({named(parts)}); {command} copies whole checkpoints, which would mix with "
            "them and repair none. A run restores each node's part from its backup itself "
            "(CheckpointManager(backup=...), ckptstore train --backup); to copy whole "
            f"checkpoints, give {command} an empty directory"
        )
