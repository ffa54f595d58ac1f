"""Rank 0's serial work per save at N ranks, from synthetic plans (no ranks are run).

    python benchmarks/bench_rank0.py [--ranks 8,64,256] [--layers 80] [--out DIR]

Every rank holds an FSDP shard (dim 0) of each parameter of a Llama-70B-shaped model
(``--layers`` x 9 matrices and norms; model, AdamW exp_avg and exp_avg_sq: 3 items per
parameter per rank). Measured on this one process, what the coordinator does in a save:
ckptstore's planner (DCP's ``create_global_plan``: dedup, metadata, validation; plus
ckptstore's per-disk dedup when the ranks' roots are node-local), the writer's
``.metadata`` assembly and pickling (``CkptStorageWriter.finish``'s share), and the size
of that ``.metadata``. Figures for 1,000 and 10,000 ranks are extrapolated from the
largest N measured (linear in items for pickling; DCP's planner is worse than linear
when shards overlap, see issue 17), and marked so. JSON in --out.
"""

from __future__ import annotations

import argparse
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
                planner_data={},
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="8,64,256")
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--out", default="benchmarks/results/issue17-rank0")
    args = ap.parse_args()
    rows = []
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
