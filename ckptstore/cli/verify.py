"""``ckptstore verify``: whether every byte of a checkpoint, or of every checkpoint under a
root, is what its manifest promises; exit status 0 only when all is intact.

It reads every file in full, many at once (the pool's threads).
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptstore.cli._common import (
    FAILED,
    OK,
    emit_json,
    find_named,
    int_at_least,
    manifest_key,
    open_root,
    other_checkpoints,
    resolve_checkpoint,
    status,
    usage_error,
)
from ckptstore.cli.ls import scan
from ckptstore.errors import without_verify_hint
from ckptstore.format.manifest import UNSIGNED
from ckptstore.layout import MANIFEST_FILE, TEMP_PREFIX

EXAMPLES = (
    "  ckptstore verify runs/exp1                      # every checkpoint\n"
    "  ckptstore verify runs/exp1/step_00000500\n"
    "  ckptstore verify s3://my-bucket/runs/exp1 --json"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="ROOT|CKPT")
    p.add_argument("--step", type=int_at_least(0), metavar="N", help="only checkpoint N of ROOT")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--jobs", type=int_at_least(1), metavar="N", help="threads (default: cores)")


def run(args: argparse.Namespace) -> int:
    targets: list[tuple[str, str]] = []  # (name, status)
    notes: list[str] = []
    parts: dict[str, int] = {}  # node-local parts: how many shard files lie elsewhere
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
            targets, notes, parts = root_targets(backend, args.target)
            # Lightning's *.ckpt checkpoints too (alone, or beside step_N ones: these
            # were passed over without a word then)
            targets += [(n, "named") for n in other_checkpoints(backend)]
            if not targets:
                raise usage_error(
                    f"no checkpoints under {backend.url}: nothing to verify; check the path "
                    f"(ckptstore ls {args.target} --all)"
                )
    from ckptstore.engine.ops import verify  # torch (DCP metadata); --help does without

    # Reads are latency-bound on object stores (one request per chunk): more in flight.
    threads = args.jobs or (min(8, os.cpu_count() or 1) if backend.capabilities.local else 16)
    results: list[dict[str, Any]] = []
    checked: list[str] = []  # notes on checkpoints deleted while checked
    looked = 1  # listings of the root
    with ThreadPoolExecutor(threads, thread_name_prefix="ckptstore-verify") as pool:
        while True:
            for name, listed_as in targets:
                status(f"checking {name}")
                try:
                    problems = verify(backend, name, pool, manifest_key=manifest_key())
                finally:
                    status(None)
                if problems and not single and not backend.exists(f"{name}/{MANIFEST_FILE}"):
                    # Gone while it was read: deleted (retention of a run writing there,
                    # prune), then no longer a checkpoint and not a damaged one; or set
                    # aside by a run that found it damaged too. Still there (a file in
                    # its place, or its manifest lost: not committed when listed):
                    # damaged, as read. (An object store deletes the manifest first,
                    # then the files: a committed one mid-delete is still listed.)
                    listed = backend.list_names()
                    aside = [n for n in listed if n.startswith(f"{name}.damaged-")]
                    if aside:
                        problems.append(
                            f"set aside as {aside[-1]} (damaged) while it was being checked"
                        )
                    elif name not in listed or listed_as == "committed":
                        checked.append(f"{name}: deleted while it was being checked, not counted")
                        continue
                results.append(
                    {
                        "name": name,
                        "url": f"{backend.url}/{name}",
                        "ok": not problems,
                        "problems": [without_verify_hint(p) for p in problems],
                    }
                )
                if not args.json:
                    show(results[-1], parts)
            if results or single or looked == RELISTS:
                break
            # Every one listed was deleted while verify started or read it (the
            # retention of a run saving often): list again, for those saved since
            done = {n for n, _ in targets}
            looked += 1
            targets, again, more = root_targets(backend, args.target)
            targets = [t for t in targets if t[0] not in done]
            notes = again  # (what the last listing found: the first one's may be gone)
            parts.update(more)
            if not targets:
                break
    notes = checked + notes
    bad = [r for r in results if not r["ok"]]
    shared = shared_damage(backend, bad, bool(parts))
    if args.json:
        emit_json(
            {"root": backend.url, "ok": not bad, "checkpoints": results, "notes": notes + shared}
        )
        return FAILED if bad else OK
    for n in notes:
        print(f"note: {n}")
    if not results:
        print(
            f"no checkpoint left to check: every one was deleted while verify ran ({looked} "
            "listings of the root; a run saving there deletes them this fast)"
        )
        return OK
    if not bad:
        print(f"all {len(results)} checkpoint(s) intact" if not single else "intact")
        return OK
    for n in shared:
        print(f"note: {n}")
    unsigned = [r for r in bad if all(UNSIGNED in p for p in r["problems"])]
    if unsigned:
        # Intact manifests (their checksums matched) without this key's signature: a
        # wrong key says this of every checkpoint; "delete the damaged ones" must not
        # be the advice then
        print(
            f"{len(unsigned)} of {len(results)} checkpoint(s) not signed with the key in "
            f"CKPTSTORE_MANIFEST_KEY: {', '.join(r['name'] for r in unsigned)}. Their "
            "manifests are intact but unsigned, or signed with another key (or altered "
            "and re-checksummed): check the key before anything else; run verify without "
            "it to check their bytes"
        )
        bad = [r for r in bad if r not in unsigned]
        if not bad:
            return FAILED
    names = ", ".join(r["name"] for r in bad)
    if any(r["name"] in parts for r in bad):
        print(
            f"{len(bad)} of {len(results)} checkpoint(s) damaged: {names}. These are this "
            "node's parts of checkpoints saved to node-local disks: resume the run with its "
            "backup (ckptstore train --backup, CheckpointManager(backup=...)), whose ranks "
            "then read their parts of a damaged step from there, or delete the damaged ones "
            "(pull and sync copy whole checkpoints, not parts)"
        )
        return FAILED
    get = "pull" if backend.capabilities.local else "send"
    resume = (
        f"None is intact: {get}"
        if len(bad) == len(results) and not single
        else f"Load or resume from an intact one (ckptstore ls shows them), {get}"
    )
    # (an object store is usually the backup itself: the good copy is on the training
    # disk, and sync sends it; pull brings one to a local root)
    repair = (
        "from a backup with ckptstore pull --replace-damaged"
        if backend.capabilities.local
        else f"with ckptstore sync <intact source> {backend.url} --verify-existing "
        "--replace-damaged"
    )
    print(
        f"{len(bad)} of {len(results)} checkpoint(s) damaged: {names}. {resume} a good copy "
        f"{repair}, or delete the damaged ones"
    )
    return FAILED


RELISTS = 3  # listings of a root whose listed checkpoints were all deleted meanwhile


def show(result: dict[str, Any], parts: dict[str, int]) -> None:
    name, problems = result["name"], result["problems"]
    if problems:
        print(f"BAD  {name}")
        for p in problems:
            print(f"     {p}")
    elif name in parts:
        print(
            f"OK   {name} (this node's part; {parts[name]} shard file(s) on other "
            "nodes' disks are checked there)"
        )
    else:
        print(f"OK   {name}")
    sys.stdout.flush()


def root_targets(
    backend: Any, target: str
) -> tuple[list[tuple[str, str]], list[str], dict[str, int]]:
    """What ``verify ROOT`` checks: (name, status) of each checkpoint under the root,
    the notes on what it leaves alone, and of node-local parts how many shard files lie
    elsewhere."""
    targets: list[tuple[str, str]] = []
    notes: list[str] = []
    parts: dict[str, int] = {}
    entries = scan(backend, everything=True)
    for e in entries:
        if e.status == "damaged":
            notes.append(
                f"{e.name}: set aside as damaged, not checked; remove it once you have "
                "looked at it (ckptstore never deletes it)"
            )
            continue
        if e.status == "retired":
            notes.append(
                f"{e.name}: set aside when a run resumed an earlier checkpoint and "
                "discarded the newer ones, not checked; remove it when you no longer "
                "want it (ckptstore never deletes it)"
            )
            continue
        if e.status == "uncommitted" and (
            e.name.startswith(TEMP_PREFIX) or not backend.capabilities.local
        ):
            # Object stores write in place: a save in progress looks like this too.
            what = (
                "a deletion in progress, or a dead one (a checkpoint renamed away, then removed)"
                if e.name.startswith(f"{TEMP_PREFIX}deleted-")
                else "uncommitted (a save in progress, or a dead one)"
            )
            notes.append(f"{e.name}: {what}, not checked; ckptstore gc {target} removes dead ones")
            continue
        targets.append((e.name, e.status))
        if e.manifest is not None and e.manifest.part is not None:
            parts[e.name] = len(e.manifest.part.elsewhere)
    return targets, notes, parts


def shared_damage(backend: Any, bad: list[dict[str, Any]], parts: bool = False) -> list[str]:
    """On a local disk, the damaged files several checkpoints share (incremental saves
    hard-link one file into each): one line per file, naming them."""
    if not backend.capabilities.local:
        return []
    holders: dict[tuple[int, int], list[str]] = {}
    first: dict[tuple[int, int], str] = {}
    for r in bad:
        for p in r["problems"]:
            path = p.split(": ", 1)[0]
            if not path.startswith(f"{backend.url}/{r['name']}/"):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if r["name"] not in holders.setdefault(key, []):
                holders[key].append(r["name"])
                first.setdefault(key, path.removeprefix(f"{backend.url}/"))
    return [
        f"{', '.join(names)} share one damaged file, {first[key]} (incremental saves link "
        "one file into each)"
        + (
            ""
            if parts
            else f": an intact copy of it repairs them all, e.g. ckptstore pull <backup> "
            f"{backend.url} --replace-damaged"
        )
        for key, names in holders.items()
        if len(names) > 1
    ]
