"""Rank 0's serial work per save at N ranks, from synthetic plans (no ranks are run).

    python benchmarks/bench_rank0.py [--ranks 8,64,256] [--layers 80] [--out DIR]
    python benchmarks/bench_rank0.py --reuse [--ranks 8,64,256,1000] [--layers 8] [--node-local]

Every rank holds an FSDP shard (dim 0) of each parameter of a Llama-70B-shaped model
(``--layers`` x 9 matrices and norms; model, AdamW exp_avg and exp_avg_sq: 3 items per
parameter per rank). Measured on this one process, what the coordinator does in a save:
ckptstore's planner (DCP's ``create_global_plan``: dedup, metadata, validation; plus
ckptstore's per-disk dedup when the ranks' roots are node-local), the writer's
``.metadata`` assembly and pickling (``CkptStorageWriter.finish``'s share), and the size
of that ``.metadata``. Figures for 1,000 and 10,000 ranks are extrapolated from the
largest N measured (linear in items for pickling; DCP's planner is worse than linear
when shards overlap, see issue 17), and marked so. JSON in --out.

``--reuse``: the coordinator's steps of a save through ckptstore's real code
(``dcp.driver``'s global and finish steps: ``PlanCache``, ``CkptStorageWriter`` on a
local root in a temp directory, ``.metadata`` and manifest written and committed),
for the first save of a layout and for the saves after it, which reuse its plans; and
the bytes rank 0 receives and sends in each save's object collectives (what gloo's
object gather/scatter pickle; the last step broadcasts only the outcome). The other
ranks' share (their local plans, their writes) is not run. ``--node-local``: the ranks'
roots on node-local disks, 8 ranks per disk (the finish step then makes every disk's
part; the hand-out to the disks' committers is not run).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from common import write_json
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from ckptstore.dcp import metadata as md_format
from ckptstore.dcp.planner import StagedSavePlanner
from ckptstore.dcp.writer import _RankPlan

SHAPES = [
    (8192, 8192),
    (1024, 8192),
    (1024, 8192),
    (8192, 8192),
    (28672, 8192),
    (28672, 8192),
    (8192, 28672),
    (8192,),
    (8192,),
]


def plans(ranks: int, layers: int, disks: int) -> list[SavePlan]:
    out = []
    props = TensorProperties(dtype=torch.bfloat16)
    for r in range(ranks):
        items = []
        for group in ("model", "optim.exp_avg", "optim.exp_avg_sq"):
            for layer in range(layers):
                for j, shape in enumerate(SHAPES):
                    rows = -(-shape[0] // ranks)
                    start = min(r * rows, shape[0])
                    size = torch.Size([max(0, min(rows, shape[0] - start)), *shape[1:]])
                    offsets = torch.Size([start, *([0] * (len(shape) - 1))])
                    fqn = f"{group}.layers.{layer}.w{j}"
                    items.append(
                        WriteItem(
                            index=MetadataIndex(fqn, offsets),
                            type=WriteItemType.SHARD,
                            tensor_data=TensorWriteData(
                                chunk=ChunkStorageMetadata(offsets, size),
                                properties=props,
                                size=torch.Size(shape),
                            ),
                        )
                    )
        out.append(
            SavePlan(
                items,
                storage_data=_RankPlan("step_00000001", {}, f"disk{r * disks // ranks}"),
                planner_data={it.index.fqn: tuple(it.index.fqn.split(".")) for it in items},
            )
        )
    return out


def reuse_rows(n: int, layers: int, saves: int, disks: int = 1) -> list[dict[str, object]]:
    """The coordinator's work and traffic in ``saves`` saves at ``n`` ranks (--reuse),
    their roots on ``disks`` node-local disks."""
    import pickle
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from torch.distributed.checkpoint.storage import WriteResult

    from ckptstore.codecs import get_codec
    from ckptstore.dcp.plancache import PlanCache, Steady, Written
    from ckptstore.dcp.spec import SaveSpec
    from ckptstore.dcp.writer import CkptStorageWriter
    from ckptstore.engine.ops import SaveCache
    from ckptstore.storage.local import LocalBackend

    full = plans(n, layers, disks)
    cache = SaveCache()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        backend = LocalBackend(tmp, create=True)
        plan_cache: PlanCache = cache.plans
        for k in range(saves):
            name = f"step_{k + 1:08d}"
            writer = CkptStorageWriter(
                backend,
                name,
                SaveSpec(codec=get_codec("none"), step=k + 1),
                pool=pool,
                world_size=n,
                md_cache=cache.metadata,
                cache=cache,
            )
            writer.set_up_storage_writer(True, rank=0)
            mine = [
                dataclasses.replace(p, storage_data=dataclasses.replace(p.storage_data, name=name))
                for p in full
            ]
            t0 = time.perf_counter()
            sent = [plan_cache.local_plan(mine[0])]
            sent += [
                SavePlan([], storage_data=Steady(name, plan_cache.gen)) if plan_cache.gen else p
                for p in mine[1:]
            ]
            expanded, steady = plan_cache.expand(sent)
            if steady:
                global_plan, metadata = plan_cache.cached_global_plan(expanded)
            else:
                global_plan, metadata = StagedSavePlanner({}).create_global_plan(expanded)
            plan_cache.note_global(expanded, metadata)
            central = writer.prepare_global_plan(
                global_plan, gen=plan_cache.new_gen(steady), steady=steady
            )
            plan_s = time.perf_counter() - t0
            # every rank's write results (not timed: the ranks' own work), then finish
            gathered: list[object] = []
            for r, plan in enumerate(central):
                file = f"__{r}_0.distcp"
                shard = {"size_bytes": 1 << 30, "xxh3_64": f"{r:016x}", "raw_bytes": 1 << 30}
                if plan.storage_data.cached:
                    gathered.append(Written((file, shard)))
                else:
                    gathered.append(
                        [
                            WriteResult(
                                index=item.index,
                                size_in_bytes=1,
                                storage_data={
                                    "file": file,
                                    "item": i,
                                    **({"shard": shard} if i == 0 else {}),
                                },
                            )
                            for i, item in enumerate(plan.items)
                        ]
                    )
            plan_cache.final_plan(central[0])
            t0 = time.perf_counter()
            writer.finish_outcome(metadata, plan_cache.outcome(gathered))
            plan_cache.commit()
            finish_s = time.perf_counter() - t0
            received = sum(len(pickle.dumps(x)) for x in sent) + sum(
                len(pickle.dumps(x)) for x in gathered
            )
            sent_bytes = sum(len(pickle.dumps(x)) for x in central)
            row = {
                "ranks": n,
                "disks": disks,
                "layers": layers,
                "save": k + 1,
                "reused": steady,
                "items": sum(len(p.items) for p in global_plan),
                "plan_s": round(plan_s, 4),
                "finish_s": round(finish_s, 4),
                "serial_s": round(plan_s + finish_s, 4),
                "received_bytes": received,
                "sent_bytes": sent_bytes,
            }
            rows.append(row)
            print(
                f"{n:6} ranks, {disks:4} disk(s), save {k + 1} ({'plans reused' if steady else 'planned':12}): "
                f"plan {plan_s:8.3f} s, finish {finish_s:7.3f} s; rank 0 receives "
                f"{received / 2**20:8.2f} MiB, sends {sent_bytes / 2**20:8.2f} MiB"
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="8,64,256")
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--out", default="benchmarks/results/issue17-rank0")
    ap.add_argument("--reuse", action="store_true", help="first save vs saves that reuse its plans")
    ap.add_argument("--saves", type=int, default=3, help="with --reuse: saves per N")
    ap.add_argument(
        "--node-local",
        action="store_true",
        help="with --reuse: the ranks' roots on node-local disks, 8 ranks per disk",
    )
    args = ap.parse_args()
    rows = []
    if args.reuse:
        for n in (int(x) for x in args.ranks.split(",")):
            disks = max(1, n // 8) if args.node_local else 1
            rows += reuse_rows(n, args.layers, args.saves, disks)
        write_json(args.out, "reuse", {"layers": args.layers, "rows": rows})
        return
    for n in (int(x) for x in args.ranks.split(",")):
        for disks in sorted({1, max(1, n // 8)}):
            all_plans = plans(n, args.layers, disks)
            planner = StagedSavePlanner({})
            t0 = time.perf_counter()
            global_plan, metadata = planner._create_global_plan(all_plans)
            plan_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            metadata.storage_data = {
                item.index: md_format.StoredItem({"file": f"__{r}_0.distcp", "item": k})
                for r, p in enumerate(global_plan)
                for k, item in enumerate(p.items)
            }
            blob = md_format.dumps(metadata)
            pickle_s = time.perf_counter() - t0
            items = sum(len(p.items) for p in global_plan)
            row = {
                "ranks": n,
                "disks": disks,
                "items": items,
                "plan_s": round(plan_s, 3),
                "metadata_s": round(pickle_s, 3),
                "metadata_bytes": len(blob),
            }
            rows.append(row)
            print(
                f"{n:6} ranks, {disks:4} disk(s): {items:9,} items; planner {plan_s:7.2f} s, "
                f".metadata {pickle_s:6.2f} s, {len(blob) / 2**20:8.1f} MiB"
            )
            del all_plans, global_plan, metadata, blob
    big = max((r for r in rows if r["disks"] == 1), key=lambda r: r["ranks"])
    for n in (1000, 10000):
        k = n / big["ranks"]
        rows.append(
            {
                "ranks": n,
                "extrapolated_from": big["ranks"],
                "metadata_s": round(big["metadata_s"] * k, 1),
                "metadata_bytes": int(big["metadata_bytes"] * k),
                "plan_s_at_least": round(big["plan_s"] * k, 1),
            }
        )
        print(
            f"{n:6} ranks (extrapolated, linear): planner >= {big['plan_s'] * k:.0f} s, .metadata {big['metadata_s'] * k:.0f} s, {big['metadata_bytes'] * k / 2**20:.0f} MiB"
        )
    write_json(args.out, "rank0", {"layers": args.layers, "rows": rows})


if __name__ == "__main__":
    main()
