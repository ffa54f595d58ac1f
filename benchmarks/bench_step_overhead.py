"""What ``CheckpointManager.maybe_save`` costs the training thread on a step that does not
save, at several numbers of ranks (issue 17: < 0.1 ms per step, whatever the ranks).

    python benchmarks/bench_step_overhead.py [--ranks 2,4,8] [--steps 400] [--step-ms 5]
                                             [--out DIR]

Real gloo processes on this machine. Each rank runs ``--steps`` steps of a stand-in for
training and calls ``maybe_save`` after each, under two save policies:
``SaveEvery(steps=10**9)`` (never due: the ranks still agree every step on stops and
failures) and ``SaveEvery(seconds=10**9)`` (a clock policy: the ranks must also agree on
whether it is due). The stand-in (``--step-kind``): ``sleep`` (``--step-ms`` of sleep,
like a step that waits on a GPU) or ``python`` (a fixed amount of pure-Python work of
about ``--step-ms``, which holds the GIL: the worst case for the manager's agreement
thread, which can then run only when the interpreter switches threads).

Timed: each ``maybe_save`` call on the training thread (its median and 99th percentile
over the steps, the worst rank shown); and the whole step (stand-in + ``maybe_save``),
whose median minus that of the same steps without a manager ("bare steps") is what the
manager costs the loop, its threads' share of the CPU and the GIL included. Against: a
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


def _stand_in(kind: str, step_s: float, loops: int) -> None:
    if kind == "sleep":
        time.sleep(step_s)
    else:
        x = 0
        for i in range(loops):
            x += i * i


def _calibrate(step_s: float) -> int:
    """Loops of ``_stand_in("python")`` that take about ``step_s`` here."""
    start = time.perf_counter()
    _stand_in("python", 0, 100_000)
    return max(1, int(100_000 * step_s / (time.perf_counter() - start)))


def _rank(
    rank: int, world: int, init: str, work: str, steps: int, step_s: float, kind: str, out
) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    loops = _calibrate(step_s)
    state = {"w": torch.zeros(16)}
    timings: dict[str, list[float]] = {}
    whole: dict[str, list[float]] = {}
    policies = {
        "steps policy": ckptstore.SaveEvery(steps=10**9),
        "clock policy": ckptstore.SaveEvery(seconds=10**9),
    }
    for label, policy in policies.items():
        root = os.path.join(work, label.replace(" ", "-"))
        with ckptstore.CheckpointManager(root, save=policy) as mgr:
            spent, steps_s = [], []
            for step in range(steps):
                begin = time.perf_counter()
                _stand_in(kind, step_s, loops)
                start = time.perf_counter()
                mgr.maybe_save(step, state)
                end = time.perf_counter()
                spent.append(end - start)
                steps_s.append(end - begin)
            timings[label] = spent[10:]  # the first steps connect the group's pairs
            whole[label] = steps_s[10:]
    bare = []
    for _ in range(steps):
        begin = time.perf_counter()
        _stand_in(kind, step_s, loops)
        bare.append(time.perf_counter() - begin)
    whole["bare steps"] = timings["bare steps"] = bare[10:]
    flag = torch.zeros(1)
    spent = []
    for _ in range(steps):
        _stand_in(kind, step_s, loops)
        start = time.perf_counter()
        dist.all_reduce(flag)
        spent.append(time.perf_counter() - start)
    timings["blocking all_reduce"] = spent[10:]
    medians = {k: statistics.median(v) for k, v in whole.items()}
    out.put(
        (
            rank,
            {
                k: (
                    statistics.median(v),
                    _percentile(v, 0.99),
                    medians.get(k, 0) - medians["bare steps"],
                )
                for k, v in timings.items()
            },
        )
    )
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, steps: int, step_s: float, kind: str) -> dict[str, dict[str, float]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as work:
        init = f"file://{work}/store"
        procs = [
            ctx.Process(target=_rank, args=(r, world, init, work, steps, step_s, kind, out))
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
            "step_minus_bare_us": max(r[label][2] for r in results.values()) * 1e6,
        }
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="2,4,8", help="comma-separated world sizes")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--step-kind", choices=("sleep", "python"), default="sleep")
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
        rows[world] = run(world, args.steps, args.step_ms / 1e3, args.step_kind)
        for label, r in rows[world].items():
            extra = ""
            if label.endswith("policy"):
                extra = f"  whole step - bare {r['step_minus_bare_us']:8.1f} us"
            print(
                f"{world:>4} ranks  {label:<20} median {r['median_us']:8.1f} us  "
                f"p99 {r['p99_us']:8.1f} us (worst rank){extra}",
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
