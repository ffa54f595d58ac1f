"""``ckptstore gc``: remove the leftovers of dead saves: temp directories, uncommitted
object-store prefixes older than the grace period, stale multipart uploads.

On local disk a live save holds a lock on its temp directory and is never removed; object
stores have no locks, so age (``--grace-s``) is all there is to go by.
"""

from __future__ import annotations

import argparse
from typing import Any

from ckptstore.cli._common import OK, emit_json, note, open_root, usage_error

EXAMPLES = (
    "  ckptstore gc runs/exp1\n"
    "  ckptstore gc s3://my-bucket/runs/exp1 --grace-s 7200\n\n"
    "On local disk a live save holds a lock on its temp directory and is never\n"
    "removed, whatever its age. Object stores have no locks: an uncommitted prefix or\n"
    "multipart upload is removed once older than --grace-s (default 3600 s there,\n"
    "60 s on local disk): make it longer than your slowest save."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--grace-s", type=float, metavar="S", help="age a leftover must reach")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    backend = open_root(args.root, root_only=True)
    grace = args.grace_s
    if grace is None:
        # Local disk: a lock protects a live save whatever its age; object stores have
        # only age to go by (the Checkpointer's defaults).
        grace = 60.0 if backend.capabilities.save_locks else 3600.0
    if grace < 0:
        raise usage_error("--grace-s must be >= 0")
    if grace < backend.min_sweep_age_s:  # what sweep() takes instead
        note(f"--grace-s {grace:g}: {backend.url} keeps leftovers younger than "
             f"{backend.min_sweep_age_s:g} s whatever it is given (a save may be starting)")  # fmt: skip
        grace = backend.min_sweep_age_s
    removed = backend.sweep(grace)
    left: list[Any] = []
    open_uploads = getattr(backend, "open_uploads", None)
    if open_uploads is not None:
        try:
            left = list(open_uploads())
        except Exception as exc:
            note(f"could not list open multipart uploads under {backend.url}: {exc}")
    if args.json:
        emit_json(
            {
                "root": backend.url,
                "grace_s": grace,
                "removed": removed,
                "open_uploads_left": len(left),
            }
        )
        return OK
    for r in removed:
        print(f"removed  {r}")
    print(
        f"removed {len(removed)} leftover(s) of dead saves under {backend.url} "
        f"(older than {grace:g} s)"
    )
    if left:
        print(
            f"{len(left)} multipart upload(s) younger than {grace:g} s left alone (a save may "
            "be writing them); run again later, or with a smaller --grace-s once no save runs"
        )
    return OK
