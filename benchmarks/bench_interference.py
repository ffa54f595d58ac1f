"""How much CPU a background save takes from training (issue 15).

    python benchmarks/bench_interference.py --mb 512 --repeats 3 --out results.json

A compute loop (matrix multiplies on --compute-threads torch threads, standing for a
CPU-bound training step) runs alone for a while, then while a save of --mb of fp32
state runs in the background, until that save is durable. Reported per contender: the
loop's speed during the save as a fraction of its speed alone (1.0: the save cost the
loop nothing), and how long the save took. Contenders: ckptstore
``Checkpointer.save_async`` with codecs none, zstd and auto; DCP ``async_save``;
``torch.save`` + fsync in a thread. Rounds alternate the contenders; medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable

import torch

import ckptstore


def compute_rate(done: Callable[[], bool], min_s: float) -> float:
    """Multiplies per second until ``done()`` (and at least ``min_s``)."""
    a = torch.randn(384, 384)
    b = torch.randn(384, 384)
    n = 0
    start = time.perf_counter()
    while True:
        torch.mm(a, b)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s and done():
            return n / elapsed


def contenders(
    state: dict[str, torch.Tensor], d: str
) -> dict[str, Callable[[str], Callable[[], bool]]]:
    def ckpt(codec: str) -> Callable[[str], Callable[[], bool]]:
        def start(path: str) -> Callable[[], bool]:
            c = ckptstore.Checkpointer(path, codec=codec)
            pending = c.save_async(state, 1)

            def done() -> bool:
                if not pending.committed.done():
                    return False
                pending.wait()
                c.close()
                return True

            return done

        return start

    def dcp_async(path: str) -> Callable[[], bool]:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fut = dcp.async_save(state, checkpoint_id=path)
        return fut.done

    def torch_save_thread(path: str) -> Callable[[], bool]:
        def work() -> None:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "ckpt.pt"), "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        t = threading.Thread(target=work)
        t.start()
        return lambda: not t.is_alive()

    return {
        "ckptstore_none": ckpt("none"),
        "ckptstore_zstd": ckpt("zstd"),
        "ckptstore_auto": ckpt("auto"),
        "dcp_async_save": dcp_async,
        "torch_save_thread": torch_save_thread,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compute-threads", type=int, default=2)
    ap.add_argument("--alone-s", type=float, default=3.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.compute_threads)
    n = 8
    state = {f"t{i}": torch.randn(args.mb * 2**20 // 4 // n) for i in range(n)}
    rows: dict[str, list[dict[str, float]]] = {}
    d = tempfile.mkdtemp(prefix="ckptstore-interference-")
    try:
        for rnd in range(args.repeats):
            for name, start in contenders(state, d).items():
                path = os.path.join(d, f"{name}-{rnd}")
                alone = compute_rate(lambda: True, args.alone_s)
                t0 = time.perf_counter()
                done = start(path)
                during = compute_rate(done, 0.0)
                took = time.perf_counter() - t0
                rows.setdefault(name, []).append(
                    {
                        "alone_per_s": alone,
                        "during_per_s": during,
                        "ratio": during / alone,
                        "save_s": took,
                    }
                )
                shutil.rmtree(path, ignore_errors=True)
                print(
                    f"round {rnd} {name}: loop at {during / alone:.0%} of alone, save {took:.1f} s",
                    flush=True,
                )
    finally:
        shutil.rmtree(d, ignore_errors=True)
    medians = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("ratio", "save_s")}
        for name, rs in rows.items()
    }
    report = {
        "mb": args.mb,
        "compute_threads": args.compute_threads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "medians": medians,
        "runs": rows,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(medians, indent=1))


if __name__ == "__main__":
    main()
