"""``ckptstore ls``: the checkpoints under a root, with what their manifests say (step,
epoch, time, reason, size, ratio, metrics) and tags (latest, best, final, kept,
backed-up).

It reads manifests only: cheap, also on S3. :func:`scan` is also what ``verify`` walks.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ckptstore.cli._common import (
    OK,
    disk_bytes,
    emit_json,
    file_links,
    find_named,
    freed_bytes,
    iso_utc,
    local_time,
    manifest_key,
    metrics_text,
    named_otherwise,
    open_root,
    other_checkpoints,
    size,
    table,
)
from ckptstore.cli.retention_options import add_retention_options, forever_parts
from ckptstore.engine.listing import CheckpointInfo, read_manifest, step_mismatch
from ckptstore.errors import CheckpointNotFoundError, CkptStoreError
from ckptstore.format.manifest import UNSIGNED, Manifest
from ckptstore.layout import LATEST_FILE, STEP_NAME, TEMP_PREFIX, set_aside_kind
from ckptstore.manager import pointer, retention
from ckptstore.manager.policies import FINAL, KeepBest, RetentionPolicy
from ckptstore.storage import StorageBackend

EXAMPLES = (
    "  ckptstore ls runs/exp1\n"
    "  ckptstore ls s3://my-bucket/runs/exp1 --json\n"
    "  ckptstore ls runs/exp1 --all                 # also uncommitted, damaged, retired\n"
    "  ckptstore ls runs/exp1 --remote s3://my-bucket/runs/exp1   # tag 'backed-up'\n\n"
    "tags: latest (the `latest` pointer), best (by --metric; default val_loss),\n"
    "final (ended a completed run), kept (kept forever by the retention options\n"
    "given), backed-up (an identical copy is under --remote)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT")
    p.add_argument(
        "--all",
        action="store_true",
        help="also uncommitted checkpoints, and those set aside as damaged or retired",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--remote", metavar="URL", help="tag checkpoints also present there")
    p.add_argument("--metric", metavar="NAME", help="what 'best' means (default: val_loss)")
    p.add_argument("--mode", choices=("min", "max"), help="for --metric (default: min)")
    add_retention_options(p, for_ls=True)


TAG_ORDER = ("latest", "best", "final", "kept", "backed-up")


@dataclass
class Entry:
    """One name under a root, as ``ls`` shows it."""

    name: str
    status: str  # "committed", "uncommitted", "corrupt", "damaged", "retired" (set aside)
    step: int | None
    url: str
    manifest: Manifest | None = None
    tags: list[str] = field(default_factory=list)
    error: str | None = None


def scan(backend: StorageBackend, *, everything: bool) -> list[Entry]:
    """Committed checkpoints by step; with ``everything`` also the names that look like
    checkpoints but are not committed (a save in progress or a dead one) or whose
    manifest is damaged. A checkpoint deleted between the listing and the reading of
    its manifest (a run's retention, saving fast) means a new listing, up to 5."""
    for _ in range(4):
        entries, missing = _scan(backend, everything)
        if not missing or not missing - set(backend.list_names()):
            return entries
    return _scan(backend, everything)[0]


def named_entries(backend: StorageBackend, names: list[str] | None = None) -> list[Entry]:
    """The committed checkpoints of a local root named otherwise than ``step_N``
    (Lightning's ``*.ckpt``), oldest first; or of ``names`` (any root, object stores
    too)."""
    names = other_checkpoints(backend) if names is None else names
    manifests = _read_manifests(backend, names)
    entries = []
    for name in names:
        try:
            manifest = manifests[name]()
        except CkptStoreError:
            continue
        entries.append(Entry(name, "committed", manifest.step, f"{backend.url}/{name}", manifest))
    entries.sort(key=lambda e: (e.manifest.created_unix_s if e.manifest else 0.0, e.name))
    return entries


def _scan(backend: StorageBackend, everything: bool) -> tuple[list[Entry], set[str]]:
    """The entries, and the step names listed whose manifest was not found."""
    entries: list[Entry] = []
    missing: set[str] = set()
    names = backend.list_names()
    manifests = _read_manifests(backend, [n for n in names if STEP_NAME.match(n)])
    for name in names:
        url = f"{backend.url}/{name}"
        match = STEP_NAME.match(name)
        if match:
            step = int(match.group(1))
            try:
                manifest = manifests[name]()
            except CheckpointNotFoundError:
                missing.add(name)
                if everything:
                    entries.append(Entry(name, "uncommitted", step, url))
                continue
            except CkptStoreError as exc:
                if everything:
                    entries.append(Entry(name, "corrupt", step, url, error=str(exc)))
                continue
            mismatch = step_mismatch(backend, name, manifest)
            if mismatch is not None:
                if everything:
                    entries.append(Entry(name, "corrupt", step, url, manifest, error=mismatch))
                continue
            entries.append(Entry(name, "committed", step, url, manifest))
        elif everything and (aside := set_aside_kind(name)) is not None:
            base = STEP_NAME.match(name.partition(".")[0])
            entries.append(Entry(name, aside, int(base.group(1)) if base else None, url))
        elif everything and name.startswith(TEMP_PREFIX):
            inner = STEP_NAME.match(name[len(TEMP_PREFIX) :].rsplit("-", 1)[0])
            entries.append(Entry(name, "uncommitted", int(inner.group(1)) if inner else None, url))
    entries.sort(key=lambda e: (e.step if e.step is not None else -1, e.status != "committed"))
    return entries, missing


def _read_manifests(backend: StorageBackend, names: list[str]) -> dict[str, Callable[[], Manifest]]:
    """Every manifest, read in parallel on an object store (one request each); each
    value returns the manifest or raises what reading it raised."""

    def read(name: str) -> Callable[[], Manifest]:
        try:
            manifest = read_manifest(backend, name, manifest_key=manifest_key())
        except CkptStoreError as exc:
            error = exc

            def fail() -> Manifest:
                raise error

            return fail
        return lambda: manifest

    if backend.capabilities.local or len(names) < 2:
        return {n: read(n) for n in names}
    with ThreadPoolExecutor(16, thread_name_prefix="ckptstore-ls") as pool:
        return dict(zip(names, pool.map(read, names), strict=True))


def best_metric(args: argparse.Namespace, entries: list[Entry]) -> tuple[str | None, str]:
    """The metric that "best" means: ``--metric``, else ``val_loss`` (what the training
    loop records), else the only metric whose name ends in ``loss``."""
    mode = args.mode or "min"
    if args.metric:
        return args.metric, mode
    names = {k for e in entries if e.manifest is not None for k in e.manifest.metrics}
    if "val_loss" in names:
        return "val_loss", mode
    losses = sorted(n for n in names if n.endswith("loss"))
    return (losses[0], mode) if len(losses) == 1 else (None, mode)


def tag(
    backend: StorageBackend,
    entries: list[Entry],
    *,
    metric: str | None,
    mode: str,
    forever: list[RetentionPolicy],
    remote: StorageBackend | None,
) -> None:
    """Fill in the tags of the committed entries, in place."""
    committed = [e for e in entries if e.status == "committed" and e.manifest is not None]
    infos = [CheckpointInfo(e.name, e.url, e.manifest) for e in committed if e.manifest]
    records = retention.records(backend, infos)
    latest = pointer.read_lines(backend, LATEST_FILE)[:1]
    best_step = None
    if metric is not None:
        ranked = KeepBest(1, metric, mode).ranked(records)
        best_step = ranked[0].step if ranked else None
    kept: set[int] = set()
    for policy in forever:
        kept |= policy.keep(records)
    backed: dict[str, Manifest] = {}
    if remote is not None:
        backed = {e.name: e.manifest for e in scan(remote, everything=False) if e.manifest}
    for entry, rec in zip(committed, records, strict=True):
        tags = set()
        if entry.name in latest:
            tags.add("latest")
        if rec.step == best_step:
            tags.add("best")
        if rec.reason == FINAL:
            tags.add("final")
        if rec.step in kept:
            tags.add("kept")
        other = backed.get(entry.name)
        if other is not None and entry.manifest is not None and other.files == entry.manifest.files:
            tags.add("backed-up")
        entry.tags = [t for t in TAG_ORDER if t in tags]


def entry_json(e: Entry, alone: int | None = None) -> dict[str, Any]:
    """``alone``: the bytes of its files no other checkpoint holds (what deleting it
    frees; :func:`alone_bytes`)."""
    m = e.manifest
    out: dict[str, Any] = {"name": e.name, "url": e.url, "status": e.status, "step": e.step}
    if m is not None and e.status == "committed":
        out.update(
            epoch=m.epoch,
            created_unix_s=m.created_unix_s,
            created=iso_utc(m.created_unix_s),
            reason=m.reason,
            stored_bytes=m.stored_bytes,
            owned_bytes=m.owned_bytes,  # written by its save
            frees_bytes=alone,
            raw_bytes=m.raw_bytes,
            ratio=None if m.linked else round(m.ratio, 6),  # (see the table's RATIO)
            codec=m.codec.get("id"),
            world_size=m.world_size,
            metrics=m.metrics,
        )
    out["tags"] = e.tags
    if e.error is not None:
        out["error"] = e.error
    return out


def alone_bytes(backend: StorageBackend, entries: list[Entry]) -> dict[str, int]:
    """Per committed checkpoint, the bytes of its files no other one holds: what
    deleting it alone frees. On a local disk, a file incremental saves share (hard
    links) counts for none of them until one holds it alone; on object stores every
    checkpoint holds its own copies."""
    committed = [e for e in entries if e.status == "committed" and e.manifest is not None]
    shared = any(e.manifest is not None and e.manifest.linked for e in committed)
    # (no file is shared where no manifest links one: no walk over every file then)
    links = file_links(backend, [e.name for e in committed]) if shared else None
    return {
        e.name: (freed_bytes(links, {e.name}) if links is not None else e.manifest.stored_bytes)
        for e in committed
        if e.manifest is not None
    }


def shared_note(stored: int, alone: int) -> str:
    """The SIZE column's note for a checkpoint that shares files with others."""
    return f" ({size(alone)} its own)" if alone < stored else ""


def totals(backend: StorageBackend, entries: list[Entry]) -> dict[str, Any]:
    """The committed checkpoints' bytes: as their manifests list them, and on a local
    disk what they take there (files incremental saves share counted once; None
    elsewhere: on object stores a linked file is a copy)."""
    manifests = {e.name: e.manifest for e in entries if e.status == "committed" and e.manifest}
    local = backend.capabilities.local
    return {
        "stored_bytes": sum(m.stored_bytes for m in manifests.values()),
        "disk_bytes": disk_bytes(backend.url, manifests) if local else None,
    }


def why(e: Entry) -> str:
    """Why ``e``, a corrupt entry, is not a checkpoint (``ls`` without ``--all``)."""
    if e.manifest is None:
        if UNSIGNED in (e.error or ""):
            return "manifest not signed with the key in CKPTSTORE_MANIFEST_KEY"
        return "manifest damaged or unreadable"
    return "its manifest names another step (a copy or a link)"  # (listing.step_mismatch)


def say_corrupt(corrupt: list[Entry], root: str) -> None:
    """Name what looks like a checkpoint but is not listed without ``--all``."""
    for what in dict.fromkeys(why(e) for e in corrupt):
        names = ", ".join(e.name for e in corrupt if why(e) == what)
        print(
            f"note: {names}: {what}, not listed (CORRUPT in `ckptstore ls {root} --all`; "
            f"`ckptstore verify {root}` says more)"
        )


def run(args: argparse.Namespace) -> int:
    forever = forever_parts(args)
    found = find_named(args.root)
    only = found[1] if found is not None and found[2] else None  # one checkpoint: its row
    backend = found[0] if found is not None and only is not None else open_root(args.root)
    remote = open_root(args.remote) if args.remote else None
    entries = scan(backend, everything=True)
    # Without --all only committed ones are listed; one whose manifest is damaged (or
    # names another step) is named under the table all the same (stranger test: a
    # middle one vanished from the listing). Not when one checkpoint is asked for.
    corrupt = [] if args.all or only is not None else [e for e in entries if e.status == "corrupt"]
    if not args.all:
        entries = [e for e in entries if e.status == "committed"]
    # A directory of Lightning's *.ckpt checkpoints: listed by time saved; steps, tags
    # and retention are about step_N checkpoints
    has_steps = any(e.status == "committed" for e in entries)
    named = [] if has_steps else named_entries(backend)
    beside = other_checkpoints(backend) if has_steps and only is None else []
    committed_names = {e.name for e in entries if e.status == "committed"}
    if named:
        entries, metric, mode = named + entries, None, args.mode or "min"
    else:
        metric, mode = best_metric(args, entries)
        tag(backend, entries, metric=metric, mode=mode, forever=forever, remote=remote)
    own = alone_bytes(backend, entries)
    if only is not None:  # as its root lists it (tags and what it holds alone included)
        entries = [e for e in entries if e.name == only] or named_entries(backend, [only])
        own = own if only in own else alone_bytes(backend, entries)
    if args.json:
        emit_json(
            {
                "root": backend.url,
                "best_metric": metric,
                "best_mode": mode,
                "checkpoints": [entry_json(e, own.get(e.name)) for e in entries],
                **totals(backend, entries),
                # (without --all: what the note under the table names)
                "not_listed": [{"name": e.name, "why": why(e)} for e in corrupt],
            }
        )
        return OK
    if not entries:
        hidden = "" if args.all else " (--all also shows uncommitted, damaged and retired ones)"
        other = named_otherwise(backend, args.root)
        print(f"no committed checkpoints under {backend.url}{other or hidden}")
        say_corrupt(corrupt, args.root)
        return OK
    rows = []
    for e in entries:
        m = e.manifest
        if e.status == "committed" and m is not None:
            rows.append(
                [
                    e.name,
                    "-" if e.step is None else str(e.step),
                    "-" if m.epoch is None else str(m.epoch),
                    local_time(m.created_unix_s),
                    m.reason or "-",
                    size(m.stored_bytes) + shared_note(m.stored_bytes, own[e.name]),
                    # linked files hold the items changed since too: info says the ratio
                    "-" if m.linked else f"{m.ratio:.2f}",
                    metrics_text(m.metrics) or "-",
                    ",".join(e.tags),
                ]
            )
        else:
            step = "-" if e.step is None else str(e.step)
            rows.append([e.name, step, "-", "-", "-", "-", "-", "-", e.status.upper()])
    header = ["NAME", "STEP", "EPOCH", "SAVED", "REASON", "SIZE", "RATIO", "METRICS", "TAGS"]
    print(table(rows, header, right=(1, 2, 5, 6)))
    committed = [e for e in entries if e.status == "committed"]
    sums = totals(backend, entries)
    total, shared = sums["stored_bytes"], sums["disk_bytes"]
    alone = ""
    if shared is not None and shared < total:
        alone = f" ({size(shared)} on disk: incremental saves share files)"
    otherwise = " (named otherwise than step_N, as Lightning names them)" if named else ""
    print(
        f"{len(committed)} committed checkpoint(s){otherwise}, {size(total)}{alone}, under "
        f"{backend.url}"
    )
    if metric is not None:
        print(f"best: by {metric} ({mode})")
    say_corrupt(corrupt, args.root)
    if beside:
        shown = ", ".join(beside[:4]) + (" ..." if len(beside) > 4 else "")
        print(
            f"note: {len(beside)} more checkpoint(s) here are named otherwise than step_N "
            f"({shown}, as Lightning names them), not listed beside step_N ones: "
            f"`ckptstore ls {args.root.rstrip('/')}/{beside[0]}` lists one"
        )
    pointed = pointer.read_latest(backend)
    if pointed is not None and pointed not in committed_names:
        print(
            f"note: the latest pointer names {pointed}, which is not a committed checkpoint; "
            "resuming takes the newest one that loads"
        )
    for e in entries:
        if e.status == "corrupt":
            print(f"CORRUPT {e.name}: {e.error}")
    uncommitted = {e.name for e in entries if e.status == "uncommitted"}
    deleting = {n for n in uncommitted if n.startswith(f"{TEMP_PREFIX}deleted-")}
    local = backend.capabilities.local  # an object store writes a save in place
    bare = {n for n in uncommitted if local and not n.startswith(TEMP_PREFIX)}
    if uncommitted - deleting - bare:
        print(
            "UNCOMMITTED: a save in progress, or one that died; never loaded. "
            f"ckptstore gc {args.root} removes dead ones"
        )
    if deleting:
        print(
            f"{', '.join(sorted(deleting))}: a deletion in progress, or one that died (a "
            f"checkpoint renamed away, then removed); ckptstore gc {args.root} removes dead ones"
        )
    if bare:
        print(
            f"{', '.join(sorted(bare))}: no manifest, so no checkpoint (its manifest was "
            f"lost, or it was not made by a save); gc leaves it: `ckptstore quarantine "
            f"{args.root} STEP` moves it aside, as a run restoring past it does"
        )
    return OK
