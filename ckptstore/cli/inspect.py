"""``ckptstore ls``, ``info`` and ``verify``: what is under a root, what is inside a
checkpoint, and whether every byte of it is what its manifest promises.

``ls`` reads manifests only (cheap, also on S3); ``verify`` reads every file in full.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from ckptstore.cli._common import (
    FAILED,
    OK,
    CliError,
    emit_json,
    find_named,
    iso_utc,
    local_time,
    manifest_key,
    metrics_text,
    open_root,
    resolve_checkpoint,
    size,
    status,
    table,
    usage_error,
)
from ckptstore.convert import paths, tensor_bytes
from ckptstore.engine.ops import (
    CheckpointInfo,
    open_shards,
    read_dcp_metadata,
    read_manifest,
    verify,
)
from ckptstore.errors import CheckpointNotFoundError, CkptStoreError
from ckptstore.format.manifest import Manifest
from ckptstore.format.shard import ItemEntry
from ckptstore.layout import LATEST_FILE, STEP_NAME, TEMP_PREFIX
from ckptstore.manager import retention
from ckptstore.manager.policies import FINAL, KeepBest, RetentionPolicy
from ckptstore.storage import StorageBackend

TAG_ORDER = ("latest", "best", "final", "kept", "backed-up")


@dataclass
class Entry:
    """One name under a root, as ``ls`` shows it."""

    name: str
    status: str  # "committed", "uncommitted", "corrupt"
    step: int | None
    url: str
    manifest: Manifest | None = None
    tags: list[str] = field(default_factory=list)
    error: str | None = None


def scan(backend: StorageBackend, *, everything: bool) -> list[Entry]:
    """Committed checkpoints by step; with ``everything`` also the names that look like
    checkpoints but are not committed (a save in progress or a dead one) or whose
    manifest is damaged."""
    entries: list[Entry] = []
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
                if everything:
                    entries.append(Entry(name, "uncommitted", step, url))
                continue
            except CkptStoreError as exc:
                if everything:
                    entries.append(Entry(name, "corrupt", step, url, error=str(exc)))
                continue
            if manifest.step != step:
                if everything:
                    entries.append(
                        Entry(
                            name,
                            "corrupt",
                            step,
                            url,
                            manifest,
                            error=f"{url}: its manifest says step {manifest.step}",
                        )
                    )
                continue
            entries.append(Entry(name, "committed", step, url, manifest))
        elif everything and name.startswith(TEMP_PREFIX):
            inner = STEP_NAME.match(name[len(TEMP_PREFIX) :].rsplit("-", 1)[0])
            entries.append(Entry(name, "uncommitted", int(inner.group(1)) if inner else None, url))
    entries.sort(key=lambda e: (e.step if e.step is not None else -1, e.status != "committed"))
    return entries


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

    if backend.is_local() or len(names) < 2:
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
    latest = retention.read_lines(backend, LATEST_FILE)[:1]
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


def entry_json(e: Entry) -> dict[str, Any]:
    m = e.manifest
    out: dict[str, Any] = {"name": e.name, "url": e.url, "status": e.status, "step": e.step}
    if m is not None and e.status == "committed":
        out.update(
            epoch=m.epoch,
            created_unix_s=m.created_unix_s,
            created=iso_utc(m.created_unix_s),
            reason=m.reason,
            stored_bytes=m.stored_bytes,
            raw_bytes=m.raw_bytes,
            ratio=round(m.ratio, 6),
            codec=m.codec.get("id"),
            world_size=m.world_size,
            metrics=m.metrics,
        )
    out["tags"] = e.tags
    if e.error is not None:
        out["error"] = e.error
    return out


def cmd_ls(args: argparse.Namespace, forever: list[RetentionPolicy]) -> int:
    backend = open_root(args.root)
    remote = open_root(args.remote) if args.remote else None
    entries = scan(backend, everything=args.all)
    metric, mode = best_metric(args, entries)
    tag(backend, entries, metric=metric, mode=mode, forever=forever, remote=remote)
    if args.json:
        emit_json(
            {
                "root": backend.url,
                "best_metric": metric,
                "best_mode": mode,
                "checkpoints": [entry_json(e) for e in entries],
            }
        )
        return OK
    if not entries:
        hidden = "" if args.all else " (--all also shows uncommitted and damaged ones)"
        print(f"no committed checkpoints under {backend.url}{hidden}")
        return OK
    rows = []
    for e in entries:
        m = e.manifest
        if e.status == "committed" and m is not None:
            rows.append(
                [
                    e.name,
                    str(e.step),
                    "-" if m.epoch is None else str(m.epoch),
                    local_time(m.created_unix_s),
                    m.reason or "-",
                    size(m.stored_bytes),
                    f"{m.ratio:.2f}",
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
    total = sum(e.manifest.stored_bytes for e in committed if e.manifest)
    print(f"{len(committed)} committed checkpoint(s), {size(total)}, under {backend.url}")
    if metric is not None:
        print(f"best: by {metric} ({mode})")
    pointer = retention.read_lines(backend, LATEST_FILE)[:1]
    if pointer and pointer[0] not in {e.name for e in committed}:
        print(
            f"note: the latest pointer names {pointer[0]}, which is not a committed checkpoint; "
            "resuming takes the newest one that loads"
        )
    for e in entries:
        if e.status == "corrupt":
            print(f"CORRUPT {e.name}: {e.error}")
    if any(e.status == "uncommitted" for e in entries):
        print(
            "UNCOMMITTED: a save in progress, or one that died; never loaded. "
            f"ckptstore gc {args.root} removes dead ones"
        )
    return OK


# ---- info ---------------------------------------------------------------------------
def shard_items(
    backend: StorageBackend, name: str, manifest: Manifest
) -> tuple[dict[str, list[ItemEntry]], list[str]]:
    """Every shard's index (stored size and codec per item): reads indices only."""
    problems: list[str] = []
    items = {f: shard.items for f, shard in open_shards(backend, name, manifest, problems)}
    return items, problems


