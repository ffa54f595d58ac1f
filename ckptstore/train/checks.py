"""What the training command checks before it trains, and how it reports a failure.

Before the first step: the data file can be read and is long enough, the checkpoint root
is a directory (or a bucket prefix) this process can write, and the backup remote
answers with the credentials given and can be written. An expected failure, then or
later (storage errors, a full disk, a checkpoint that cannot be restored, a second run
on the same root), ends the command with one line on stderr that says what happened and
what to type next, and exit status 1 (2 for a usage error); never a Python traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import uuid
from collections.abc import Iterator

from ckptstore.errors import (
    EXIT_FAILED,
    EXIT_USAGE,
    CheckpointNotFoundError,
    CkptStoreError,
    CliError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    InvalidArgumentError,
    NewerCheckpointsError,
    PartElsewhereError,
    WriterLeaseError,
)
from ckptstore.layout import MANIFEST_FILE, POINTER_TEMP_PREFIX
from ckptstore.storage import open_backend
from ckptstore.units import format_ranks

_FULL = (errno.ENOSPC, errno.EDQUOT)


def read_data(path: str) -> bytes:
    """``--data FILE``'s bytes, or a usage error that says what is wrong with it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CliError(
            f"--data {path}: no such file; give a text file to train on, or leave --data "
            "out to train on Python's own help text",
            EXIT_USAGE,
        ) from None
    except IsADirectoryError:
        raise CliError(f"--data {path} is a directory: give a text file", EXIT_USAGE) from None
    except OSError as exc:
        raise CliError(
            f"--data {path}: cannot read it ({exc.strerror or exc}); check its permissions",
            EXIT_USAGE,
        ) from None
    if not data:
        raise CliError(f"--data {path} is empty: give a text file to train on", EXIT_USAGE)
    return data


# May differ between nodes: each node's own disk, device, report file and copy of --data.
_PER_NODE = ("ckpt_dir", "device", "report", "data")


def same_flags_on_every_rank(args: argparse.Namespace, world: int) -> None:
    """Refuse, on every rank, nodes launched with different flags (say --save-every 10
    on one and 7 on the other): the ranks would disagree about when to save and meet in
    different collectives, a gloo abort naming no flag ("collective mismatch").
    Collective (the default process group)."""
    import torch.distributed as dist

    mine = {k: v for k, v in vars(args).items() if k not in _PER_NODE}
    mine["report"] = args.report is not None  # (--report runs a collective: all or none)
    if isinstance(args.backup, str):
        mine["backup"] = args.backup.rstrip("/")
    everyone: list[dict[str, object] | None] = [None] * world
    dist.all_gather_object(everyone, mine)
    said = []
    for key in mine:
        values: dict[str, list[int]] = {}
        for rank, theirs in enumerate(everyone):
            values.setdefault(repr((theirs or {}).get(key)), []).append(rank)
        if len(values) > 1:
            flag = "--" + key.replace("_", "-")
            said.append(
                f"{flag}: "
                + ", ".join(f"{v} on rank(s) {format_ranks(r)}" for v, r in values.items())
            )
    if said:
        raise CliError(
            f"the nodes were launched with different flags ({'; '.join(said[:4])}): give every "
            "node's command the same flags (only --ckpt-dir, --device, --data's path and "
            "--report's file may differ)",
            EXIT_USAGE,
        )


