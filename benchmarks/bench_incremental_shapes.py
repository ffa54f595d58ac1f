"""Full training with incremental saves on and off, in three shapes of state (issue 19:
"full training: no slower than today's full save").

    python benchmarks/bench_incremental_shapes.py [--shapes small,mid,large] [--saves 12]
        [--target DIR] [--out DIR] [--frozen]

Every tensor is changed in place before every save (full training: nothing can be
linked), and two ``Checkpointer`` (codec none) save the same state, one with
``incremental=True`` and one without, alternating which goes first. Shapes: ``small``
40,000 tensors of 1 KB (packed), ``mid`` 1,000 of 256 KB, ``large`` 4 of 64 MB.
Reported per shape and mode: the caller's stall and the time until durable (``save``
returns once committed), medians over the saves after the first two, and the ratio of
the durable medians. ``--frozen`` changes nothing between saves instead (everything is
linked). Each mode keeps its last two checkpoints (the newest is what the next save links
from), so ``--target`` needs ~4x the state: 1 GB for ``large``. JSON in --out, with the
ckptstore it ran (its path, and the git commit where it is a checkout).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from common import machine_info, summarize, write_json

import ckptstore
from ckptstore.layout import checkpoint_name

SHAPES = {"small": (40_000, 256), "mid": (1_000, 64 << 10), "large": (4, 16 << 20)}


def run_shape(shape: str, saves: int, target: str, frozen: bool) -> dict:
    count, numel = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    state = {"t": {f"p{i}": torch.randn(numel, generator=gen) for i in range(count)}}
    root = tempfile.mkdtemp(prefix=f"shapes-{shape}-", dir=target)
    modes = {"incremental": True, "full": False}
    ckpts = {
        m: ckptstore.Checkpointer(os.path.join(root, m), codec="none", incremental=inc)
        for m, inc in modes.items()
    }
    stall: dict[str, list[float]] = {m: [] for m in modes}
    durable: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for n in range(1, saves + 1):
            order = list(modes) if n % 2 else list(reversed(modes))
            for m in order:
                if not frozen:
                    for t in state["t"].values():
                        t.add_(1e-3)
                os.sync()
                start = time.perf_counter()
                result = ckpts[m].save(state, step=n)
                took = time.perf_counter() - start
                if n > 2:
                    stall[m].append(result.stall_s)
                    durable[m].append(took)
                if n > 2:  # keep the disk bounded: the next save links from step n only
                    ckpts[m].backend.delete(checkpoint_name(n - 2))
    finally:
        for ck in ckpts.values():
            ck.close()
        shutil.rmtree(root, ignore_errors=True)
    out = {
        "tensors": count,
        "tensor_bytes": numel * 4,
        "stall_s": {m: summarize(v) for m, v in stall.items()},
        "durable_s": {m: summarize(v) for m, v in durable.items()},
    }
    out["durable_ratio"] = statistics.median(durable["incremental"]) / statistics.median(
        durable["full"]
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shapes", default="small,mid,large", help="comma-separated: small, mid, large"
    )
    ap.add_argument(
        "--saves", type=int, default=12, help="saves per mode (the first two not counted)"
    )
    ap.add_argument("--target", default="bench-results/data", help="directory to save into")
    ap.add_argument("--out", default="bench-results", help="directory for the JSON result")
    ap.add_argument("--frozen", action="store_true", help="change nothing between saves")
    args = ap.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if not shapes:
        ap.error(f"--shapes names none: give one or more of {', '.join(SHAPES)}")
    if unknown:
        ap.error(f"--shapes takes {', '.join(SHAPES)} (got {', '.join(unknown)})")
    if args.saves < 3:
        ap.error(f"--saves must be at least 3: the first two are not counted (got {args.saves})")
    os.makedirs(args.target, exist_ok=True)
    results = {}
    print("| shape | stall incremental / full (ms) | durable incremental / full (ms) | ratio |")
    print("|---|---:|---:|---:|")
    for shape in shapes:
        r = results[shape] = run_shape(shape, args.saves, args.target, args.frozen)
        st, du = r["stall_s"], r["durable_s"]
        print(
            f"| {r['tensors']:,} x {r['tensor_bytes'] >> 10:,} KB "
            f"| {st['incremental']['median'] * 1e3:.1f} / {st['full']['median'] * 1e3:.1f} "
            f"| {du['incremental']['median'] * 1e3:.1f} / {du['full']['median'] * 1e3:.1f} "
            f"| {r['durable_ratio']:.3f}x |",
            flush=True,
        )
    path = write_json(
        args.out,
        "incremental-shapes",
        {
            "benchmark": "incremental-shapes",
            "command": " ".join(sys.argv),
            "machine": machine_info(args.target),
            "frozen": args.frozen,
            "result": results,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