def sharding(md: TensorStorageMetadata) -> str:
    if len(md.chunks) <= 1:
        return "-"
    dims = [d for d in range(len(md.size)) if len({int(c.offsets[d]) for c in md.chunks}) > 1]
    along = f" on dim {','.join(map(str, dims))}" if dims else ""
    return f"{len(md.chunks)} shards{along}"


def describe(backend: StorageBackend, name: str, only: str | None) -> dict[str, Any]:
    """What ``info`` shows, as one JSON-ready dict."""
    manifest = read_manifest(backend, name, manifest_key=manifest_key())
    m = manifest
    out: dict[str, Any] = {
        "checkpoint": f"{backend.url}/{name}",
        "name": name,
        "format": "ckptstore",
        "format_version": m.format_version,
        "versions": m.versions,
        "step": m.step,
        "epoch": m.epoch,
        "reason": m.reason,
        "created_unix_s": m.created_unix_s,
        "created": iso_utc(m.created_unix_s),
        "world_size": m.world_size,
        "codec": m.codec,
        "raw_bytes": m.raw_bytes,
        "stored_bytes": m.stored_bytes,
        "ratio": round(m.ratio, 6),
        "metrics": m.metrics,
        "metadata": m.metadata,
        "files": {f: {"kind": e.kind, "size_bytes": e.size_bytes} for f, e in m.files.items()},
    }
    metadata = read_dcp_metadata(backend, name, manifest)
    items, problems = shard_items(backend, name, manifest)
    stored: dict[str, int] = {}
    item_bytes: dict[str, int] = {}
    codecs: dict[str, set[str]] = {}
    for index, where in metadata.storage_data.items():
        if not isinstance(where, dict):
            continue
        shard = items.get(str(where.get("file")))
        k = where.get("item")
        if shard is None or not isinstance(k, int) or not 0 <= k < len(shard):
            continue
        item = shard[k]
        stored[index.fqn] = stored.get(index.fqn, 0) + item.stored_bytes
        item_bytes[index.fqn] = item_bytes.get(index.fqn, 0) + item.nbytes
        codecs.setdefault(index.fqn, set()).add(item.codec.codec_id)
    groups: dict[str, dict[str, Any]] = {}
    entries = []
    for key, path in sorted(paths(metadata).items()):
        if only is not None and not (key == only or key.startswith(only + ".")):
            continue
        md = metadata.state_dict_metadata[key]
        group = str(path[0])
        g = groups.setdefault(
            group, {"tensors": 0, "values": 0, "raw_bytes": 0, "stored_bytes": 0, "codecs": set()}
        )
        entry: dict[str, Any] = {"key": key, "group": group}
        if isinstance(md, TensorStorageMetadata):
            raw = tensor_bytes(md)
            entry.update(
                kind="tensor",
                dtype=str(md.properties.dtype).removeprefix("torch."),
                shape=[int(n) for n in md.size],
                bytes=raw,
                sharding=sharding(md),
                chunks=[
                    {"offsets": [int(o) for o in c.offsets], "sizes": [int(s) for s in c.sizes]}
                    for c in md.chunks
                ],
            )
            g["tensors"] += 1
        else:
            assert isinstance(md, BytesStorageMetadata)
            raw = item_bytes.get(key, 0)
            entry.update(kind="value", bytes=raw)
            g["values"] += 1
        entry["stored_bytes"] = stored.get(key)
        entry["codec"] = ",".join(sorted(codecs.get(key, set()))) or None
        g["raw_bytes"] += raw
        g["stored_bytes"] += stored.get(key, 0)
        g["codecs"] |= codecs.get(key, set())
        entries.append(entry)
    for g in groups.values():
        g["codecs"] = sorted(g["codecs"])
        g["ratio"] = round(g["stored_bytes"] / g["raw_bytes"], 6) if g["raw_bytes"] else 1.0
    out["groups"] = groups
    out["entries"] = entries
    out["problems"] = problems
    return out


