"""``ckptstore bench --tensors N[,N...]``: states of many small tensors (issue 15).

    ckptstore bench --tensors 1000,10000,40000 --runs 3 --load-runs 3

Each state is N fp32 tensors of 64-2,048 elements (uniform, seeded; ~4.2 KB each on
average, 169 MB at 40,000), nested under ``"model"`` as a ``model.state_dict()`` is.
Contenders: ``copy_prealloc`` (a copy of each tensor into preallocated memory),
``torch_save`` (+fsync / ``torch.load``), ``dcp_save`` (``dcp.save`` / ``dcp.load``) and
``ckptstore_none`` (``Checkpointer.save_async``, uncompressed / ``ckptstore.load``),
measured by the suite's comparison (interleaved runs after a warm-up; medians).

Reported per N: the stall (how long the save call blocked: ``save_async`` for
ckptstore, the whole save for the others), durable and cold/warm load, each also in
µs per tensor; one ``memcpy`` of the whole state's bytes into preallocated memory; and
issue 15's targets: stall <= 5 x memcpy + 2 µs/tensor, durable <= 0.5 x torch.save+fsync,
load <= 0.5 x torch.load.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from ckptstore.bench import contenders as cont
from ckptstore.bench.compare import compare

NAMES = ["copy_prealloc", "torch_save", "dcp_save", "ckptstore_none"]
METRICS = ("stall_s", "durable_s", "cold_s", "warm_s")


def many_tensor_state(n: int, seed: int = 0) -> dict[str, Any]:
    """``n`` fp32 tensors of 64-2,048 elements under ``"model"``."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(64, 2049, (n,), generator=g).tolist()
    return {
        "model": {f"layers.{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(sizes)}
    }


def memcpy_s(nbytes: int, repeats: int = 5) -> float:
    """The fastest of ``repeats`` copies of ``nbytes`` into preallocated memory."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return best


def run(
    counts: list[int],
    target: cont.Target,
    runs: int,
    load_runs: int,
    threads: int | None,
    only: list[str] | None = None,
) -> list[dict[str, Any]]:
    """``only``: a subset of :data:`NAMES` (``--only``); a target that needs a missing
    baseline (torch_save) is left out."""
    names = [n for n in NAMES if only is None or n in only]
    rows = []
    for n in counts:
        state = many_tensor_state(n)
        print(f"\n== many tensors: {n:,} fp32 tensors of 64-2,048 elements ==", flush=True)
        res = compare(state, target, names, runs, load_runs, threads)
        nbytes = res["state_bytes"]
        copy = memcpy_s(nbytes)
        per: dict[str, dict[str, float]] = {}
        for name, summary in res["summary"].items():
            per[name] = {
                k: summary[k]["median"] for k in METRICS if k in summary and "median" in summary[k]
            }
            for k in list(per[name]):
                per[name][k.removesuffix("_s") + "_us_per_tensor"] = per[name][k] / n * 1e6
        ts = per.get("torch_save", {})
        targets = {
            "stall_s": 5 * copy + 2e-6 * n,
            "durable_s": 0.5 * ts["durable_s"] if "durable_s" in ts else None,
            "cold_s": 0.5 * ts["cold_s"] if "cold_s" in ts else None,
        }
        rows.append(
            {
                "tensors": n,
                "state_bytes": nbytes,
                "memcpy_s": copy,
                "medians": per,
                "targets": targets,
                "comparison": res,
            }
        )
        del state
        gc.collect()
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| tensors | MB | contender | stall s | durable s | load cold s | load warm s "
        "| stall µs/t | durable µs/t | cold µs/t |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"

    def u(v: float | None) -> str:
        return "" if v is None else f"{v:.1f}"

    for row in rows:
        n, mb = row["tensors"], row["state_bytes"] / 1e6
        for name, m in row["medians"].items():
            out.append(
                f"| {n:,} | {mb:.0f} | {name} | {f(m.get('stall_s'))} | {f(m.get('durable_s'))} "
                f"| {f(m.get('cold_s'))} | {f(m.get('warm_s'))} "
                f"| {u(m.get('stall_us_per_tensor'))} | {u(m.get('durable_us_per_tensor'))} "
                f"| {u(m.get('cold_us_per_tensor'))} |"
            )
        t = row["targets"]
        out.append(
            f"| {n:,} | {mb:.0f} | *target* (memcpy {row['memcpy_s']:.3f} s) | {f(t['stall_s'])} "
            f"| {f(t['durable_s'])} | {f(t['cold_s'])} | | | | |"
        )
    return "\n".join(out) + "\n"
