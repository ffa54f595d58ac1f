"""``ckptstore pull``: ``sync`` the other way, from a remote root down to a local one
(any two roots work; only the names of the arguments differ). See :mod:`ckptstore.cli.sync`.
"""

from __future__ import annotations

import argparse

from ckptstore.cli.sync import TRANSFER_NOTES, add_transfer_arguments, transfer

EXAMPLES = (
    "  ckptstore pull s3://my-bucket/runs/exp1 runs/exp1 --latest\n"
    "  ckptstore pull s3://my-bucket/runs/exp1 runs/exp1 --replace-damaged\n" + TRANSFER_NOTES
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_transfer_arguments(p, src="REMOTE", dst="LOCAL")


def run(args: argparse.Namespace) -> int:
    return transfer(args)
