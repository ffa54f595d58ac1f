"""Time until backed up through ``CheckpointManager(backup=...)``, per codec, over a slow link.

    python benchmarks/bench_backup_auto.py [--size-mb 128] [--mbps 50] [--repeats 2] [--out DIR]

A moto server process on loopback behind the rate-limited proxy of ``bench_s3.py``; for
each codec (``none``, ``zstd``, ``auto``) a fresh manager with ``backup=`` saves the same
GPT + AdamW state three times, each time from ``maybe_save`` until ``wait_backup()``
returns (local commit, upload, read-back verification). Shows whether ``codec="auto"``
compresses when the upload, not the local disk, is what takes the time.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_s3 import ThrottleProxy, build_state
from common import machine_info, write_json

from ckptstore import CheckpointManager, SaveEvery
from ckptstore.storage.testing.s3server import S3Server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=float, default=128)
    ap.add_argument("--mbps", type=float, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    server = S3Server().start()
    runs: dict[str, list[dict]] = {}
    try:
        state, _ = build_state(args.size_mb)
        proxy = ThrottleProxy(server.port, args.mbps).start()
        try:
            for _ in range(args.repeats):
                for codec in ("none", "zstd", "auto"):
                    bucket = server.new_bucket()
                    with (
                        tempfile.TemporaryDirectory() as d,
                        CheckpointManager(
                            d,
                            save=SaveEvery(steps=1),
                            backup=f"s3://{bucket}/r",
                            backup_options=server.options(proxy.url),
                            codec=codec,
                        ) as mgr,
                    ):
                        times = []
                        for step in range(3):
                            t0 = time.perf_counter()
                            mgr.maybe_save(step, state)
                            assert mgr.wait_backup() == []
                            times.append(time.perf_counter() - t0)
                        infos = mgr.checkpointer.list()
                    r = {
                        "times_s": times,
                        "codecs": [i.manifest.codec["id"] for i in infos],
                        "stored_bytes": [i.manifest.stored_bytes for i in infos],
                    }
                    runs.setdefault(codec, []).append(r)
                    print(codec, [f"{t:.2f}" for t in times], r["codecs"], flush=True)
        finally:
            proxy.stop()
    finally:
        server.stop()
    medians = {c: statistics.median(t for r in rs for t in r["times_s"]) for c, rs in runs.items()}
    path = write_json(
        args.out,
        "backup-auto",
        {"machine": machine_info(tempfile.gettempdir()), "workload": vars(args), "runs": runs,
         "median_s": medians},
    )  # fmt: skip
    print("\n| codec | until backed up (median) | vs none | uploaded per save |")
    print("|---|---|---|---|")
    for c, m in medians.items():
        mb = runs[c][0]["stored_bytes"][0] / 1e6
        print(f"| {c} | {m:.2f} s | {m / medians['none']:.2f} | {mb:.0f} MB |")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
