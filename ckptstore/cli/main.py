"""The ``ckptstore`` command (also ``python -m ckptstore``).

    ckptstore ls ROOT            checkpoints under a root: step, epoch, time, size, tags
    ckptstore info CKPT          what is inside one: tensors, groups, codec, metadata
    ckptstore verify ROOT|CKPT   every byte checked against the manifests
    ckptstore export CKPT OUT    one torch.save (.pt) or safetensors file, unsharded
    ckptstore import FILE ROOT   a torch.save / safetensors file as a checkpoint
    ckptstore prune ROOT         retention, as the CheckpointManager applies it
    ckptstore sync LOCAL REMOTE  copy committed checkpoints up (verified, resumable)
    ckptstore pull REMOTE LOCAL  ... and down
    ckptstore gc ROOT            remove leftovers of dead saves
    ckptstore train [...]        the reference training loop (python -m ckptstore.train)
    ckptstore bench [...]        the benchmark suite (ckptstore.bench)

Roots and checkpoints are local paths or ``s3://`` URLs (credentials from the AWS
environment variables or profiles). Each command is a module of this package
(:mod:`ckptstore.cli.ls`, ..., :mod:`ckptstore.cli.import_` for ``import``) with
``EXAMPLES``, ``add_arguments(parser)`` and ``run(args)``; what they share (exit codes,
roots, tables) is in :mod:`ckptstore.cli._common`. Adding a command: its module, and one
line in :data:`COMMANDS`.

A command's module is imported only when that command runs (or shows its ``--help``):
``ckptstore --help`` lists the commands from :data:`COMMANDS` alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, cast

from ckptstore.errors import EXIT_FAILED, EXIT_USAGE, CkptStoreError, CliError


@dataclass(frozen=True)
class Command:
    """One ``ckptstore`` subcommand: what ``ckptstore --help`` says of it (also the first
    line of its own ``--help``), and the module that implements it."""

    summary: str
    module: str


# The commands, in the order ``ckptstore --help`` lists them.
COMMANDS: dict[str, Command] = {
    "ls": Command(
        "list the checkpoints under a root: step, epoch, time, reason, size, ratio, metrics, tags",
        "ckptstore.cli.ls",
    ),
    "info": Command(
        "show what is inside a checkpoint: tensors (dtype, shape, size, sharding) by group, "
        "codec and ratio, world size, metadata, format version",
        "ckptstore.cli.info",
    ),
    "verify": Command(
        "check every byte of a checkpoint, or of every checkpoint under a root, against "
        "the manifests; exit status 0 only when all is intact",
        "ckptstore.cli.verify",
    ),
    "export": Command(
        "write a checkpoint as one torch.save (.pt) or safetensors file, unsharded, for "
        "inference or sharing (no model code needed)",
        "ckptstore.cli.export",
    ),
    "import": Command(
        "bring a torch.save (.pt) or safetensors file in as a committed checkpoint",
        "ckptstore.cli.import_",
    ),
    "prune": Command(
        "delete checkpoints a retention policy does not keep (prints what it would delete; "
        "deletes only with --yes)",
        "ckptstore.cli.prune",
    ),
    "sync": Command(
        "copy the committed checkpoints REMOTE lacks from LOCAL to REMOTE", "ckptstore.cli.sync"
    ),
    "pull": Command(
        "copy the committed checkpoints LOCAL lacks from REMOTE to LOCAL", "ckptstore.cli.pull"
    ),
    "gc": Command(
        "remove leftovers of dead saves: temp directories, uncommitted object-store "
        "prefixes older than the grace period, stale multipart uploads",
        "ckptstore.cli.gc",
    ),
    "quarantine": Command(
        "move a damaged checkpoint aside (step_N.damaged-<time>): kept for inspection, "
        "no longer listed or loaded",
        "ckptstore.cli.quarantine",
    ),
}


@dataclass(frozen=True)
class Forwarded:
    """A command that parses its own options: ``main`` hands it the rest of the line."""

    summary: str
    module: str  # holds main(argv) -> int
    examples: str


FORWARDED: dict[str, Forwarded] = {
    "train": Forwarded(
        "train a GPT-style model, checkpointed by ckptstore (ckptstore train --help)",
        "ckptstore.train.loop",
        "  ckptstore train --size medium --steps 2000 --save-every 100 --keep-last 2",
    ),
    "bench": Forwarded(
        "save/load benchmarks against torch.save, safetensors and DCP (ckptstore bench --help)",
        "ckptstore.bench.suite",
        "  ckptstore bench --size 250MB --runs 3\n  ckptstore bench --smoke",
    ),
}


class _CommandModule(Protocol):
    """What the module of a :class:`Command` holds."""

    EXAMPLES: str  # the epilog of its --help, after "examples:"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


class _Forwarded(Protocol):
    def main(self, argv: list[str]) -> int: ...


def _command_module(name: str) -> _CommandModule:
    return cast(_CommandModule, importlib.import_module(COMMANDS[name].module))


DESCRIPTION = """\
Inspect, verify, export, prune and copy ckptstore checkpoints, on local paths and
s3:// URLs alike (S3 credentials and endpoint come from the AWS environment variables:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, or
AWS_PROFILE).

