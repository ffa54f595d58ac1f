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

Roots and checkpoints are local paths or ``s3://`` URLs (credentials from the AWS
environment variables or profiles). The commands live in :mod:`ckptstore.cli.inspect`
and :mod:`ckptstore.cli.ops`; what they share (exit codes, roots, tables) in
:mod:`ckptstore.cli._common`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import textwrap
from collections.abc import Iterator
from typing import Any, NoReturn

from ckptstore.cli._common import FAILED, OK, USAGE
from ckptstore.errors import CkptStoreError, CliError

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
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _retention_options(p: argparse.ArgumentParser, *, for_ls: bool) -> None:
    g = p.add_argument_group(
        "retention policy"
        + (" (optional: tags what its keep-forever parts keep as 'kept')" if for_ls else ""),
        None
        if for_ls
        else "any of these keeps a checkpoint; the newest and the one "
        "`latest` names are always kept",
    )
    g.add_argument("--keep-last", type=_int_at_least(1), metavar="N", help="the N newest")
    g.add_argument(
        "--keep-every-steps",
        type=_int_at_least(1),
        metavar="N",
        help="steps that are multiples of N",
    )
    g.add_argument(
        "--keep-every-epoch", action="store_true", help="the last checkpoint of every epoch"
    )
    g.add_argument("--keep-best", type=_int_at_least(1), metavar="N", help="the N best by --metric")
    g.add_argument("--keep-final", action="store_true", help="checkpoints that ended a run")
    if not for_ls:
        g.add_argument("--metric", metavar="NAME", help="for --keep-best (e.g. val_loss)")
        g.add_argument("--mode", choices=("min", "max"), help="for --keep-best (default: min)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ckptstore",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ckptstore import __version__

    parser.add_argument("--version", action="version", version=f"ckptstore {__version__}")
    common = _Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", help="also print the engine's info messages"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help_: str, examples: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=textwrap.fill(help_[0].upper() + help_[1:] + ".", 88),
            epilog="examples:\n" + examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )

    p = command(
        "ls",
        "list the checkpoints under a root: step, epoch, time, reason, size, ratio, metrics, tags",
        "  ckptstore ls runs/exp1\n"
        "  ckptstore ls s3://my-bucket/runs/exp1 --json\n"
        "  ckptstore ls runs/exp1 --all                 # also uncommitted and damaged ones\n"
        "  ckptstore ls runs/exp1 --remote s3://my-bucket/runs/exp1   # tag 'backed-up'\n\n"
        "tags: latest (the `latest` pointer), best (by --metric; default val_loss),\n"
        "final (ended a completed run), kept (kept forever by the retention options\n"
        "given), backed-up (an identical copy is under --remote).",
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--all", action="store_true", help="also uncommitted and damaged ones")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--remote", metavar="URL", help="tag checkpoints also present there")
    p.add_argument("--metric", metavar="NAME", help="what 'best' means (default: val_loss)")
    p.add_argument("--mode", choices=("min", "max"), help="for --metric (default: min)")
    _retention_options(p, for_ls=True)

    p = command(
        "info",
        "show what is inside a checkpoint: tensors (dtype, shape, size, sharding) by group, "
        "codec and ratio, world size, metadata, format version",
        "  ckptstore info runs/exp1/step_00000500\n"
        "  ckptstore info runs/exp1 --step 500 --only model\n"
        "  ckptstore info s3://my-bucket/runs/exp1 --json    # the newest checkpoint",
    )
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("--step", type=_int_at_least(0), metavar="N", help="checkpoint N of ROOT")
    p.add_argument("--only", metavar="PREFIX", help="only keys under PREFIX (e.g. model)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command(
        "verify",
        "check every byte of a checkpoint, or of every checkpoint under a root, against "
        "the manifests; exit status 0 only when all is intact",
        "  ckptstore verify runs/exp1                      # every checkpoint\n"
        "  ckptstore verify runs/exp1/step_00000500\n"
        "  ckptstore verify s3://my-bucket/runs/exp1 --json",
    )
    p.add_argument("target", metavar="ROOT|CKPT")
    p.add_argument("--step", type=_int_at_least(0), metavar="N", help="only checkpoint N of ROOT")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--jobs", type=_int_at_least(1), metavar="N", help="threads (default: cores)")

    p = command(
        "export",
        "write a checkpoint as one torch.save (.pt) or safetensors file, unsharded, for "
        "inference or sharing (no model code needed)",
        "  ckptstore export runs/exp1/step_00000500 full.pt\n"
        "  ckptstore export runs/exp1 model.safetensors --only model --dtype bf16\n"
        "  ckptstore export s3://my-bucket/runs/exp1 --step 500 optim.pt --only optim\n\n"
        "--only PREFIX keeps the keys under PREFIX and removes the prefix: --only model\n"
        "gives the model's state_dict as saved (model.load_state_dict() takes it);\n"
        "--keep-prefix keeps the full keys. .pt keeps the nesting and every Python value\n"
        "(loads with torch.load(path, weights_only=True)); .safetensors holds tensors\n"
        "only, under dotted keys (tensors that share memory, such as tied weights, are\n"
        "written under each of their keys). --dtype casts float16/bfloat16/float32/\n"
        "float64 tensors only (not fp8, integer or complex ones).\n"
        "The whole selection is held in memory.",
    )
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("out", metavar="OUT", help="a .pt or .safetensors path (or an s3:// URL)")
    p.add_argument("--step", type=_int_at_least(0), metavar="N", help="checkpoint N of ROOT")
    p.add_argument("--only", metavar="PREFIX", help="only keys under PREFIX (e.g. model)")
    p.add_argument("--keep-prefix", action="store_true", help="with --only: keep the full keys")
    from ckptstore.convert import DTYPES, FORMATS

    p.add_argument(
        "--dtype", choices=sorted(DTYPES), metavar="DTYPE", help="bf16, fp16, fp32, fp64"
    )
    p.add_argument("--format", choices=FORMATS, help="default: from OUT's suffix")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--jobs", type=_int_at_least(1), metavar="N", help="threads (default: cores)")

    p = command(
        "import",
        "bring a torch.save (.pt) or safetensors file in as a committed checkpoint",
        "  ckptstore import old/checkpoint_epoch3.pt runs/exp1 --step 3000\n"
        "  ckptstore import model.safetensors s3://my-bucket/models/gpt\n\n"
        "The file is read with torch.load(weights_only=True): tensors, numbers,\n"
        "strings, lists and dicts, nothing that runs code. It must hold a dict (a\n"
        "state_dict, or {'model': ..., 'optimizer': ..., 'epoch': ...}). An existing\n"
        "step is never overwritten.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--step", type=_int_at_least(0), default=0, metavar="N", help="default: 0")
    p.add_argument("--codec", choices=("auto", "none", "zstd"), default="auto")
    p.add_argument("--format", choices=("pt", "safetensors"), help="default: from the suffix")

    p = command(
        "prune",
        "delete checkpoints a retention policy does not keep (prints what it would delete; "
        "deletes only with --yes)",
        "  ckptstore prune runs/exp1 --keep-last 3\n"
        "  ckptstore prune runs/exp1 --keep-last 2 --keep-best 1 --metric val_loss --yes\n"
        "  ckptstore prune s3://my-bucket/runs/exp1 --keep-every-steps 1000 --keep-final\n\n"
        "The decision is the CheckpointManager's, from the manifests. A training run\n"
        "with backup= spares checkpoints still uploading; this command cannot know\n"
        "about those: prune a root while its run is not saving into it.",
    )
    p.add_argument("root", metavar="ROOT")
    _retention_options(p, for_ls=False)
    p.add_argument("--yes", action="store_true", help="delete (default: only show)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    for name, src, dst, help_, ex in (
        (
            "sync",
            "LOCAL",
            "REMOTE",
            "copy the committed checkpoints REMOTE lacks from LOCAL to REMOTE",
            "  ckptstore sync runs/exp1 s3://my-bucket/runs/exp1\n"
            "  ckptstore sync runs/exp1 s3://my-bucket/runs/exp1 --latest\n",
        ),
        (
            "pull",
            "REMOTE",
            "LOCAL",
            "copy the committed checkpoints LOCAL lacks from REMOTE to LOCAL",
            "  ckptstore pull s3://my-bucket/runs/exp1 runs/exp1 --latest\n"
            "  ckptstore pull s3://my-bucket/runs/exp1 runs/exp1 --replace-damaged\n",
        ),
    ):
        p = command(
            name,
            help_,
            ex + "\nEvery file is checked against its manifest on the way (uploads are read\n"
            "back); a copy becomes visible only once complete, so an interrupted run\n"
            "leaves nothing committed and running it again copies what is still missing.\n"
            "Uncommitted checkpoints are never copied, and a checkpoint already at the\n"
            "destination is never overwritten: if its copy there is damaged it is\n"
            "reported (exit 1), and replaced only with --replace-damaged. On an object\n"
            "store, a copy that was killed half-way leaves files under the checkpoint's\n"
            "name: they are removed once older than --grace-s. Works between any two\n"
            "roots (local or s3://).",
        )
        p.add_argument("src", metavar=src)
        p.add_argument("dst", metavar=dst)
        p.add_argument(
            "--step",
            type=_int_at_least(0),
            action="append",
            metavar="N",
            help="only step N (repeatable)",
        )
        p.add_argument("--latest", action="store_true", help="only the newest checkpoint")
        p.add_argument(
            "--verify-existing",
            action="store_true",
            help="read every byte of checkpoints already at the destination (default: "
            "compare manifests and file sizes)",
        )
        p.add_argument(
            "--replace-damaged",
            action="store_true",
            help="replace a damaged copy at the destination with the source's",
        )
        p.add_argument(
            "--grace-s",
            type=float,
            metavar="S",
            help="on an object store, files of a dead copy older than S are removed to make "
            "room (default 3600; 0 once nothing else writes there)",
        )
        p.add_argument("--dry-run", action="store_true", help="show what would be copied")
        p.add_argument("--jobs", type=_int_at_least(1), metavar="N", help="files in parallel")

    p = command(
        "gc",
        "remove leftovers of dead saves: temp directories, uncommitted object-store "
        "prefixes older than the grace period, stale multipart uploads",
        "  ckptstore gc runs/exp1\n"
        "  ckptstore gc s3://my-bucket/runs/exp1 --grace-s 7200\n\n"
        "On local disk a live save holds a lock on its temp directory and is never\n"
        "removed, whatever its age. Object stores have no locks: an uncommitted prefix or\n"
        "multipart upload is removed once older than --grace-s (default 3600 s there,\n"
        "60 s on local disk): make it longer than your slowest save.",
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--grace-s", type=float, metavar="S", help="age a leftover must reach")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    command(
        "train",
        "train a GPT-style model, checkpointed by ckptstore (ckptstore train --help)",
        "  ckptstore train --size medium --steps 2000 --save-every 100 --keep-last 2",
    )
    command(
        "bench",
        "save/load benchmarks against torch.save, safetensors and DCP (ckptstore bench --help)",
        "  ckptstore bench --size 250MB --runs 3\n  ckptstore bench --smoke",
    )
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
    if args_list and args_list[0] == "train":
        # The training loop parses its own options (ckptstore train --help).
        from ckptstore.train.loop import main as train

        return train(args_list[1:])
    parser = build_parser()
    if not args_list:
        parser.print_help()
        return USAGE
    if args_list[0] == "bench":
        # The suite parses its own options (ckptstore bench --help).
        from ckptstore.bench.suite import main as bench

        return bench(args_list[1:])
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else USAGE
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
        return OK
    except CkptStoreError as exc:  # the engine's messages say what to do next
        print(f"ckptstore {args.command}: error: {exc}", file=sys.stderr)
        return FAILED
    except OSError as exc:
        print(
            f"ckptstore {args.command}: error: {exc}; check the path, its permissions and "
            "that the storage is reachable, then run it again",
            file=sys.stderr,
        )
        return FAILED


def _dispatch(args: argparse.Namespace) -> int:
    from ckptstore.cli import inspect as cli_inspect
    from ckptstore.cli import ops as cli_ops

    command = args.command
    if command == "ls":
        return cli_inspect.cmd_ls(args, cli_ops.forever_parts(args))
    if command == "info":
        return cli_inspect.cmd_info(args)
    if command == "verify":
        return cli_inspect.cmd_verify(args)
    if command == "export":
        return cli_ops.cmd_export(args)
    if command == "import":
        return cli_ops.cmd_import(args)
    if command == "prune":
        return cli_ops.cmd_prune(args)
    if command == "sync":
        return cli_ops.cmd_transfer(args, args.src, args.dst)
    if command == "pull":
        return cli_ops.cmd_transfer(args, args.src, args.dst)
    if command == "gc":
        return cli_ops.cmd_gc(args)
    raise CliError(f"unknown command {command!r}; ckptstore --help lists them", USAGE)


if __name__ == "__main__":
    sys.exit(main())
