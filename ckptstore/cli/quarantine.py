"""``ckptstore quarantine``: move a damaged checkpoint aside by hand.

The checkpoint becomes ``step_N.damaged-<UTC>``: no longer listed, loaded or counted by
retention, never deleted or swept by ckptstore, and shown by ``ckptstore ls --all`` until
you remove it. A training run restored past a damaged newest checkpoint does the same
on its own; this is the way to do it without one.
"""

from __future__ import annotations

import argparse
import time

from ckptstore.cli._common import (
    OK,
    manifest_key,
    open_root,
    status,
    usage_error,
    writer_lease,
)
from ckptstore.engine.listing import list_checkpoints
from ckptstore.errors import CliError
from ckptstore.layout import STEP_NAME, checkpoint_name
from ckptstore.manager import pointer

EXAMPLES = (
    "  ckptstore verify runs/exp1            # says which checkpoint is damaged\n"
    "  ckptstore quarantine runs/exp1 30     # moves step_00000030 aside\n"
    "  ckptstore ls runs/exp1 --all          # shows it as 'damaged'"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT")
    p.add_argument("step", metavar="STEP", help="the step (30) or name (step_00000030)")
    p.add_argument(
        "--force",
        action="store_true",
        help="move it aside even though it verifies (e.g. a checkpoint of a run that diverged)",
    )


def run(args: argparse.Namespace) -> int:
    match = STEP_NAME.match(args.step)
    if not (args.step.isdigit() or match):
        raise usage_error(f"STEP must be a number or a name like step_00000030, got {args.step!r}")
    name = match.group(0) if match else checkpoint_name(int(args.step))
    backend = open_root(args.root, root_only=True)
    if name not in backend.list_names():
        raise usage_error(
            f"{backend.url} has no {name}; `ckptstore ls {args.root} --all` lists what is there"
        )
    refused = (
        "stop that run first (a run that restores past a damaged newest checkpoint moves "
        "it aside itself)"
    )
    with writer_lease(backend, refused):
        listed = list_checkpoints(backend, [name], manifest_key=manifest_key())
        foreign = [] if listed or args.force else backend.foreign_files(name)
        if foreign:  # (a damaged checkpoint holds only ckptstore's files)
            shown = ", ".join(foreign[:4]) + (" ..." if len(foreign) > 4 else "")
            raise CliError(
                f"{backend.url}/{name} is not a checkpoint: it holds {shown}, which "
                "ckptstore does not write in one. Check ROOT; add --force to move it aside "
                "anyway"
            )
        if not args.force and listed:
            from ckptstore.engine.ops import verify  # (torch)

            status(f"verifying {backend.url}/{name} (every byte)")
            try:
                problems = verify(backend, name, None, manifest_key=manifest_key())
            finally:
                status(None)
            if not problems:
                part = listed[0].manifest.part
                what = (
                    "verifies intact (every byte)"
                    if part is None
                    else f"is one node's part of a checkpoint, and its {len(listed[0].manifest.files)} "
                    f"file(s) on this disk verify intact (every byte; {len(part.elsewhere)} more "
                    "are on the other nodes' disks: run `ckptstore verify` there)"
                )
                raise CliError(
                    f"{backend.url}/{name} {what}: quarantine is for damaged checkpoints, and "
                    "a run would no longer resume from it; add --force to move it aside anyway"
                )
        aside = pointer.set_aside(backend, name, time.time())
    print(
        f"moved {backend.url}/{name} aside to {aside}: it is no longer listed or loaded, and "
        "ckptstore never deletes it; remove it by hand once you have looked at it"
    )
    return OK
