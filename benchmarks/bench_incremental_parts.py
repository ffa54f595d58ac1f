"""Where an incremental save's durable time goes (issue 19's 0.15x target): a diagnostic.

    python benchmarks/bench_incremental_parts.py [--size-mb 250] [--saves 15] [--rounds 2]
        [--target DIR] [--out DIR]

The fine-tuning state of ``ckptstore bench --incremental`` (a GPT whose weights are
frozen, LoRA-style adapters and their AdamW moments ~5% of the bytes), saved with
``incremental=True, trust_version_counters=True`` (codec none) in four variants, each in a
fresh process, alternated over ``--rounds``:

- ``same``: nothing changed since the last save (no AdamW step): the fixed cost of a save
  that links everything, plus the hash of the trusted (unchanged) tensors;
- ``same-nohash``: the same without that hash;
- ``step``: one AdamW step before each save (the bench's case: the adapters and their
  moments are written, ~5%);
- ``step-nohash``: the same without that hash;

and a full save (``incremental=False``) of the state after each step, in the ``step``
runs. **The ``-nohash`` variants are not valid saves**: they turn off the hash that makes
trusting version counters safe (``engine.unchanged.Later``: a write behind a counter is
then not caught). They exist only to measure what that hash costs once it shares the
cores with the rest of the save. Reported: median durable ms per variant (the saves after
the first two), the full save's, and their ratios; then the floor (:func:`floor`): the hash
of the unchanged bytes alone, on one thread and on two, and a copy of them, against the
full save; JSON in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine_info, summarize, write_json

VARIANTS = ("same", "same-nohash", "step", "step-nohash")


def drop_older(root: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (disk space: 250 MB a full save)."""
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and "." not in n)
    for name in names[:-keep]:
        shutil.rmtree(os.path.join(root, name))


def one(variant: str, size_mb: int, saves: int, target: str) -> dict:
    """In this process: ``saves`` saves of one variant (module doc)."""
    import ckptstore
    import ckptstore.engine.unchanged as unchanged
    from ckptstore.bench.incremental import trained

    if variant.endswith("-nohash"):  # not a valid save: measurement only (module doc)
        unchanged.Later.begin = lambda self: None  # type: ignore[method-assign]
        unchanged.Later.confirm = lambda self: None  # type: ignore[method-assign]
    state, step = trained(size_mb * 1_000_000, frozen=True)
    stepping = variant.startswith("step")
    work = tempfile.mkdtemp(dir=target)
    inc = ckptstore.Checkpointer(
        os.path.join(work, "inc"), codec="none", incremental=True, trust_version_counters=True
    )
    full = ckptstore.Checkpointer(os.path.join(work, "full"), codec="none") if stepping else None
    times: dict[str, list[float]] = {"incremental": [], "full": []}
    written = 0
    try:
        inc.save(state, step=0)
        for n in range(1, saves + 1):
            if stepping:
                step()
            os.sync()
            t0 = time.perf_counter()
            written = inc.save(state, step=n).stored_bytes
            times["incremental"].append(time.perf_counter() - t0)
            if full is not None:
                os.sync()
                t0 = time.perf_counter()
                full.save(state, step=n)
                times["full"].append(time.perf_counter() - t0)
                drop_older(os.path.join(work, "full"), keep=1)
            drop_older(os.path.join(work, "inc"), keep=1)  # the next save links from it
    finally:
        inc.close()
        if full is not None:
            full.close()
        shutil.rmtree(work, ignore_errors=True)
    return {"times_s": times, "written_bytes": written}


def floor(nbytes: int, full_ms: float) -> dict:
    """What reading the unchanged bytes once costs on this host, whatever the save does
    around it: their hash (xxh3-128 in 8 MiB pieces, as a save does) on one thread and
    split over two, and a copy of them; medians of 5, in ms and as a fraction of the
    full save. An incremental save has to hash them (the truth issue 19 asks for), so
    its durable time cannot fall below the hash's, however the rest overlaps it."""
    import threading

    import torch
    import xxhash

    from ckptstore.dcp.hashing import PIECE

    data = torch.ones(nbytes, dtype=torch.uint8)
    view = memoryview(data.numpy())

    def hash_range(lo: int, hi: int) -> None:
        for k in range(lo, hi, PIECE):
            xxhash.xxh3_128_hexdigest(view[k : min(k + PIECE, hi)])

    def two() -> None:
        half = nbytes // 2 // PIECE * PIECE
        threads = [threading.Thread(target=hash_range, args=r) for r in ((0, half), (half, nbytes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    other = torch.empty_like(data)
    ways = {
        "hash_1_thread": lambda: hash_range(0, nbytes),
        "hash_2_threads": two,
        "copy": lambda: other.copy_(data),
    }
    out: dict[str, dict] = {}
    for name, fn in ways.items():
        fn()  # (pages touched once)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        out[name] = {"ms": ms, "of_full": ms / full_ms, "GB_per_s": nbytes / ms / 1e6}
        print(f"floor: {name} of the {nbytes / 1e6:.0f} MB unchanged: {ms:.1f} ms "
              f"({nbytes / ms / 1e6:.1f} GB/s), {ms / full_ms:.3f}x the full save")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=250, help="state size (default 250)")
    ap.add_argument("--saves", type=int, default=15, help="saves per run (first two not counted)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternated")
    ap.add_argument("--target", default="bench-results/data", help="directory to save into")
    ap.add_argument("--out", default="bench-results", help="directory for the JSON result")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # (a child process)
    args = ap.parse_args()
    if args.saves < 3:
        ap.error(f"--saves must be at least 3: the first two are not counted (got {args.saves})")
    if args.size_mb < 1 or args.rounds < 1:
        ap.error("--size-mb and --rounds must be at least 1")
    os.makedirs(args.target, exist_ok=True)
    if args.one:
        print(json.dumps(one(args.one, args.size_mb, args.saves, args.target)))
        return
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS)):
            cmd = [sys.executable, __file__, "--one", variant, "--size-mb", str(args.size_mb)]
            cmd += ["--saves", str(args.saves), "--target", args.target]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{variant} failed ({out.returncode}):\n{out.stderr[-3000:]}")
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {variant} done", file=sys.stderr, flush=True)
    result: dict[str, dict] = {}
    fulls = [
        t for v in ("step", "step-nohash") for run in runs[v] for t in run["times_s"]["full"][2:]
    ]
    full_ms = statistics.median(fulls) * 1e3
    print(f"| variant | durable ms (median) | / full save ({full_ms:.1f} ms) | written MB |")
    print("|---|---:|---:|---:|")
    for variant in VARIANTS:
        times = [t for run in runs[variant] for t in run["times_s"]["incremental"][2:]]
        ms = statistics.median(times) * 1e3
        written = runs[variant][-1]["written_bytes"]
        result[variant] = {"durable_s": summarize(times), "ratio": ms / full_ms, "written": written}
        print(f"| {variant} | {ms:.1f} | {ms / full_ms:.3f}x | {written / 1e6:.2f} |")
    result["full"] = {"durable_s": summarize(fulls)}
    hashed = args.size_mb * 1_000_000 - runs["step"][-1]["written_bytes"]
    result["floor"] = floor(hashed, full_ms)
    path = write_json(
        args.out,
        "incremental-parts",
        {
            "benchmark": "incremental-parts",
            "command": " ".join(sys.argv),
            "machine": machine_info(args.target),
            "result": result,
            "runs": runs,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