def cmd_info(args: argparse.Namespace) -> int:
    backend, name = resolve_checkpoint(args.ckpt, args.step, what="info")
    try:
        info = describe(backend, name, args.only)
    except CkptStoreError as exc:
        raise CliError(
            f"{exc}\n(ckptstore verify {backend.url}/{name} checks every file)", FAILED
        ) from None
    if args.only is not None and not info["entries"]:
        raise usage_error(
            f"{info['checkpoint']} has no key {args.only!r} or under it; run without --only to "
            "see every key"
        )
    if args.json:
        emit_json(info)
        return FAILED if info["problems"] else OK
    versions = ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items()))
    codec = info["codec"]
    codec_text = " ".join(
        [str(codec.get("id"))] + [f"{k}={v}" for k, v in codec.items() if k != "id"]
    )
    lines = [
        ("checkpoint", info["checkpoint"]),
        ("format", f"ckptstore {info['format_version']}" + (f" (written by {versions})" if versions else "")),
        ("step", "-" if info["step"] is None else str(info["step"])),
        ("epoch", "-" if info["epoch"] is None else str(info["epoch"])),
        ("reason", info["reason"] or "-"),
        ("saved", f"{local_time(info['created_unix_s'])} ({info['created']})"),
        ("world size", str(info["world_size"])),
        ("codec", f"{codec_text} (rank 0's choice; per group below)"),
        ("size", f"{size(info['stored_bytes'])} stored, {size(info['raw_bytes'])} raw, ratio {info['ratio']:.3f}"),
        ("metrics", metrics_text(info["metrics"]) or "-"),
        ("metadata", str(info["metadata"]) if info["metadata"] else "-"),
        ("files", ", ".join(f"{f} ({size(e['size_bytes'])})" for f, e in sorted(info["files"].items()))),
    ]  # fmt: skip
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(width)}  {v}")
    print()
    group_rows = [
        [
            name_,
            str(g["tensors"]),
            str(g["values"]),
            size(g["raw_bytes"]),
            size(g["stored_bytes"]),
            f"{g['ratio']:.3f}",
            ",".join(g["codecs"]) or "-",
        ]
        for name_, g in info["groups"].items()
    ]
    print(
        table(
            group_rows,
            ["GROUP", "TENSORS", "VALUES", "RAW", "STORED", "RATIO", "CODEC"],
            right=(1, 2, 3, 4, 5),
        )
    )
    print()
    rows = []
    for e in info["entries"]:
        if e["kind"] == "tensor":
            rows.append(
                [
                    e["key"],
                    e["dtype"],
                    "[" + ", ".join(map(str, e["shape"])) + "]",
                    size(e["bytes"]),
                    e["sharding"],
                ]
            )
        else:
            rows.append([e["key"], "(value)", "-", size(e["bytes"]), "-"])
    print(table(rows, ["KEY", "DTYPE", "SHAPE", "SIZE", "SHARDING"], right=(3,)))
    for p in info["problems"]:
        print(f"PROBLEM {p}")
    if info["problems"]:
        print(f"run ckptstore verify {info['checkpoint']} for a full check")
        return FAILED
    return OK


