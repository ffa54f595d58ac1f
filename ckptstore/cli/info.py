"""``ckptstore info``: what is inside one checkpoint: tensors (dtype, shape, size,
sharding) by group, codec and ratio, world size, metadata, format version.

It reads the manifest, DCP's metadata and the shard indices, not the tensors.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ckptstore.cli._common import (
    FAILED,
    OK,
    emit_json,
    int_at_least,
    iso_utc,
    local_time,
    manifest_key,
    metrics_text,
    resolve_checkpoint,
    size,
    table,
    usage_error,
)
from ckptstore.engine.listing import read_manifest
from ckptstore.errors import CkptStoreError, CliError
from ckptstore.format.manifest import Manifest
from ckptstore.storage import StorageBackend

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ckptstore.format.shard_index import ItemEntry

# What needs torch (DCP's metadata, the shard readers) is imported where it is used, so
# that ``ckptstore info --help`` and its usage errors start without torch.

EXAMPLES = (
    "  ckptstore info runs/exp1/step_00000500\n"
    "  ckptstore info runs/exp1 --step 500 --only model\n"
    "  ckptstore info s3://my-bucket/runs/exp1 --json    # the newest checkpoint"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("--step", type=int_at_least(0), metavar="N", help="checkpoint N of ROOT")
    p.add_argument("--only", metavar="PREFIX", help="only keys under PREFIX (e.g. model)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def shard_items(
    backend: StorageBackend, name: str, manifest: Manifest
) -> tuple[dict[str, list[ItemEntry]], list[str]]:
    """Every shard's index (stored size and codec per item): reads indices only."""
    from ckptstore.engine.ops import open_shards

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
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    from ckptstore.convert import paths, stored_nbytes
    from ckptstore.engine.ops import read_dcp_metadata

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
        "owned_bytes": m.owned_bytes,
        "linked": m.linked,
        "linked_from_deleted": gone_origins(backend, m),
        "ratio": round(m.ratio, 6),
        "metrics": m.metrics,
        "metadata": m.metadata,
        "files": {f: {"kind": e.kind, "size_bytes": e.size_bytes} for f, e in m.files.items()},
    }
    if m.part is not None:
        out["part"] = {"disk": m.part.disk, "elsewhere": sorted(m.part.elsewhere)}
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
        span = where.get("range")  # a small tensor packed with others: its share
        part = span[1] if isinstance(span, list) and len(span) == 2 else item.nbytes
        share = item.stored_bytes * part // item.nbytes if item.nbytes else item.stored_bytes
        stored[index.fqn] = stored.get(index.fqn, 0) + share
        item_bytes[index.fqn] = item_bytes.get(index.fqn, 0) + part
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
            raw = stored_nbytes(md)
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
    if m.linked and m.raw_bytes:  # of the items it uses (linked files hold others too)
        out["ratio"] = round(sum(stored.values()) / m.raw_bytes, 6)
    out["groups"] = groups
    out["entries"] = entries
    out["problems"] = problems
    return out


def gone_origins(backend: StorageBackend, m: Manifest) -> list[str]:
    """The checkpoints that first wrote a file ``m`` links and no longer hold it: deleted,
    or another checkpoint saved since under that name (the file lives on in ``m``)."""
    gone = []
    for origin in sorted(set(m.linked.values())):
        try:
            theirs = read_manifest(backend, origin, manifest_key=manifest_key())
        except CkptStoreError:
            gone.append(origin)
            continue
        held = {(e.size_bytes, e.xxh3_64) for e in theirs.files.values()}
        mine = [e for f, e in m.files.items() if m.linked.get(f) == origin]
        if any((e.size_bytes, e.xxh3_64) not in held for e in mine):
            gone.append(origin)
    return gone


def incremental_text(info: dict[str, Any]) -> str:
    """What an incremental save wrote, and which checkpoints first wrote the rest."""
    gone = set(info["linked_from_deleted"])

    def said(origin: str) -> str:
        if origin == info["name"]:  # (Lightning's last.ckpt: saved again under its name)
            return f"an earlier save of {origin}, since replaced (the file lives on here)"
        return origin + (" (no longer there: the file lives on here)" if origin in gone else "")

    origins = ", ".join(said(o) for o in sorted(set(info["linked"].values())))
    return (
        f"{size(info['owned_bytes'])} written by this save; the rest (unchanged since) is "
        f"in files first written by {origins}, linked"
    )


def run(args: argparse.Namespace) -> int:
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
        ("size", f"{size(info['stored_bytes'])} stored" + (" (its linked files whole)" if info["linked"] else "") + f", {size(info['raw_bytes'])} raw, ratio {info['ratio']:.3f}" + (" (of the items it uses)" if info["linked"] else "")),
        *([("incremental", incremental_text(info))] if info["linked"] else []),
        ("metrics", metrics_text(info["metrics"]) or "-"),
        ("metadata", str(info["metadata"]) if info["metadata"] else "-"),
        ("files", ", ".join(f"{f} ({size(e['size_bytes'])})" for f, e in sorted(info["files"].items()))),
    ]  # fmt: skip
    if "part" in info:
        elsewhere = info["part"]["elsewhere"]
        lines.append(
            ("node-local part", f"this disk's; on other nodes' disks: {', '.join(elsewhere)}")
        )
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
