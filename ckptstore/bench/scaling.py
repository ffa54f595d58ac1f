"""The suite's scaling studies (``ckptstore bench --scaling``): the same comparison at
growing state sizes, and saves and loads on 1, 2, ... ranks (processes on gloo)."""

from __future__ import annotations

import argparse
import gc
from typing import Any

import torch

from ckptstore.bench import contenders as cont
from ckptstore.bench.compare import compare
from ckptstore.bench.workload import build_workload

SCALING_NAMES = ["torch_save", "dcp_save", "ckptstore_none", "ckptstore_zstd"]


def size_scaling(
    args: argparse.Namespace, target: cont.Target, dtype: torch.dtype, names: list[str] | None
) -> list[dict[str, Any]]:
    subset = [n for n in SCALING_NAMES if names is None or n in names] or SCALING_NAMES
    out = []
    for size in args.scaling_sizes.split(","):
        state, meta = build_workload(size, dtype)
        print(f"\n== size scaling: {meta['label']} ==", flush=True)
        res = compare(state, target, subset, args.runs, args.load_runs, args.threads)
        out.append(
            {
                "size": size,
                "state_bytes": meta["state_bytes"],
                "summary": res["summary"],
                "skipped": res["skipped"],
                "failed": res["failed"],
            }
        )
        del state
        gc.collect()
    return out


def rank_scaling(args: argparse.Namespace, target: cont.Target) -> dict[str, Any]:
    from ckptstore.bench.ranks import run_world

    if not target.local:
        return {"skipped": "rank scaling runs on a local --target only"}
    rows = []
    for world in [int(w) for w in args.scaling_ranks.split(",")]:
        print(f"\n== rank scaling: {world} process(es), {args.ranks_size} in total ==", flush=True)
        rows.append(
            run_world(
                world,
                size=args.ranks_size,
                dtype=args.dtype,
                target=target.join(f"ranks-{world}"),
                runs=args.runs,
                load_runs=args.load_runs,
            )
        )
    return {"size": args.ranks_size, "rows": rows}
