"""``ckptstore prune``: delete the checkpoints a retention policy does not keep; without
``--yes`` it only shows what it would delete.

The decision is the CheckpointManager's (:func:`ckptstore.manager.retention.prune`), from
the manifests; the newest checkpoint and the one ``latest`` names are always kept.
"""

from __future__ import annotations

import argparse
import sys

from ckptstore.cli._common import (
    FAILED,
    OK,
    emit_json,
    file_links,
    freed_bytes,
    manifest_key,
    open_root,
    other_checkpoints,
    size,
    status,
    table,
    usage_error,
    writer_lease,
)
from ckptstore.cli.retention_options import add_retention_options, retention_parts
from ckptstore.engine.listing import list_checkpoints
from ckptstore.layout import LATEST_FILE
from ckptstore.manager import pointer, retention
from ckptstore.manager.policies import AnyOf, RetentionPolicy
from ckptstore.storage import StorageBackend

EXAMPLES = (
    "  ckptstore prune runs/exp1 --keep-last 3\n"
    "  ckptstore prune runs/exp1 --keep-last 2 --keep-best 1 --metric val_loss --yes\n"
    "  ckptstore prune s3://my-bucket/runs/exp1 --keep-every-steps 1000 --keep-final\n\n"
    "The decision is the CheckpointManager's, from the manifests. A training run\n"
    "with backup= spares checkpoints still uploading; this command cannot know\n"
    "about those: prune a root while its run is not saving into it (--yes is\n"
    "refused while a run saves into the root; a backup root has no such lease)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT")
    add_retention_options(p, for_ls=False)
    p.add_argument("--yes", action="store_true", help="delete (default: only show)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    parts = retention_parts(args)
    if not parts:
        raise usage_error(
            "prune needs a retention policy: e.g. --keep-last 3, --keep-every-steps 1000, "
            "--keep-every-epoch, --keep-best 1 --metric val_loss, --keep-final"
        )
    policy: RetentionPolicy = parts[0][1] if len(parts) == 1 else AnyOf(*(p for _, p in parts))
    backend = open_root(args.root)
    if not args.yes:
        return _prune(args, backend, parts, policy)
    refused = (
        "a run prunes its own root by its keep= policy (`ckptstore train --keep-last`); "
        "run `ckptstore prune --yes` once it has stopped (without --yes, prune only shows "
        "what it would delete)"
    )
    with writer_lease(backend, refused):  # and no run starts saving while this deletes
        return _prune(args, backend, parts, policy)


def _prune(
    args: argparse.Namespace,
    backend: StorageBackend,
    parts: list[tuple[str, RetentionPolicy]],
    policy: RetentionPolicy,
) -> int:
    infos = list_checkpoints(backend, manifest_key=manifest_key())
    if not infos:
        named = other_checkpoints(backend)
        aside = (
            f" (its {len(named)} checkpoint(s) named as Lightning names them are not pruned "
            "here: prune keeps and deletes a run's step_N checkpoints; ModelCheckpoint's "
            "save_top_k prunes those)"
            if named
            else ""
        )
        print(f"no committed checkpoints under {backend.url}: nothing to prune{aside}")
        return OK
    records = retention.records(backend, infos)
    why: dict[int, list[str]] = {r.step: [] for r in records}
    for label, p in parts:
        for s in p.keep(records):
            why[s].append(label)
    newest = max(r.step for r in records)
    why[newest].append("newest")
    latest = pointer.read_lines(backend, LATEST_FILE)[:1]
    for info, rec in zip(infos, records, strict=True):
        if info.name in latest:
            why[rec.step].append("latest")
    good: str | None = None
    if any(not reasons for reasons in why.values()):
        # A damaged checkpoint never protects the run: find the newest that verifies.
        status(f"verifying the newest checkpoints under {backend.url} (every byte)")
        try:
            good = retention.newest_verified(
                backend, infos, trusted=set(), manifest_key=manifest_key()
            )
        finally:
            status(None)
        for info, rec in zip(infos, records, strict=True):
            if info.name == good:
                why[rec.step].append("newest that verifies")
    doomed = [i for i, r in zip(infos, records, strict=True) if not why[r.step]]
    if doomed and good is None:
        print(
            f"no checkpoint under {backend.url} verifies: nothing deleted; run `ckptstore "
            f"verify {args.root}` to see what is damaged",
            file=sys.stderr,
        )
        return FAILED
    links = file_links(backend, [i.name for i in doomed])  # (before anything is deleted)
    deleted: list[str] = []
    if args.yes and doomed:
        # The engine's own pruning, on the listing shown (a run saving meanwhile: its
        # newer checkpoints are neither shown nor counted, so nothing shown "keep" goes)
        deleted = retention.prune(
            backend,
            policy,
            manifest_key=manifest_key(),
            verified=() if good is None else (good,),  # read in full above
            infos=infos,
            spare=latest,  # the one the table showed: `latest` may move meanwhile
        )
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
    gone = [i for i in infos if i.name in deleted] if args.yes else doomed
    freed = sum(i.manifest.stored_bytes for i in gone)
    if links is not None:  # a file incremental saves share goes with its last link
        freed = freed_bytes(links, {i.name for i in gone})
    names = ", ".join(i.name for i in doomed)
    if not doomed:
        print("nothing to delete: the policy keeps every checkpoint")
    elif not args.yes:
        print(
            f"would delete {len(doomed)} checkpoint(s), freeing {size(freed)}: {names}\n"
            f"nothing deleted: run again with --yes to delete them"
        )
    else:
        print(
            f"deleted {len(deleted)} checkpoint(s): {', '.join(deleted) or 'none'} "
            f"(freed {size(freed)})"
        )
    return OK
