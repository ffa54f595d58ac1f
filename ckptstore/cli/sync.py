"""``ckptstore sync`` (and ``pull``, its mirror image): copy the committed checkpoints one
root lacks from another, verified and resumable, between any two roots (local or s3://).

A copy becomes visible only once complete, a checkpoint at the destination is never
overwritten (a damaged one is replaced only with ``--replace-damaged``), and what was
copied stays when a run is interrupted. ``pull`` (:mod:`ckptstore.cli.pull`) is the same
command with the roles of its arguments named the other way.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptstore.cli._common import (
    FAILED,
    OK,
    int_at_least,
    is_url,
    manifest_key,
    note,
    open_root,
    other_checkpoints,
    refuse_parts,
    size,
    usage_error,
    writer_lease,
)
from ckptstore.engine.listing import CheckpointInfo, list_checkpoints, read_manifest
from ckptstore.errors import (
    CheckpointExistsError,
    CkptStoreError,
    CliError,
    CopyStoppedError,
    without_verify_hint,
)
from ckptstore.format.manifest import Manifest
from ckptstore.layout import FINALS_FILE, MANIFEST_FILE
from ckptstore.linking import forget_damaged
from ckptstore.manager import pointer
from ckptstore.progress import Progress
from ckptstore.storage import StorageBackend
from ckptstore.transfer import copy_checkpoint, moved, replace_checkpoint

TRANSFER_NOTES = (
    "\nEvery file is checked against its manifest on the way (uploads are read\n"
    "back); a copy becomes visible only once complete, so an interrupted run\n"
    "leaves nothing committed and running it again copies what is still missing.\n"
    "Uncommitted checkpoints are never copied, and a checkpoint already at the\n"
    "destination is never overwritten: if its copy there is damaged it is\n"
    "reported (exit 1), and replaced only with --replace-damaged. On an object\n"
    "store, a copy that was killed half-way leaves files under the checkpoint's\n"
    "name: they are removed once older than --grace-s. Works between any two\n"
    "roots (local or s3://)."
)

EXAMPLES = (
    "  ckptstore sync runs/exp1 s3://my-bucket/runs/exp1\n"
    "  ckptstore sync runs/exp1 s3://my-bucket/runs/exp1 --latest\n" + TRANSFER_NOTES
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_transfer_arguments(p, src="LOCAL", dst="REMOTE")


def add_transfer_arguments(p: argparse.ArgumentParser, *, src: str, dst: str) -> None:
    """The options of ``sync`` and ``pull``; ``src`` and ``dst`` name their arguments."""
    p.add_argument("src", metavar=src)
    p.add_argument("dst", metavar=dst)
    p.add_argument(
        "--step",
        type=int_at_least(0),
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
        help="replace a damaged copy at the destination with the source's (on a local "
        "destination, every byte of the copies there is read to find the damage, as with "
        "--verify-existing)",
    )
    p.add_argument(
        "--grace-s",
        type=float,
        metavar="S",
        help="on an object store, files of a dead copy older than S are removed to make "
        "room (default 3600; 0 once nothing else writes there)",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would be copied")
    p.add_argument("--jobs", type=int_at_least(1), metavar="N", help="files in parallel")


def run(args: argparse.Namespace) -> int:
    return transfer(args)


def existing_problems(
    src: StorageBackend, dst: StorageBackend, info: CheckpointInfo, full: bool, threads: int
) -> tuple[str, list[str]]:
    """Whether ``dst``'s copy of ``info`` is the same checkpoint, intact.

    Returns ("ok" | "damaged" | "different", problems). Cheap by default: the manifest is
    read and compared with the source's, and every file's presence and size checked;
    ``full`` reads every byte (``verify``).
    """
    try:
        theirs = read_manifest(dst, info.name, manifest_key=manifest_key())
    except CkptStoreError as exc:
        return "damaged", [without_verify_hint(str(exc))]
    if not theirs.same_checkpoint(info.manifest):
        unknown = "(not recorded)"
        runs = f"run {theirs.run_id or unknown} there, {info.manifest.run_id or unknown} here"
        return "different", [
            f"{dst.url}/{info.name} holds a different checkpoint than {info.url} (other "
            f"files or checksums, or another run: {runs})"
        ]
    if full:
        from ckptstore.engine.ops import verify  # torch: imported only to verify

        with ThreadPoolExecutor(threads, thread_name_prefix="ckptstore-verify") as pool:
            problems = verify(dst, info.name, pool, manifest_key=manifest_key())
        return ("damaged" if problems else "ok"), [without_verify_hint(p) for p in problems]
    problems = []
    for file_name, entry in sorted(theirs.files.items()):
        where = f"{dst.url}/{info.name}/{file_name}"
        try:
            with dst.open_reader(f"{info.name}/{file_name}") as reader:
                if reader.size != entry.size_bytes:
                    problems.append(
                        f"{where}: {reader.size} B, the manifest says {entry.size_bytes} B"
                    )
        except FileNotFoundError:
            problems.append(f"{where}: file is missing")
    return ("damaged" if problems else "ok"), problems


def transfer(args: argparse.Namespace) -> int:
    """``sync`` and ``pull``: copy the committed checkpoints that ``args.dst`` lacks from
    ``args.src``."""
    src_url, dst_url = args.src, args.dst
    src = open_root(src_url, root_only=True)
    # a dry run changes nothing: a missing local destination is not created
    dst = open_root(dst_url, create=not is_url(dst_url) and not args.dry_run, must_exist=False)
    refused = "stop that run first, or copy into another directory"
    taken: list[bool] = []
    with contextlib.ExitStack() as held:

        def before_writing() -> None:
            """The destination's writer lease, at the first write (a run's next saves
            would collide with what is copied in); none where nothing is written."""
            if not taken:
                held.enter_context(writer_lease(dst, refused))
                taken.append(True)

        return _transfer(args, src, dst, before_writing)


def _transfer(
    args: argparse.Namespace,
    src: StorageBackend,
    dst: StorageBackend,
    before_writing: Callable[[], None],
) -> int:
    src_url = args.src
    infos = every = list_checkpoints(src, manifest_key=manifest_key())
    if args.step:
        wanted = set(args.step)
        missing = sorted(wanted - {i.manifest.step for i in infos if i.manifest.step is not None})
        if missing:
            raise usage_error(
                f"no committed checkpoint for step(s) {missing} under {src.url}; ckptstore ls "
                f"{src_url} lists them"
            )
        infos = [i for i in infos if i.manifest.step in wanted]
    elif args.latest:
        infos = infos[-1:]
    if not infos:
        named = other_checkpoints(src)
        if named:  # (a backup job must not report success copying nothing)
            raise CliError(
                f"{src.url} holds {len(named)} checkpoint(s) named as Lightning names them "
                f"({', '.join(named[:3])}{' ...' if len(named) > 3 else ''}) and no step_N "
                "ones: sync and pull copy a run's step_N checkpoints only, not these (yet); "
                "save such a run straight to the bucket (ModelCheckpoint(dirpath='s3://...'))"
            )
        print(f"no committed checkpoints under {src.url}: nothing to copy")
        return OK
    refuse_parts(args.command, src, infos, dst)
    threads = int(args.jobs or 8)  # files in parallel: I/O-bound
    copied: list[str] = []
    replaced: list[str] = []  # damaged there, copied over (--replace-damaged)
    failed: list[str] = []
    planned: list[str] = []
    leftovers = _clear_leftovers(args, dst, infos, before_writing)
    there: set[tuple[int, str]] | None = None  # (dry run) the shard files dst will hold
    stop = threading.Event()
    damaged: set[str] = set()  # "<checkpoint>/<file>" there that a copy found damaged
    left_damaged: list[str] = []  # found damaged there by the check below, not replaced
    present: list[str] = []  # there and intact, as far as the check below reads
    for info in infos:
        replace = False
        if info.name in leftovers:
            print(
                f"UNCOMMITTED {info.name}: {dst.url}/{info.name} holds files but no manifest, "
                f"written less than {leftovers[info.name]:g} s ago (an interrupted copy, or a save "
                "in progress); not copied. If nothing is writing there, rerun with --grace-s 0 "
                "to remove them and copy"
            )
            failed.append(info.name)
            continue
        if dst.exists(f"{info.name}/{MANIFEST_FILE}"):
            # Damage to replace is found by reading every byte (local: a local read)
            full = args.verify_existing or (args.replace_damaged and dst.capabilities.local)
            state, problems = existing_problems(src, dst, info, full, threads)
            if state == "ok":
                print(f"present  {info.name}")
                present.append(info.name)
                continue
            if state == "different":
                print(f"DIFFERENT {info.name}: {'; '.join(problems[:3])}")
                print(
                    "         ckptstore never overwrites a checkpoint: copy into another "
                    "root, or delete that one first"
                )
                failed.append(info.name)
                continue
            if not args.replace_damaged:
                print(f"DAMAGED  {info.name}: {'; '.join(problems[:3])}")
                left_damaged.append(info.name)
                continue
            replace = True
        if args.dry_run:
            verb = "would replace" if replace else "would copy"
            if there is None:  # (read once: the destination's files, and those planned)
                there = shard_files(
                    [
                        i
                        for i in list_checkpoints(dst, manifest_key=manifest_key())
                        if i.name not in left_damaged  # (a real run would not link from them)
                    ]
                )
            print(f"{verb} {info.name} ({would_move(info.manifest, there)})")
            planned.append(info.name)
            continue
        progress = Progress(
            f"{'replacing' if replace else 'copying'} {info.name}", 0, enabled=sys.stderr.isatty()
        )
        start = time.monotonic()
        before_writing()
        try:
            with _stop_on_ctrl_c(stop):
                # A replace copies beside the damaged one first: never neither of them.
                manifest = (replace_checkpoint if replace else copy_checkpoint)(
                    src,
                    dst,
                    info.name,
                    threads=threads,
                    progress=progress,
                    stop=stop,
                    manifest_key=manifest_key(),
                    damaged=damaged,
                )
        except CopyStoppedError:
            print(f"STOPPED  {info.name}: interrupted; nothing of it was committed")
            print(
                f"{len(copied) + len(replaced)} copied before the interruption; run the same "
                "command again to copy the rest"
            )
            return 130
        except CheckpointExistsError as exc:
            if dst.exists(f"{info.name}/{MANIFEST_FILE}"):
                print(f"present  {info.name} (written there meanwhile)")
                present.append(info.name)
                continue
            print(f"FAILED   {info.name}: {exc}")  # something that is not a checkpoint
            failed.append(info.name)
            continue
        except CkptStoreError as exc:
            print(f"FAILED   {info.name}: {exc}")
            failed.append(info.name)
            continue
        (replaced if replace else copied).append(info.name)
        forget_damaged(damaged, info.name)  # (replaced)
        elapsed = time.monotonic() - start
        # An object store has no rename: a replace sends its files beside the damaged
        # copy, then again under its name (replace_checkpoint); the bytes count both
        twice = "; sent twice: beside the old copy, then in its place" if replace and not dst.capabilities.local else ""  # fmt: skip
        print(
            f"{'replaced' if replace else 'copied':8} {info.name} ({moved(manifest, progress)}"
            f"{twice}, in {elapsed:.1f} s, verified)"
        )
        sys.stdout.flush()
    if copied or replaced:
        _housekeeping(src, dst)
    found = _report_damaged(damaged, {*left_damaged, *failed}, dst)
    bad = left_damaged + [n for n in found if n not in left_damaged and n not in failed]
    intact = len([n for n in present if n not in found])  # (found damaged after all)
    there_bad = f", {len(bad)} damaged there" if bad else ""
    if args.dry_run:
        print(
            f"dry run: {len(planned)} to copy, {intact} already there{there_bad}, "
            f"{len(failed)} in the way, from {src.url} to {dst.url}; nothing copied"
        )
    else:
        fixed = f", {len(replaced)} replaced" if replaced else ""
        print(
            f"{len(copied)} copied{fixed}, {intact} already there{there_bad}, {len(failed)} "
            f"failed, from {src.url} to {dst.url}"
        )
    if bad:
        _advise_repair(args, bad, every, src, dst)
    if failed and not args.dry_run:
        print(
            "not copied: " + ", ".join(failed) + ". Rerun the same command after fixing the "
            "cause: what was copied stays, and nothing partial is ever committed"
        )
    return FAILED if failed or bad else OK


def _report_damaged(damaged: set[str], reported: set[str], dst: StorageBackend) -> list[str]:
    """Name the checkpoints at the destination that a copy found a damaged file in (a
    linked file's copy there, read before it was copied inside the store, or read back
    after a link), but those the check before it reported (``reported``): a check of
    their sizes alone calls them present. The copies this run made did not use them.
    Returns their names (those this run replaced are no longer in ``damaged``)."""
    by_name: dict[str, list[str]] = {}
    for at in sorted(damaged):
        name, _, file = at.partition("/")
        by_name.setdefault(name, []).append(file)
    for name, files in by_name.items():
        if name not in reported:
            print(f"DAMAGED  {name}: {dst.url}/{name}/{files[0]} is damaged"
                  + (f" (and {len(files) - 1} more of its files)" if len(files) > 1 else "")
                  + " (found by a copy that links it; a check of sizes alone passes it); "
                  "this run's copies did not use it")  # fmt: skip
    return list(by_name)


def _advise_repair(
    args: argparse.Namespace,
    bad: list[str],
    infos: list[CheckpointInfo],
    src: StorageBackend,
    dst: StorageBackend,
) -> None:
    """The command that replaces the damaged checkpoints at the destination (``bad``)
    with the source's copies: this one, with --verify-existing --replace-damaged, and the
    steps named where this run was limited to some (--step, --latest)."""
    steps = {i.name: i.manifest.step for i in infos}
    held = [n for n in bad if n in steps]
    lacking = [n for n in bad if n not in steps]
    if held:
        named = ""
        if args.step or args.latest:
            named = "".join(f" --step {steps[n]}" for n in held if steps[n] is not None)
        command = getattr(args, "command", None) or "sync"
        print(
            f"damaged there: {', '.join(held)}; to replace them with the copies from "
            f"{src.url}: ckptstore {command} {shlex.quote(args.src)} {shlex.quote(args.dst)}"
            f"{named} --verify-existing --replace-damaged"
        )
    if lacking:
        print(
            f"damaged there, and not in {src.url}: {', '.join(lacking)} (`ckptstore verify "
            f"{dst.url}` names every damaged checkpoint there)"
        )


@contextlib.contextmanager
def _stop_on_ctrl_c(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl+C stops the copy in progress cleanly (its files are removed, nothing
    is committed); a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        note("stopping: the checkpoint being copied is discarded (Ctrl+C again: at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def shard_files(infos: list[CheckpointInfo]) -> set[tuple[int, str]]:
    """The (size, index checksum) of every shard file of ``infos``: what a linked file
    (incremental saves) is recognised by when copied."""
    return set().union(*(shard_files_of(i.manifest) for i in infos))


def would_move(manifest: Manifest, there: set[tuple[int, str]]) -> str:
    """What copying ``manifest``'s checkpoint would send, given the shard files the
    destination holds by then (``there``, which this adds its own to): its linked files
    found there are linked, not sent."""
    linkable = [
        e
        for f, e in manifest.files.items()
        if f in manifest.linked and (e.size_bytes, e.xxh3_64) in there
    ]
    there |= shard_files_of(manifest)
    if not linkable:
        return size(manifest.stored_bytes)
    linked = sum(e.size_bytes for e in linkable)
    return f"{size(manifest.stored_bytes - linked)} to copy, {size(linked)} to link"


def shard_files_of(manifest: Manifest) -> set[tuple[int, str]]:
    return {(e.size_bytes, e.xxh3_64) for e in manifest.files.values() if e.kind == "shard"}


def _clear_leftovers(
    args: argparse.Namespace,
    dst: StorageBackend,
    infos: list[CheckpointInfo],
    before_writing: Callable[[], None],
) -> dict[str, float]:
    """Make room for the checkpoints to copy where an earlier copy died half-way.

    On an object store a copy writes under the checkpoint's own name, and a copy that
    died (killed, network lost) leaves files there without a manifest, which a new copy
    may not overwrite. Those older than the grace period are removed, as ``gc`` does;
    younger ones may belong to a copy or save still running. Returns the names still
    blocked, with the grace period. (On local disk a copy writes into a temp directory,
    so nothing is in the way.)
    """
    if dst.capabilities.local or args.dry_run:
        return {}
    names = set(dst.list_names())
    wanted = [
        i.name for i in infos if i.name in names and not dst.exists(f"{i.name}/{MANIFEST_FILE}")
    ]
    if not wanted:
        return {}
    grace = 3600.0 if args.grace_s is None else args.grace_s
    before_writing()
    for removed in dst.sweep(grace):
        print(f"removed  {removed} (uncommitted, older than {grace:g} s)")
    names = set(dst.list_names())
    return {n: grace for n in wanted if n in names}


def _housekeeping(src: StorageBackend, dst: StorageBackend) -> None:
    """After copying: ``dst``'s ``latest`` names its newest checkpoint, and checkpoints
    that ended a completed run (``finals``) are marked there too."""
    try:
        names = [i.name for i in list_checkpoints(dst, manifest_key=manifest_key())]
        if names:
            pointed = pointer.read_latest(dst)
            if pointed is None or pointed not in names or pointed < names[-1]:
                pointer.write_latest(dst, names[-1])
        finals = pointer.read_lines(dst, FINALS_FILE)
        more = [n for n in pointer.read_lines(src, FINALS_FILE) if n in names]
        merged = finals + [n for n in more if n not in finals]
        if merged != finals:
            pointer.put(dst, FINALS_FILE, ("\n".join(merged) + "\n").encode())
    except CkptStoreError as exc:
        note(f"could not update the pointers under {dst.url}: {exc}")
