"""Replicas stage only what they write: the stall of a save on N gloo ranks holding the
same state (DDP), with the skip on and off (issue 18, on CPU).

    python benchmarks/bench_replicas.py [--ranks 2] [--tensors 16] [--mb 16] [--saves 8] [--rounds 2]

Each round runs the ranks twice, skip off then on (``StagingPool._skip_for`` patched
to skip nothing for "off"), each rank saving ``--saves`` times with a
``Checkpointer`` (codec none, ``save_async`` then ``wait``; a barrier between saves).
Reported per round and mode: each rank's median stall and durable time over the saves
after the first. JSON in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ranks_ab import join, parser, rounds, save_rows


def rank_main(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import ckptstore
    from ckptstore.engine import stager

    join(args)
    if args.mode == "off":
        stager.StagingPool._skip_for = lambda self, prep: frozenset()  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(0)
    n = args.mb * (1 << 20) // 4
    state = {f"w{i}": torch.randn(n, generator=g) for i in range(args.tensors)}
    ck = ckptstore.Checkpointer(
        f"{args.workdir}/ckpt", codec="none", process_group=dist.group.WORLD
    )
    stalls, durable = [], []
    for step in range(1, args.saves + 1):
        t0 = time.perf_counter()
        pending = ck.save_async(state, step)
        stalls.append(time.perf_counter() - t0)
        pending.wait()
        durable.append(time.perf_counter() - t0)
        dist.barrier()
    ck.close()
    dist.destroy_process_group()
    print(json.dumps({"rank": args.rank, "stall_s": stalls, "durable_s": durable}))


def main() -> None:
    ap = parser(__doc__, ranks=2, saves=8)
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--mb", type=int, default=16, help="MB per tensor")
    args = ap.parse_args()
    if args.rank is not None:
        rank_main(args)
        return
    rows = []
    for rnd, mode, ranks in rounds(__file__, args.ranks, ("off", "on"), args.rounds):
        for got in ranks:
            row = {
                "round": rnd,
                "mode": mode,
                "rank": got["rank"],
                "stall_s": statistics.median(got["stall_s"][1:]),
                "durable_s": statistics.median(got["durable_s"][1:]),
            }
            rows.append(row)
            print(
                f"round {row['round']} skip {mode:3} rank {row['rank']}: stall "
                f"{row['stall_s']:.4f} s, durable {row['durable_s']:.4f} s",
                flush=True,
            )
    save_rows(args.out, "replicas", rows)


if __name__ == "__main__":
    main()