# ---- verify -------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    targets: list[tuple[str, str]] = []  # (name, status)
    notes: list[str] = []
    if args.step is not None:
        backend, name = resolve_checkpoint(args.target, args.step)
        targets.append((name, "committed"))
        single = True
    else:
        found = find_named(args.target)
        single = found is not None
        if found is not None:
            backend, name, present = found
            if not present:
                raise usage_error(
                    f"{backend.url}/{name} is not there; ckptstore ls {backend.url} --all lists "
                    "what is"
                )
            targets.append((name, "named"))
        else:
            backend = open_root(args.target)
            entries = scan(backend, everything=True)
            for e in entries:
                if e.status == "uncommitted" and (
                    e.name.startswith(TEMP_PREFIX) or not backend.is_local()
                ):
                    # Object stores write in place: a save in progress looks like this too.
                    notes.append(
                        f"{e.name}: uncommitted (a save in progress, or a dead one), not checked; "
                        f"ckptstore gc {args.target} removes dead ones"
                    )
                    continue
                targets.append((e.name, e.status))
            if not targets:
                raise usage_error(
                    f"no checkpoints under {backend.url}: nothing to verify; check the path "
                    f"(ckptstore ls {args.target} --all)"
                )
    # Reads are latency-bound on object stores (one request per chunk): more in flight.
    threads = args.jobs or (min(8, os.cpu_count() or 1) if backend.is_local() else 16)
    results: list[dict[str, Any]] = []
    with ThreadPoolExecutor(threads, thread_name_prefix="ckptstore-verify") as pool:
        for name, _status in targets:
            status(f"checking {name}")
            try:
                problems = verify(backend, name, pool, manifest_key=manifest_key())
            finally:
                status(None)
            results.append(
                {
                    "name": name,
                    "url": f"{backend.url}/{name}",
                    "ok": not problems,
                    "problems": problems,
                }
            )
            if not args.json:
                if problems:
                    print(f"BAD  {name}")
                    for p in problems:
                        print(f"     {p}")
                else:
                    print(f"OK   {name}")
                sys.stdout.flush()
    bad = [r for r in results if not r["ok"]]
    if args.json:
        emit_json({"root": backend.url, "ok": not bad, "checkpoints": results, "notes": notes})
        return FAILED if bad else OK
    for n in notes:
        print(f"note: {n}")
    if not bad:
        print(f"all {len(results)} checkpoint(s) intact" if not single else "intact")
        return OK
    names = ", ".join(r["name"] for r in bad)
    print(
        f"{len(bad)} of {len(results)} checkpoint(s) damaged: {names}. Load or resume from an "
        "intact one (ckptstore ls shows them), pull a good copy from a backup with ckptstore "
        "pull --replace-damaged, or delete the damaged ones"
    )
    return FAILED
