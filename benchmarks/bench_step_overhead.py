"""What ``CheckpointManager.maybe_save`` costs the training thread on a step that does not
save, at several numbers of ranks (issue 17: < 0.1 ms per step, whatever the ranks).

    python benchmarks/bench_step_overhead.py [--ranks 2,4,8] [--steps 400] [--step-ms 5]
                                             [--out DIR]

Real gloo processes on this machine. Each rank runs ``--steps`` steps of a stand-in for
training (``--step-ms`` of sleep) and calls ``maybe_save`` after each, under two save
policies: ``SaveEvery(steps=10**9)`` (never due: the ranks still agree every step on
stops and failures) and ``SaveEvery(seconds=10**9)`` (a clock policy: the ranks must
also agree on whether it is due). Timed: each ``maybe_save`` call on the training thread
(its median and 99th percentile over the steps, the worst rank shown), against a
blocking ``all_reduce`` of one flag per step on the same machine, which is what agreeing
at once would cost. JSON in --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import machine_info, write_json

import ckptstore


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rank(rank: int, world: int, init: str, work: str, steps: int, step_s: float, out) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    state = {"w": torch.zeros(16)}
    timings: dict[str, list[float]] = {}
    policies = {
        "steps policy": ckptstore.SaveEvery(steps=10**9),
        "clock policy": ckptstore.SaveEvery(seconds=10**9),
    }
    for label, policy in policies.items():
        root = os.path.join(work, label.replace(" ", "-"))
        with ckptstore.CheckpointManager(root, save=policy) as mgr:
            spent = []
            for step in range(steps):
                time.sleep(step_s)
                start = time.perf_counter()
                mgr.maybe_save(step, state)
                spent.append(time.perf_counter() - start)
            timings[label] = spent[10:]  # the first steps connect the group's pairs
    flag = torch.zeros(1)
    spent = []
    for _ in range(steps):
        time.sleep(step_s)
        start = time.perf_counter()
        dist.all_reduce(flag)
        spent.append(time.perf_counter() - start)
    timings["blocking all_reduce"] = spent[10:]
    out.put((rank, {k: (statistics.median(v), _percentile(v, 0.99)) for k, v in timings.items()}))
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, steps: int, step_s: float) -> dict[str, dict[str, float]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as work:
        init = f"file://{work}/store"
        procs = [
            ctx.Process(target=_rank, args=(r, world, init, work, steps, step_s, out))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(60)
    worst: dict[str, dict[str, float]] = {}
    for label in results[0]:
        worst[label] = {
            "median_us": max(r[label][0] for r in results.values()) * 1e6,
            "p99_us": max(r[label][1] for r in results.values()) * 1e6,
        }
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="2,4,8", help="comma-separated world sizes")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--out", default="benchmarks/results/issue17-step")
    args = ap.parse_args()
    try:
        worlds = [int(x) for x in args.ranks.split(",")]
        if any(w < 2 for w in worlds):
            raise ValueError
    except ValueError:
        ap.error(f"--ranks wants world sizes of 2 or more, like 2,4,8; got {args.ranks!r}")
    if args.steps < 20:
        ap.error("--steps must be at least 20 (the first 10 are not timed)")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = {}
    for world in worlds:
        rows[world] = run(world, args.steps, args.step_ms / 1e3)
        for label, r in rows[world].items():
            print(
                f"{world:>4} ranks  {label:<20} median {r['median_us']:8.1f} us  "
                f"p99 {r['p99_us']:8.1f} us (worst rank)",
                flush=True,
            )
    path = write_json(
        args.out,
        "step-overhead",
        {"args": vars(args), "machine": machine_info(tempfile.gettempdir()), "ranks": rows},
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
