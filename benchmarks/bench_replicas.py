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
import subprocess
import sys
import tempfile
import time


def rank_main(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import ckptstore
    from ckptstore.engine import stager

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{args.workdir}/store", rank=args.rank, world_size=args.ranks
    )
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--mb", type=int, default=16, help="MB per tensor")
    ap.add_argument("--saves", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is not None:
        rank_main(args)
        return
    rows = []
    for rnd in range(args.rounds):
        for mode in ("off", "on"):
            with tempfile.TemporaryDirectory() as work:
                procs = [
                    subprocess.Popen(
                        [sys.executable, __file__, *sys.argv[1:], "--rank", str(r),
                         "--mode", mode, "--workdir", work],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for r in range(args.ranks)
                ]  # fmt: skip
                outs = [p.communicate()[0] for p in procs]
                if any(p.returncode for p in procs):
                    sys.exit(f"a rank failed in round {rnd + 1}, mode {mode}")
            for out in outs:
                got = json.loads(out.strip().splitlines()[-1])
                row = {
                    "round": rnd + 1,
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
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"replicas-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"command": " ".join(["python", *sys.argv]), "rows": rows}, f, indent=1)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