def check_writable(url: str, flag: str) -> None:
    """Write and delete a small probe file under ``url`` (created if missing): a
    read-only file system, missing permissions, a missing bucket or credentials fail
    here, before training, not at the first save."""
    if "://" not in url:
        above = os.path.abspath(url)  # it, or the nearest parent that is there
        while not os.path.lexists(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        if os.path.islink(above) and not os.path.exists(above):  # (a mount not up yet?)
            raise CliError(
                f"{flag} {url}: {above} is a symbolic link to {os.readlink(above)}, which is "
                "not there: mount or create its target, or give another directory",
                EXIT_USAGE,
            )
        if not os.path.isdir(above):
            what = "is a file" if above == os.path.abspath(url) else f"lies under a file, {above}"
            raise CliError(
                f"{flag} {url} {what}, not a directory: give a directory (it is created if "
                "missing)",
                EXIT_USAGE,
            )
    probe = f"{POINTER_TEMP_PREFIX}probe-{uuid.uuid4().hex[:12]}"  # swept if we die meanwhile
    try:
        backend = open_backend(url)
        backend.check_access()
        if backend.exists(MANIFEST_FILE):
            raise CliError(
                f"{flag} {url} is a checkpoint, not a checkpoint directory: give the "
                "directory that holds it, or another one",
                EXIT_USAGE,
            )
        backend.put_atomic(probe, b"")
        backend.delete(probe)  # a checkpoint's delete: on local disk, directories only
        if backend.capabilities.local:
            os.unlink(os.path.join(backend.url, probe))
    except CliError:
        raise
    except (CkptStoreError, OSError, ValueError) as exc:
        raise CliError(cannot_write(url, flag, exc)) from None


def cannot_write(url: str, flag: str, exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if code in _FULL:
        return f"{flag} {url}: {disk_full(url, code, flag)}"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason = os.strerror(code)
        return (
            f"{flag} {url}: cannot write there ({reason}); give a directory this user "
            f"can write (e.g. {flag} runs/gpt), or fix its permissions or mount"
        )
    if "://" in url:
        return (
            f"{flag} {url}: cannot write there: {exc}. Check the URL, the bucket and the "
            "credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; "
            "AWS_ENDPOINT_URL for a non-AWS server)"
            + (", or leave --backup out" if flag == "--backup" else "")
        )
    return f"{flag} {url}: cannot write there: {exc}"


def disk_full(path: str, code: int | None = errno.ENOSPC, flag: str = "--ckpt-dir") -> str:
    """Says whether the file system holding ``path`` ran out of space or of inodes."""
    where = path
    while where and not os.path.exists(where):
        where = os.path.dirname(where.rstrip("/")) or "."
    try:
        st = os.statvfs(where or ".")
    except OSError:
        st = None
    if st is not None and st.f_files > 0 and st.f_favail == 0:
        return (
            f"the file system of {path} is out of inodes (no free file entries; "
            f"{st.f_bavail * st.f_frsize / 2**20:,.1f} MiB of space is still free): delete "
            f"files there (many small ones count), or give another {flag}, then rerun the "
            "same command"
        )
    free = "" if st is None else f" ({st.f_bavail * st.f_frsize / 2**20:,.1f} MiB free)"
    what = "the disk quota" if code == errno.EDQUOT else "space"
    return (
        f"the file system of {path} is out of {what}{free}: free space (`ckptstore prune "
        f"{path} --keep-last N --yes` deletes old checkpoints), keep fewer with --keep-last, "
        f"or give another {flag}, then rerun the same command"
    )


def explain(exc: BaseException, args: argparse.Namespace) -> tuple[str, int]:
    """The one line to print for an expected failure, and the exit status."""
    root = str(args.ckpt_dir)
    if isinstance(exc, CliError):
        return str(exc), exc.code
    if isinstance(exc, WriterLeaseError):
        return str(exc).replace("another directory", "another --ckpt-dir"), EXIT_FAILED
    message = str(exc).replace(
        "run Checkpointer(root).verify(step)", f"run `ckptstore verify {root}`"
    )
    full = _full_cause(exc)  # a failed background save carries the disk's error
    if full is not None and "://" not in root:
        step = getattr(exc, "step", None)
        what = f"saving step {step}" if step is not None else "writing"
        where = getattr(full, "filename", None) or root
        return f"{what} failed at {where}: {disk_full(root, full.errno)}", EXIT_FAILED
    if isinstance(exc, (CheckpointNotFoundError, CorruptCheckpointError)):
        return (
            f"{message}. `ckptstore ls {root} --all` lists the checkpoints and `ckptstore "
            f"verify {root}` checks them; choose one with --resume STEP, or start over with "
            "--resume none --discard-newer (the checkpoints there are moved aside, not deleted)",
            EXIT_FAILED,
        )
    return message, EXIT_FAILED


class _Failures(logging.Handler):
    """Keeps the exceptions that ckptstore's warnings carry (a download from the backup
    that failed is logged, and restore then tries elsewhere)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        self.errors += [a for a in args if isinstance(a, BaseException)]


@contextlib.contextmanager
def noting_failures() -> Iterator[list[BaseException]]:
    """The exceptions behind the warnings logged inside the block."""
    handler = _Failures()
    logger = logging.getLogger("ckptstore")
    logger.addHandler(handler)
    try:
        yield handler.errors
    finally:
        logger.removeHandler(handler)


def resume_error(
    which: str, root: str, exc: Exception, noted: list[BaseException] | None = None
) -> Exception:
    """What to raise when ``--resume WHICH`` failed with ``exc`` (``noted``: the errors
    warned about meanwhile): a full disk that a download from the backup ran into, a
    usage error if WHICH named nothing there, or a plain one if the checkpoint does not
    fit this model."""
    full = next((c for c in map(_full_cause, noted or ()) if c is not None), None)
    if full is not None and "://" not in root:
        return CliError(
            f"--resume {which}: could not download the checkpoint from the backup: "
            f"{disk_full(root, full.errno)}"
        )
    if isinstance(exc, NewerCheckpointsError):
        resume = "" if which == "latest" else "resume the newest with --resume latest; "
        return CliError(
            f"--resume {which}: {exc.what}. Choose: {resume}keep them and train elsewhere "
            f"with another --ckpt-dir (and --backup); or rerun with --discard-newer to move "
            f"them aside (kept as step_N.retired-<time>, listed by `ckptstore ls {root} "
            "--all`) and train on from here"
        )
    if isinstance(exc, PartElsewhereError):  # it is there: on this shape it cannot load
        return CliError(
            f"--resume {which}: {exc}; or start over with --resume none --discard-newer "
            "(the parts there are moved aside, not deleted)"
        )
    if which not in ("latest", "best") and os.path.isfile(which):
        return CliError(
            f"--resume {which}: that is a file, not a checkpoint directory. Give latest, "
            f"best, none, a step that `ckptstore ls {root}` lists, or the path of a "
            "checkpoint directory",
            EXIT_USAGE,
        )
    if which not in ("latest", "best") and (
        isinstance(exc, CheckpointNotFoundError) or type(exc) in (ValueError, InvalidArgumentError)
    ):
        return CliError(
            f"--resume {which}: {exc}. Give latest, best, none, a step that `ckptstore ls "
            f"{root}` lists, or the path of a checkpoint directory",
            EXIT_USAGE,
        )
    if isinstance(exc, IncompatibleCheckpointError):
        what = str(exc).split(". Fix: ")[0]  # (its fix names Python arguments)
        return CliError(
            f"--resume {which}: {what}. That checkpoint was written with other settings: "
            "rerun with those (the same --size, and --freeze-blocks if it was given), or "
            "start over with another --ckpt-dir, or here with --resume none --discard-newer "
            "(the checkpoints there and on --backup are moved aside, not deleted)"
        )
    return exc


def _full_cause(exc: BaseException) -> OSError | None:
    """``exc``, or the error it was raised from, if that is ENOSPC / EDQUOT."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _FULL:
            return cause
        cause = cause.__cause__
    return None
