"""Plans reused while the layout holds (issue 17): save times on N gloo ranks with the
reuse on and off, each run's last checkpoint loaded back and compared.

    python benchmarks/bench_plan_reuse.py [--ranks 4] [--tensors 2000] [--kb 80] [--saves 6] [--rounds 2]

Each rank holds ``--tensors`` tensors of its own (``--kb`` each: above the size that
ckptstore packs, so each is an item of DCP's plan) and one replicated 1 MB tensor, and
saves them ``--saves`` times with a ``Checkpointer`` (codec none, ``save_async`` then
``wait``, a barrier between saves). "off" patches ``PlanCache.local_plan`` to always
send the whole plan: every save is planned from scratch, as before issue 17. Reported
per round and mode: rank 0's median durable time over the saves after the first (the
save is collective: rank 0 finishes last), and its time in the coordinator's steps,
timed through ``PlanCache``'s calls: from the gathered plans to its own plan back
(global plan, storage plans, the scatter) plus from the gathered results to the end
(``.metadata``, manifest, commit, the outcome's broadcast). Each run's last checkpoint
is loaded by every rank and compared. JSON in --out.
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
    from ckptstore.dcp import driver
    from ckptstore.dcp.plancache import PlanCache

    join(args)
    if args.mode == "off":
        PlanCache.local_plan = lambda self, plan: (self._next.update(local=plan), plan)[1]  # type: ignore[method-assign]
    coordinator_s: list[float] = []  # the global-plan and finish steps, per save
    expand, outcome = PlanCache.expand, PlanCache.outcome
    clock: dict[str, float] = {}

    def timed_expand(self, plans):
        clock["t0"] = time.perf_counter()
        return expand(self, plans)

    def timed_outcome(self, gathered):
        clock["t1"] = time.perf_counter()
        return outcome(self, gathered)

    PlanCache.expand, PlanCache.outcome = timed_expand, timed_outcome  # type: ignore[method-assign]
    commit = PlanCache.commit

    def timed_commit(self):
        if "t0" in clock:
            # global step: from expand to the writer's scattered plans (noted when
            # final_plan ran on this rank); finish: from outcome to commit
            coordinator_s.append(clock.pop("plan") + time.perf_counter() - clock.pop("t1"))
            clock.pop("t0")
        commit(self)

    final_plan = PlanCache.final_plan

    def timed_final(self, central):
        if "t0" in clock:
            clock["plan"] = time.perf_counter() - clock["t0"]
        return final_plan(self, central)

    PlanCache.commit, PlanCache.final_plan = timed_commit, timed_final  # type: ignore[method-assign]
    assert driver  # patched through PlanCache, which the driver calls
    g = torch.Generator().manual_seed(args.rank)
    n = args.kb * 1024 // 4
    state = {
        "own": {f"r{args.rank}.w{i}": torch.randn(n, generator=g) for i in range(args.tensors)},
        "shared": torch.arange(256 * 1024, dtype=torch.float32),
    }
    ck = ckptstore.Checkpointer(
        f"{args.workdir}/ckpt", codec="none", process_group=dist.group.WORLD
    )
    durable = []
    for step in range(1, args.saves + 1):
        for t in state["own"].values():
            t.add_(1.0)
        dist.barrier()
        t0 = time.perf_counter()
        ck.save_async(state, step).wait()
        durable.append(time.perf_counter() - t0)
    dist.barrier()
    target = {
        "own": {k: torch.zeros_like(v) for k, v in state["own"].items()},
        "shared": torch.zeros(256 * 1024),
    }
    ck.load(target)
    same = all(torch.equal(target["own"][k], v) for k, v in state["own"].items())
    same = same and torch.equal(target["shared"], state["shared"])
    reused = ck._save_cache.plans.reused
    ck.close()
    dist.destroy_process_group()
    print(
        json.dumps(
            {
                "rank": args.rank,
                "durable_s": durable,
                "coordinator_s": coordinator_s,
                "reused": reused,
                "bit_exact": same,
            }
        )
    )


def main() -> None:
    ap = parser(__doc__, ranks=4, saves=6)
    ap.add_argument("--tensors", type=int, default=2000, help="tensors per rank")
    ap.add_argument("--kb", type=int, default=80, help="KB per tensor")
    args = ap.parse_args()
    if args.rank is not None:
        rank_main(args)
        return
    rows = []
    for rnd, mode, ranks in rounds(__file__, args.ranks, ("off", "on"), args.rounds):
        got = ranks[0]
        if not all(r["bit_exact"] for r in ranks):
            sys.exit(f"round {rnd}, reuse {mode}: a rank loaded different values")
        row = {
            "round": rnd,
            "mode": mode,
            "durable_s": statistics.median(got["durable_s"][1:]),
            "coordinator_s": statistics.median(got["coordinator_s"][1:]),
            "first_coordinator_s": got["coordinator_s"][0],
            "reused": got["reused"],
        }
        rows.append(row)
        print(
            f"round {rnd} reuse {mode:3}: rank 0 durable {row['durable_s']:.3f} s, of which "
            f"coordinator {row['coordinator_s']:.3f} s (first save: "
            f"{row['first_coordinator_s']:.3f} s); plans reused in {row['reused']} saves",
            flush=True,
        )
    save_rows(args.out, "plan-reuse", rows)


if __name__ == "__main__":
    main()
