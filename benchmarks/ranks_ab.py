"""Run N gloo ranks of a benchmark script in two modes, alternating, and collect what
each rank printed as its last line of JSON (bench_replicas.py, bench_plan_reuse.py)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any


def join(args: Any) -> None:
    """In a rank: one intra-op thread, and the gloo group of ``args.ranks`` ranks."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{args.workdir}/store", rank=args.rank, world_size=args.ranks
    )


def parser(doc: str, *, ranks: int, saves: int) -> argparse.ArgumentParser:
    """The arguments both scripts take (--ranks, --saves, --rounds, --out) and those
    ``rounds`` gives each rank (hidden from --help); each script adds its own."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=ranks)
    ap.add_argument("--saves", type=int, default=saves)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench-results")
    for name, kind in (("--rank", int), ("--mode", str), ("--workdir", str)):
        ap.add_argument(name, type=kind, help=argparse.SUPPRESS)
    return ap


def rounds(
    script: str, ranks: int, modes: tuple[str, str], n_rounds: int
) -> Iterator[tuple[int, str, list[dict[str, Any]]]]:
    """Per round and mode (``modes`` alternate): every rank's JSON. Each rank runs
    ``script`` with this process's arguments plus ``--rank R --mode M --workdir DIR``
    (a fresh temp directory per run, where ranks meet through a FileStore)."""
    for rnd in range(n_rounds):
        for mode in modes:
            with tempfile.TemporaryDirectory() as work:
                procs = [
                    subprocess.Popen(
                        [sys.executable, script, *sys.argv[1:], "--rank", str(r),
                         "--mode", mode, "--workdir", work],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for r in range(ranks)
                ]  # fmt: skip
                outs = [p.communicate()[0] for p in procs]
                if any(p.returncode for p in procs):
                    sys.exit(f"a rank failed in round {rnd + 1}, mode {mode}")
            yield rnd + 1, mode, [json.loads(out.strip().splitlines()[-1]) for out in outs]


def save_rows(out: str, prefix: str, rows: list[dict[str, Any]]) -> None:
    """``rows`` and the command that made them, as ``out/prefix-<time>.json``."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"command": " ".join(["python", *sys.argv]), "rows": rows}, f, indent=1)
    print(f"results: {path}")
