"""``ckptstore export``, ``import``, ``prune``, ``sync``, ``pull`` and ``gc``: commands that
write. Each one refuses to overwrite a committed checkpoint or an existing file unless
told to, and says what it did (or would do) on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ckptstore
from ckptstore.cli._common import (
    FAILED,
    OK,
    CliError,
    emit_json,
    is_url,
    local_path,
    manifest_key,
    note,
    open_root,
    resolve_checkpoint,
    size,
    status,
    table,
    usage_error,
)
from ckptstore.convert import (
    DTYPES,
    convert_dtype,
    file_format,
    flat_tensors,
    local_input,
    local_output,
    output_exists,
    read_checkpoint,
    read_file,
    write_file,
)
from ckptstore.engine.ops import CheckpointInfo, list_checkpoints, read_manifest, verify
from ckptstore.errors import CheckpointExistsError, CkptStoreError, ExportError
from ckptstore.layout import FINALS_FILE, LATEST_FILE, MANIFEST_FILE, checkpoint_name
from ckptstore.manager import retention
from ckptstore.manager.policies import (
    AnyOf,
    KeepBest,
    KeepEvery,
    KeepFinal,
    KeepLast,
    RetentionPolicy,
)
from ckptstore.storage import StorageBackend
from ckptstore.transfer import CopyStoppedError, Progress, copy_checkpoint


def _threads(args: argparse.Namespace) -> int:
    return int(args.jobs or min(8, os.cpu_count() or 1))


# ---- export / import ----------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    fmt = _usage(lambda: file_format(args.out, args.format))
    dtype = None
    if args.dtype is not None:
        dtype = DTYPES[args.dtype]
    backend, name = resolve_checkpoint(args.ckpt, args.step, what="export")
    if not args.force and output_exists(args.out):  # before reading gigabytes
        raise CliError(_exists_message(args.out))
    start = time.monotonic()
    status(f"reading {backend.url}/{name}")
    with ThreadPoolExecutor(_threads(args), thread_name_prefix="ckptstore-codec") as pool:
        try:
            exported = read_checkpoint(
                backend,
                name,
                only=args.only,
                keep_prefix=args.keep_prefix,
                pool=pool,
                manifest_key=manifest_key(),
            )
        except ExportError as exc:
            raise usage_error(str(exc)) from None
        finally:
            status(None)
    obj = exported.obj
    converted = 0
    if dtype is not None:
        obj, converted = convert_dtype(obj, dtype)
    skipped: list[str] = []
    if fmt == "safetensors":
        _, skipped = flat_tensors(obj)
    source = f"{backend.url}/{name}"
    header = {"format": "pt", "ckptstore_source": source}
    if exported.manifest.step is not None:
        header["ckptstore_step"] = str(exported.manifest.step)
    try:
        with local_output(args.out, overwrite=args.force) as tmp:
            status(f"writing {args.out}")
            count = write_file(obj, tmp, fmt, header)
            written = os.path.getsize(tmp)
    except FileExistsError:
        raise CliError(_exists_message(args.out)) from None
    finally:
        status(None)
    parts = [f"wrote {args.out}: {count} tensor(s), {size(written)}, from {source}"]
    if exported.stripped is not None:
        parts.append(f"keys under {exported.stripped!r} with that prefix removed")
    if converted:
        parts.append(f"{converted} floating tensor(s) cast to {str(dtype).removeprefix('torch.')}")
    print("; ".join(parts) + f" ({time.monotonic() - start:.1f} s)")
    if skipped:
        shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        note(
            f"safetensors holds tensors only: {len(skipped)} non-tensor value(s) left out "
            f"({shown}); export to .pt to keep them"
        )
    return OK


def _exists_message(out: str) -> str:
    return f"{out} already exists: pass --force to replace it, or choose another name"


def cmd_import(args: argparse.Namespace) -> int:
    fmt = _usage(lambda: file_format(args.file, args.format))
    if not is_url(args.file) and not os.path.isfile(local_path(args.file)):
        raise usage_error(f"{args.file}: no such file; check the path")
    # The destination first: a taken step fails before a large file is read.
    backend = open_root(args.root, create=True)
    name = checkpoint_name(args.step)
    existing = list_checkpoints(backend, manifest_key=manifest_key())
    if backend.exists(f"{name}/{MANIFEST_FILE}"):
        newest = existing[-1].manifest.step if existing else args.step
        raise CliError(
            f"{backend.url}/{name} already exists and ckptstore never overwrites a checkpoint: "
            f"pass --step N with a step not taken (the newest is {newest}; "
            f"--step {int(newest or 0) + 1} is free), or import into another root"
        )
    metadata: dict[str, Any] = {
        "imported_from": os.path.basename(args.file.rstrip("/")),
        "imported_format": "torch.save" if fmt == "pt" else "safetensors",
    }
    start = time.monotonic()
    try:
        with local_input(args.file) as local:
            status(f"reading {args.file}")
            state, header = read_file(local, fmt, shown=args.file)
            if header:
                metadata["safetensors_metadata"] = header
            status(f"saving {backend.url}/{name}")
            info = ckptstore.save(
                state, f"{backend.url}/{name}", step=args.step, codec=args.codec, metadata=metadata
            )
    except FileNotFoundError as exc:
        if isinstance(exc, CkptStoreError):
            raise
        raise usage_error(f"{args.file}: no such file; check the path") from None
    except ExportError as exc:
        raise CliError(str(exc)) from None
    except CheckpointExistsError as exc:
        raise CliError(f"{exc}; pass --step N with a step not taken") from None
    finally:
        status(None)
    if not existing or (existing[-1].manifest.step or 0) < args.step:
        # The newest checkpoint: the `latest` pointer names it, as after any save.
        backend.put_atomic(LATEST_FILE, f"{name}\n".encode())
    m = info.manifest
    print(
        f"imported {args.file} as {info.url}: {len(flat_tensors(state)[0])} tensor(s), "
        f"{size(m.raw_bytes)} raw, {size(m.stored_bytes)} stored ({m.codec.get('id')}, "
        f"ratio {m.ratio:.3f}) in {time.monotonic() - start:.1f} s"
    )
    return OK


def _usage(fn: Any) -> Any:
    try:
        return fn()
    except ExportError as exc:
        raise usage_error(str(exc)) from None


# ---- prune --------------------------------------------------------------------------
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


def cmd_prune(args: argparse.Namespace) -> int:
    parts = retention_parts(args)
    if not parts:
        raise usage_error(
            "prune needs a retention policy: e.g. --keep-last 3, --keep-every-steps 1000, "
            "--keep-every-epoch, --keep-best 1 --metric val_loss, --keep-final"
        )
    policy: RetentionPolicy = parts[0][1] if len(parts) == 1 else AnyOf(*(p for _, p in parts))
    backend = open_root(args.root)
    infos = list_checkpoints(backend, manifest_key=manifest_key())
    if not infos:
        print(f"no committed checkpoints under {backend.url}: nothing to prune")
        return OK
    records = retention.records(backend, infos)
    why: dict[int, list[str]] = {r.step: [] for r in records}
    for label, p in parts:
        for s in p.keep(records):
            why[s].append(label)
    newest = max(r.step for r in records)
    why[newest].append("newest")
    latest = retention.read_lines(backend, LATEST_FILE)[:1]
    doomed = []
    for info, rec in zip(infos, records, strict=True):
        if info.name in latest:
            why[rec.step].append("latest")
        if not why[rec.step]:
            doomed.append(info)
    deleted: list[str] = []
    if args.yes and doomed:
        # The engine's own pruning (the same decision, taken again on a fresh listing).
        deleted = retention.prune(backend, policy, manifest_key=manifest_key())
    if args.json:
        emit_json(
            {
                "root": backend.url,
                "dry_run": not args.yes,
                "checkpoints": [
                    {
                        "name": i.name,
                        "step": r.step,
                        "action": "keep" if why[r.step] else "delete",
                        "why": why[r.step],
                        "stored_bytes": i.manifest.stored_bytes,
                    }
                    for i, r in zip(infos, records, strict=True)
                ],
                "deleted": deleted,
            }
        )
        return OK
    rows = []
    for info, rec in zip(infos, records, strict=True):
        action = "keep" if why[rec.step] else ("deleted" if info.name in deleted else "delete")
        rows.append([info.name, size(info.manifest.stored_bytes), action, ", ".join(why[rec.step])])
    print(table(rows, ["NAME", "SIZE", "ACTION", "WHY"], right=(1,)))
    freed = sum(i.manifest.stored_bytes for i in doomed)
    names = ", ".join(i.name for i in doomed)
    if not doomed:
        print("nothing to delete: the policy keeps every checkpoint")
    elif not args.yes:
        print(
            f"would delete {len(doomed)} checkpoint(s), {size(freed)}: {names}\n"
            f"nothing deleted: run again with --yes to delete them"
        )
    else:
        print(f"deleted {len(deleted)} checkpoint(s): {', '.join(deleted) or 'none'}")
    return OK


# ---- sync / pull --------------------------------------------------------------------
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
        return "damaged", [str(exc)]
    if theirs.files != info.manifest.files:
        return "different", [
            f"{dst.url}/{info.name} holds a different checkpoint than {info.url} (other "
            "files or checksums: another run's?)"
        ]
    if full:
        with ThreadPoolExecutor(threads, thread_name_prefix="ckptstore-verify") as pool:
            problems = verify(dst, info.name, pool, manifest_key=manifest_key())
        return ("damaged" if problems else "ok"), problems
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


def cmd_transfer(args: argparse.Namespace, src_url: str, dst_url: str) -> int:
    """``sync`` and ``pull``: copy committed checkpoints that ``dst`` lacks."""
    src = open_root(src_url)
    dst = open_root(dst_url, create=not is_url(dst_url))
    infos = list_checkpoints(src, manifest_key=manifest_key())
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
        print(f"no committed checkpoints under {src.url}: nothing to copy")
        return OK
    threads = int(args.jobs or 8)  # files in parallel: I/O-bound
    copied: list[str] = []
    failed: list[str] = []
    planned: list[str] = []
    leftovers = _clear_leftovers(args, dst, infos)
    stop = threading.Event()
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
            state, problems = existing_problems(src, dst, info, args.verify_existing, threads)
            if state == "ok":
                print(f"present  {info.name}")
                continue
            if state == "different" or not args.replace_damaged:
                print(f"{state.upper():8} {info.name}: {'; '.join(problems[:3])}")
                hint = (
                    "ckptstore never overwrites a checkpoint: copy into another root, or "
                    "delete that one first"
                    if state == "different"
                    else "left as it is: rerun with --replace-damaged to replace it with "
                    f"the copy from {src.url}"
                )
                print(f"         {hint}")
                failed.append(info.name)
                continue
            replace = True
        if args.dry_run:
            verb = "would replace" if replace else "would copy"
            print(f"{verb} {info.name} ({size(info.manifest.stored_bytes)})")
            planned.append(info.name)
            continue
        progress = Progress(
            f"{'replacing' if replace else 'copying'} {info.name}", 0, enabled=sys.stderr.isatty()
        )
        start = time.monotonic()
        try:
            with _stop_on_ctrl_c(stop):
                manifest = copy_checkpoint(
                    src,
                    dst,
                    info.name,
                    threads=threads,
                    replace=replace,
                    progress=progress,
                    stop=stop,
                    manifest_key=manifest_key(),
                )
        except CopyStoppedError:
            print(f"STOPPED  {info.name}: interrupted; nothing of it was committed")
            print(
                f"{len(copied)} copied before the interruption; run the same command again to "
                "copy the rest"
            )
            return 130
        except CheckpointExistsError as exc:
            if dst.exists(f"{info.name}/{MANIFEST_FILE}"):
                print(f"present  {info.name} (written there meanwhile)")
                continue
            print(f"FAILED   {info.name}: {exc}")  # something that is not a checkpoint
            failed.append(info.name)
            continue
        except CkptStoreError as exc:
            print(f"FAILED   {info.name}: {exc}")
            failed.append(info.name)
            continue
        copied.append(info.name)
        elapsed = time.monotonic() - start
        print(
            f"{'replaced' if replace else 'copied':8} {info.name} ({size(manifest.stored_bytes)} "
            f"in {elapsed:.1f} s, verified)"
        )
        sys.stdout.flush()
    if copied:
        _housekeeping(src, dst)
    present = len(infos) - len(copied) - len(failed) - len(planned)
    if args.dry_run:
        print(
            f"dry run: {len(planned)} to copy, {present} already there, {len(failed)} in the "
            f"way, from {src.url} to {dst.url}; nothing copied"
        )
    else:
        print(
            f"{len(copied)} copied, {present} already there, {len(failed)} failed, "
            f"from {src.url} to {dst.url}"
        )
    if failed:
        print(
            "not copied: " + ", ".join(failed) + ". Rerun the same command after fixing the "
            "cause: what was copied stays, and nothing partial is ever committed"
        )
        return FAILED
    return OK


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


def _clear_leftovers(
    args: argparse.Namespace, dst: StorageBackend, infos: list[CheckpointInfo]
) -> dict[str, float]:
    """Make room for the checkpoints to copy where an earlier copy died half-way.

    On an object store a copy writes under the checkpoint's own name, and a copy that
    died (killed, network lost) leaves files there without a manifest, which a new copy
    may not overwrite. Those older than the grace period are removed, as ``gc`` does;
    younger ones may belong to a copy or save still running. Returns the names still
    blocked, with the grace period. (On local disk a copy writes into a temp directory,
    so nothing is in the way.)
    """
    if dst.is_local() or args.dry_run:
        return {}
    names = set(dst.list_names())
    wanted = [
        i.name for i in infos if i.name in names and not dst.exists(f"{i.name}/{MANIFEST_FILE}")
    ]
    if not wanted:
        return {}
    grace = 3600.0 if args.grace_s is None else args.grace_s
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
            pointer = retention.read_lines(dst, LATEST_FILE)[:1]
            if not pointer or pointer[0] not in names or pointer[0] < names[-1]:
                dst.put_atomic(LATEST_FILE, f"{names[-1]}\n".encode())
        finals = retention.read_lines(dst, FINALS_FILE)
        more = [n for n in retention.read_lines(src, FINALS_FILE) if n in names]
        merged = finals + [n for n in more if n not in finals]
        if merged != finals:
            dst.put_atomic(FINALS_FILE, ("\n".join(merged) + "\n").encode())
    except CkptStoreError as exc:
        note(f"could not update the pointers under {dst.url}: {exc}")


# ---- gc -----------------------------------------------------------------------------
def cmd_gc(args: argparse.Namespace) -> int:
    backend = open_root(args.root)
    grace = args.grace_s
    if grace is None:
        # Local disk: a lock protects a live save whatever its age; object stores have
        # only age to go by (the Checkpointer's defaults).
        grace = 60.0 if backend.is_local() else 3600.0
    if grace < 0:
        raise usage_error("--grace-s must be >= 0")
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
