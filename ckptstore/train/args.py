"""The reference training loop's command line: ``ckptstore train`` (or ``python -m
ckptstore.train``) flags, and their checks (a wrong flag exits 2 naming it)."""

from __future__ import annotations

import argparse
import os
import re
import sys

from ckptstore.train.model import MODEL_SIZES
from ckptstore.train.parsing import OneLineErrors

EXAMPLES = """examples:
  {prog}                                  # 300 steps; checkpoints in runs/gpt
  {prog} --steps 2000 --save-every 100 --keep-last 2 --keep-best 1
  {prog} --backup s3://my-bucket/runs/gpt --codec zstd
  {prog} --freeze-blocks --incremental     # fine-tuning: unchanged bytes linked
  {prog} --resume 200 --discard-newer      # go on from step 200 as a new branch
  torchrun --nproc_per_node=2 -m ckptstore.train --steps 500
defaults: --size small, --steps 300, --save-every 50, --keep-last 3,
  --eval-every 50, --ckpt-dir runs/gpt, --resume latest, --codec auto"""


def _place(url: str) -> str:
    """Where a --ckpt-dir or --backup points: a URL without its trailing slash, a local
    path resolved (symlinks too)."""
    url = url.removeprefix("file://").removeprefix("local://")
    return url.rstrip("/") if "://" in url else os.path.realpath(os.path.expanduser(url))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    launcher = sys.argv[0].replace(os.sep, "/")  # `ckptstore train` forwards here too
    via_cli = launcher.endswith(("/ckptstore", "ckptstore/__main__.py"))
    prog = "ckptstore train" if via_cli else "python -m ckptstore.train"
    ap = OneLineErrors(
        prog=prog,
        description="Train a GPT-style model on text, checkpointed by ckptstore.",
        epilog=EXAMPLES.format(prog=prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = ap.add_argument_group("run")
    g.add_argument("--size", default="small", choices=sorted(MODEL_SIZES), help="model size")
    g.add_argument("--steps", type=int, default=None, help="total steps (default 300)")
    g.add_argument("--epochs", type=int, default=None, help="total epochs (instead of --steps)")
    g.add_argument("--batch-size", type=int, default=8, help="per process")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--warmup", type=int, default=20, help="warmup steps")
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    g.add_argument("--data", default=None, help="a text file (default: Python's help text)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--eval-every",
        type=int,
        default=50,
        help="validation every N steps and at the last one (default 50; 0: never)",
    )
    g.add_argument("--eval-batches", type=int, default=4)
    g.add_argument("--log-every", type=int, default=25, help="a progress line every N steps")
    g.add_argument(
        "--freeze-blocks",
        action="store_true",
        help="fine-tune: the transformer blocks stay as they are (most of the state); "
        "only the embeddings and the final norm train (with --incremental, each save "
        "then writes little)",
    )
    c = ap.add_argument_group("checkpointing")
    c.add_argument("--ckpt-dir", default="runs/gpt", help="local checkpoint directory or URL")
    c.add_argument("--save-every", type=int, default=50, metavar="STEPS", help="0: off")
    c.add_argument("--save-every-s", type=float, default=0, metavar="SECONDS", help="0: off")
    c.add_argument("--keep-last", type=int, default=3, metavar="N", help="0: keep all")
    c.add_argument("--keep-every-epoch", action="store_true", help="keep each epoch's end")
    c.add_argument("--keep-best", type=int, default=0, metavar="N", help="by validation loss")
    c.add_argument("--no-checkpoint", action="store_true", help="save nothing")
    c.add_argument(
        "--resume", default="latest", help="latest (default), best, a step, a path, or none"
    )
    c.add_argument(
        "--discard-newer",
        action="store_true",
        help="when --resume picks a checkpoint older than others there (or none with "
        "checkpoints there), move the newer ones aside as step_N.retired-<time> (not "
        "deleted) and train on as a new branch; without it the run stops before training",
    )
    c.add_argument("--backup", default=None, help="back checkpoints up to this URL (s3://...)")
    c.add_argument("--codec", default="auto", choices=["auto", "none", "zstd"])
    c.add_argument(
        "--incremental",
        action="store_true",
        help="write only tensors that changed since the last save; the rest is linked "
        "from it (hard links on local disk, copies inside the store on S3)",
    )
    c.add_argument(
        "--full-every",
        type=int,
        default=None,
        metavar="N",
        help="with --incremental: every Nth save writes everything (default 10; 0: never)",
    )
    c.add_argument(
        "--trust-version-counters",
        action="store_true",
        help="with --incremental: a large CPU tensor found unchanged is hashed after "
        "the save returns, not before (the loop waits less; a write that bypasses "
        "torch's version counter then fails that save; no effect on GPU tensors)",
    )
    ap.add_argument("--report", default=None, help=argparse.SUPPRESS)  # JSON, for tests
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps is not None and args.epochs is not None:
        ap.error("give --steps or --epochs, not both")
    for name in ("ckpt_dir", "backup", "data"):
        if getattr(args, name) is not None and not getattr(args, name).strip():
            ap.error(f"--{name.replace('_', '-')} must not be empty")
    for name in ("ckpt_dir", "backup"):  # s3:/bucket: taken for a local path ./s3:/bucket
        value = getattr(args, name)
        typo = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)", value) if value else None
        if typo:
            root = "/" if typo[1] == "file" else ""  # (file:///abs/path)
            fixed = f"{typo[1]}://{root}{value[typo.end() :]}"
            ap.error(f"--{name.replace('_', '-')} {value}: a URL needs two slashes: {fixed}")
    if args.backup is not None:
        mine, theirs = (_place(v) for v in (args.ckpt_dir, args.backup))
        if mine == theirs or theirs.startswith(mine + "/") or mine.startswith(theirs + "/"):
            what = "--ckpt-dir itself" if mine == theirs else "nested with --ckpt-dir"
            ap.error(
                f"--backup {args.backup} is {what} ({args.ckpt_dir}): a backup is a copy "
                "somewhere else, another disk or a bucket (s3://...); give another "
                "--backup, or leave it out"
            )
    for name in ("steps", "epochs", "batch_size", "eval_batches", "log_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in (
        "save_every",
        "save_every_s",
        "keep_last",
        "keep_best",
        "warmup",
        "eval_every",
        "clip",
        "lr",
        "full_every",
    ):
        value = getattr(args, name)
        if value is not None and not 0 <= value < float("inf"):  # NaN and inf too
            ap.error(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
    if not 0 <= args.seed < 2**32:  # (numpy's and Python's generators are seeded with it)
        ap.error(f"--seed must be between 0 and {2**32 - 1}, got {args.seed}")
    for flag, given in (
        ("--full-every", args.full_every is not None),
        ("--trust-version-counters", args.trust_version_counters),
    ):
        if given and not args.incremental:
            ap.error(f"{flag} is about incremental saves: add --incremental")
    if args.no_checkpoint:  # each would be ignored without a word
        for flag, given in (
            ("--incremental", args.incremental),
            ("--keep-every-epoch", args.keep_every_epoch),
            ("--keep-best", args.keep_best > 0),
        ):
            if given:
                ap.error(f"{flag} is about saving, and --no-checkpoint saves nothing: drop one")
    if args.keep_best and args.eval_every == 0:  # (no metric ever: nothing would be kept)
        ap.error(
            "--keep-best keeps the checkpoints with the best validation loss, and "
            "--eval-every 0 never validates: drop one"
        )
    return args