A ROOT holds numbered checkpoints (runs/exp1); a CKPT is one of them
(runs/exp1/step_00000500), or ROOT --step 500, or ROOT alone for its newest.

exit status: 0 ok; 1 damage found or the operation failed; 2 usage error (bad
arguments, no such root or checkpoint)."""

EXAMPLES = """\
examples:
  ckptstore ls runs/exp1
  ckptstore verify s3://my-bucket/runs/exp1
  ckptstore export runs/exp1 model.safetensors --only model --dtype bf16
  ckptstore sync runs/exp1 s3://my-bucket/runs/exp1

ckptstore COMMAND --help shows each command's options and examples."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors that say where to look next."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandParser(_Parser):
    """A subcommand's parser. The command's own arguments and examples are added from its
    module just before it parses (argparse calls this only for the command given), so
    that only that command's module is imported."""

    command: str | None = None  # a key of COMMANDS, until its arguments are added

    def parse_known_args(  # argparse's stubs overload it; Any stands for each of them
        self, args: Iterable[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        if self.command is not None:
            module = _command_module(self.command)
            self.command = None
            self.epilog = "examples:\n" + module.EXAMPLES
            module.add_arguments(self)
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:  # said by this command (its usage, its --help), not by `ckptstore`
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    """The ``ckptstore`` parser; each command's arguments are added when it is parsed."""
    parser = _Parser(
        prog="ckptstore",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ckptstore import __version__

    parser.add_argument("--version", action="version", version=f"ckptstore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    entries: list[tuple[str, str, str | None]] = [
        *((name, c.summary, None) for name, c in COMMANDS.items()),
        *((name, f.summary, "examples:\n" + f.examples) for name, f in FORWARDED.items()),
    ]
    for name, summary, epilog in entries:
        p = sub.add_parser(
            name,
            help=summary,
            description=textwrap.fill(summary[0].upper() + summary[1:] + ".", 88),
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "-v", "--verbose", action="store_true", help="also print the engine's info messages"
        )
        if name in COMMANDS:
            p.command = name
    return parser


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now (tests swap it between calls)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """The engine's messages on stderr for the length of one command, as they were after
    (``main`` may be called in a process that logs its own way)."""
    logger = logging.getLogger("ckptstore")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("ckptstore: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    if args_list and args_list[0] in FORWARDED:
        # The training loop and the benchmark suite parse their own options.
        forwarded = cast(_Forwarded, importlib.import_module(FORWARDED[args_list[0]].module))
        return forwarded.main(args_list[1:])
    parser = build_parser()
    if not args_list:
        parser.print_help()
        return EXIT_USAGE
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        with _logging(args.verbose):
            return _dispatch(args)
    except CliError as exc:
        print(f"ckptstore {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(
            f"ckptstore {args.command}: interrupted; nothing partial was committed: run the "
            "same command again to finish",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # `ckptstore ls | head`: the reader has all it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except CkptStoreError as exc:  # the engine's messages say what to do next
        print(f"ckptstore {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(
            f"ckptstore {args.command}: error: {exc}; check the path, its permissions and "
            "that the storage is reachable, then run it again",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _dispatch(args: argparse.Namespace) -> int:
    if args.command not in COMMANDS:
        raise CliError(f"unknown command {args.command!r}; ckptstore --help lists them", EXIT_USAGE)
    return _command_module(args.command).run(args)


if __name__ == "__main__":
    sys.exit(main())
