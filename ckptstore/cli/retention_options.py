"""The retention-policy options ``ckptstore prune`` and ``ckptstore ls`` share: their
arguments, and the policies they ask for.

``prune`` deletes what no part of the policy keeps; ``ls`` tags ``kept`` what the parts
that keep checkpoints for good would keep.
"""

from __future__ import annotations

import argparse

from ckptstore.cli._common import int_at_least, usage_error
from ckptstore.manager.policies import KeepBest, KeepEvery, KeepFinal, KeepLast, RetentionPolicy


def add_retention_options(p: argparse.ArgumentParser, *, for_ls: bool) -> None:
    g = p.add_argument_group(
        "retention policy"
        + (" (optional: tags what its keep-forever parts keep as 'kept')" if for_ls else ""),
        None
        if for_ls
        else "any of these keeps a checkpoint; the newest and the one "
        "`latest` names are always kept",
    )
    g.add_argument("--keep-last", type=int_at_least(1), metavar="N", help="the N newest")
    g.add_argument(
        "--keep-every-steps",
        type=int_at_least(1),
        metavar="N",
        help="steps that are multiples of N",
    )
    g.add_argument(
        "--keep-every-epoch", action="store_true", help="the last checkpoint of every epoch"
    )
    g.add_argument("--keep-best", type=int_at_least(1), metavar="N", help="the N best by --metric")
    g.add_argument("--keep-final", action="store_true", help="checkpoints that ended a run")
    if not for_ls:
        g.add_argument("--metric", metavar="NAME", help="for --keep-best (e.g. val_loss)")
        g.add_argument("--mode", choices=("min", "max"), help="for --keep-best (default: min)")


def retention_parts(args: argparse.Namespace) -> list[tuple[str, RetentionPolicy]]:
    """The policies the retention options ask for, each with the label ``prune`` shows."""
    parts: list[tuple[str, RetentionPolicy]] = []
    try:
        if args.keep_last:
            parts.append((f"last {args.keep_last}", KeepLast(args.keep_last)))
        if args.keep_every_steps:
            parts.append(
                (f"every {args.keep_every_steps} steps", KeepEvery(steps=args.keep_every_steps))
            )
        if args.keep_every_epoch:
            parts.append(("end of epoch", KeepEvery(epochs=1)))
        if args.keep_best:
            if not args.metric:
                raise usage_error(
                    "--keep-best needs --metric NAME (a metric recorded in the manifests, such "
                    "as val_loss; ckptstore ls shows them)"
                )
            parts.append(
                (
                    f"best {args.keep_best} by {args.metric}",
                    KeepBest(args.keep_best, args.metric, args.mode or "min"),
                )
            )
        if args.keep_final:
            parts.append(("final", KeepFinal()))
    except ValueError as exc:
        raise usage_error(f"{exc}; see ckptstore prune --help") from None
    return parts


def forever_parts(args: argparse.Namespace) -> list[RetentionPolicy]:
    """The parts that keep checkpoints for good (``ls`` tags what they keep ``kept``)."""
    return [p for label, p in retention_parts(args) if not isinstance(p, KeepLast)]
