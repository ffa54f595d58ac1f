"""The GPU measurements of ``benchmarks/gpu_check.sh`` (issue 18), one process, a few minutes.

    python benchmarks/gpu_check.py [--size-mb 2048] [--repeats 3] [--out benchmarks/results]
        [--allow-cpu]

On a state of ``--size-mb`` float32/bf16 tensors on cuda:0:

* stall: ``save_async`` (blocking until staged) against a bare copy of the same tensors
  into pinned host buffers allocated beforehand (``copy_(non_blocking=True)``, then one
  synchronize): the floor for any staging;
* pinned memory: what the Checkpointer pinned, against the state's size (exact, not
  rounded up to a power of two);
* durable and load: ckptstore (codec none, fsync before commit) against DCP
  ``async_save`` with its pinned ``DefaultStager`` (staging on a side stream, reused
  buffers), DCP's time counted until its files are written and then ``os.sync()`` (DCP
  does not fsync); loads into GPU tensors from cold files (page cache dropped), each
  followed by a synchronize;
* incremental saves (issue 19) of fine-tuning on the GPU: the same state, 95% of its
  bytes frozen and 5% changed in place on the GPU before each save, saved by a
  Checkpointer with ``incremental=True`` against one without (codec none, alternating):
  durable time and bytes written per save against the full save's (issue 19's targets:
  <= 0.15x and <= 8%), the stall beside it (not judged: a GPU state is copied to the
  host whole either way), and the last checkpoint reloaded bit-exact.

Prints one ``PASS``/``FAIL`` line per check and the JSON written. ``--allow-cpu`` runs
the same code on the CPU (nothing pinned, DCP's stager unpinned, no thresholds judged)
to check the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import evict, machine_info, summarize, write_json

import ckptstore
from ckptstore.bench.contenders import dcp_async_save

# Thresholds (issue 18 names the comparisons; these bounds are this script's):
STALL_RATIO_MAX = 1.5  # ckptstore's stall / a bare device-to-pinned copy
DURABLE_RATIO_MAX = 1.0  # ckptstore durable / DCP async_save written + os.sync()
LOAD_RATIO_MAX = 1.0  # ckptstore load / DCP load, both into GPU tensors
PINNED_SLACK = 1.01  # pinned bytes / state bytes (alignment only)
INCREMENTAL_DURABLE_MAX = 0.15  # issue 19: incremental durable / full durable
INCREMENTAL_BYTES_MAX = 0.08  # issue 19: bytes written per incremental save / full
TRAINED_SHARE = 0.05  # of the incremental runs' state: changed before each save


def make_state(total_bytes: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Transformer-like: a few large matrices, many mid-size ones, some small, two dtypes."""
    g = torch.Generator(device=device).manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    left, i = total_bytes, 0
    sizes = [16 << 20, 4 << 20, 64 << 20, 1 << 20, 4 << 10]
    while left > 0:
        nbytes = min(sizes[i % len(sizes)], left)
        dtype = torch.bfloat16 if i % 3 == 0 else torch.float32
        n = max(nbytes // dtype.itemsize, 1)
        state[f"layer{i:04d}"] = torch.randn(n, generator=g, device=device).to(dtype)
        left -= n * dtype.itemsize
        i += 1
    return state


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_copy(state: dict[str, torch.Tensor], device: torch.device, repeats: int) -> list[float]:
    pin = device.type == "cuda"
    dsts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in state.values()]
    times = []
    for _ in range(repeats + 1):  # the first touches the pages
        sync(device)
        t0 = time.perf_counter()
        for dst, src in zip(dsts, state.values(), strict=True):
            dst.copy_(src, non_blocking=pin)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[1:]


def ckptstore_runs(
    state: dict[str, torch.Tensor], device: torch.device, root: str, repeats: int
) -> dict[str, Any]:
    out: dict[str, list[float]] = {"stall_s": [], "durable_s": [], "load_s": []}
    with ckptstore.Checkpointer(root, codec="none") as ckpt:
        ckpt.save(state, 0)  # allocates and pins the staging buffer once, as training would
        pinned = ckpt._staging.pinned_bytes
        staging = ckpt.staging_bytes
        target = {k: torch.empty_like(v) for k, v in state.items()}
        for r in range(1, repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            pending = ckpt.save_async(state, r)
            out["stall_s"].append(time.perf_counter() - t0)
            pending.wait(timeout=600)
            out["durable_s"].append(time.perf_counter() - t0)
            gc.collect()
            evict(root)  # both loads read cold files
            t0 = time.perf_counter()
            ckpt.load(target, r)
            sync(device)
            out["load_s"].append(time.perf_counter() - t0)
        for k, v in state.items():
            if not torch.equal(target[k], v):
                raise SystemExit(f"FAIL ckptstore reload of {k} is not bit-exact")
    return {**out, "pinned_bytes": pinned, "staging_bytes": staging}


def dcp_runs(
    state: dict[str, torch.Tensor], device: torch.device, root: str, repeats: int
) -> dict[str, Any]:
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = device.type == "cuda"
    stager = DefaultStager(StagingOptions(cuda, False, cuda, cuda))
    out: dict[str, list[float]] = {"stall_s": [], "staged_s": [], "durable_s": [], "load_s": []}
    target = {k: torch.empty_like(v) for k, v in state.items()}
    try:
        for r in range(repeats + 1):  # the first allocates (and pins) the stager's buffers
            path = os.path.join(root, f"dcp-{r}")
            sync(device)
            t0 = time.perf_counter()
            stall, staged = dcp_async_save(state, path, stager)  # returns once written
            os.sync()
            durable = time.perf_counter() - t0
            gc.collect()
            evict(path)
            t0 = time.perf_counter()
            dcp.load(target, checkpoint_id=path)
            sync(device)
            load = time.perf_counter() - t0
            if r:
                for key, value in zip(out, (stall, staged, durable, load), strict=True):
                    out[key].append(value)
            shutil.rmtree(path, ignore_errors=True)
    finally:
        stager.close()
    return out


def fine_tuning(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of ``state`` a fine-tuning step changes: the last ones, ~5% of the
    bytes (the rest stands for frozen weights)."""
    trained, total, budget = [], 0, TRAINED_SHARE * nbytes(state)
    for t in reversed(list(state.values())):
        if total + t.numel() * t.element_size() > budget:
            continue
        trained.append(t)
        total += t.numel() * t.element_size()
    return trained


def incremental_runs(
    state: dict[str, torch.Tensor], device: torch.device, root: str, repeats: int
) -> dict[str, Any]:
    """Saves 0..repeats+1 of fine-tuning into two roots, incremental and full,
    alternating per step; the first two of each are untimed (the first allocates, the
    second is the first that can link)."""
    trained = fine_tuning(state)
    kinds = {"incremental": True, "full": False}
    out: dict[str, dict[str, list[float]]] = {
        k: {"stall_s": [], "durable_s": [], "stored_bytes": []} for k in kinds
    }
    ckpts = {
        k: ckptstore.Checkpointer(os.path.join(root, k), codec="none", incremental=inc)
        for k, inc in kinds.items()
    }
    try:
        for step in range(repeats + 2):
            for t in trained:
                t.add_(1e-3)  # the training step, queued on the GPU
            for kind, ckpt in ckpts.items():
                sync(device)
                evict(os.path.join(root, kind))  # each timed save starts on a quiet disk
                t0 = time.perf_counter()
                pending = ckpt.save_async(state, step)
                stall = time.perf_counter() - t0
                result = pending.wait(timeout=600)
                durable = time.perf_counter() - t0
                if step >= 2:
                    out[kind]["stall_s"].append(stall)
                    out[kind]["durable_s"].append(durable)
                    out[kind]["stored_bytes"].append(result.stored_bytes)
        target = {k: torch.empty_like(v) for k, v in state.items()}
        ckpts["incremental"].load(target, repeats + 1)
        for k, v in state.items():
            if not torch.equal(target[k], v):
                raise SystemExit(f"FAIL incremental reload of {k} is not bit-exact")
        linked = bool(ckpts["incremental"].latest().manifest.linked)  # type: ignore[union-attr]
    finally:
        for ckpt in ckpts.values():
            ckpt.close()
    return {**out, "trained_bytes": sum(t.numel() * t.element_size() for t in trained),
            "linked": linked}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--root", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--allow-cpu", action="store_true", help="dry run on the CPU")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    if torch.cuda.is_available():
        device = torch.device("cuda:0")
        torch.cuda.set_device(device)
    elif args.allow_cpu:
        device = torch.device("cpu")
    else:
        raise SystemExit("FAIL no CUDA device (use --allow-cpu for a dry run of the script)")
    state = make_state(args.size_mb << 20, device)
    size = nbytes(state)
    workdir = tempfile.mkdtemp(prefix="ckptstore-gpu-check-", dir=args.root)
    machine = machine_info(workdir)
    try:
        bare = bare_copy(state, device, args.repeats)
        ours = ckptstore_runs(state, device, os.path.join(workdir, "ckptstore"), args.repeats)
        theirs = dcp_runs(state, device, workdir, args.repeats)
        inc = incremental_runs(state, device, os.path.join(workdir, "incremental"), args.repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    med = statistics.median
    checks = {
        "stall_vs_bare_copy": (med(ours["stall_s"]) / med(bare), STALL_RATIO_MAX),
        "durable_vs_dcp_async_save": (
            med(ours["durable_s"]) / med(theirs["durable_s"]),
            DURABLE_RATIO_MAX,
        ),
        "load_vs_dcp_load": (med(ours["load_s"]) / med(theirs["load_s"]), LOAD_RATIO_MAX),
    }
    inc_full, inc_inc = inc["full"], inc["incremental"]
    checks["incremental_durable_vs_full"] = (
        med(inc_inc["durable_s"]) / med(inc_full["durable_s"]),
        INCREMENTAL_DURABLE_MAX,
    )
    checks["incremental_bytes_vs_full"] = (
        med(inc_inc["stored_bytes"]) / med(inc_full["stored_bytes"]),
        INCREMENTAL_BYTES_MAX,
    )
    if device.type == "cuda":
        checks["pinned_bytes_vs_state"] = (ours["pinned_bytes"] / size, PINNED_SLACK)
    result: dict[str, Any] = {
        "machine": {
            **machine,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "state_bytes": size,
        "tensors": len(state),
        "repeats": args.repeats,
        "bare_copy_s": summarize(bare),
        "ckptstore": {k: summarize(v) if isinstance(v, list) else v for k, v in ours.items()},
        "dcp_async_save_pinned_stager": {k: summarize(v) for k, v in theirs.items()},
        "incremental": {
            "trained_bytes": inc["trained_bytes"],
            "linked": inc["linked"],
            **{k: {n: summarize(v) for n, v in inc[k].items()} for k in ("incremental", "full")},
        },
        "checks": {},
        "judged": device.type == "cuda",
    }
    gb = size / 1e9
    print(f"state: {len(state)} tensors, {gb:.2f} GB on {device}")
    print(f"bare device-to-pinned copy: {med(bare) * 1e3:.1f} ms ({gb / med(bare):.1f} GB/s)")
    for name in ("stall_s", "durable_s", "load_s"):
        print(f"{name[:-2]:>8}: ckptstore {med(ours[name]):.3f} s, DCP {med(theirs[name]):.3f} s")
    print(
        f"incremental (fine-tuning, {inc['trained_bytes'] / size:.1%} changed a save): "
        + ", ".join(
            f"{n[:-2]} {med(inc_inc[n]):.3f} s against {med(inc_full[n]):.3f} s full"
            for n in ("stall_s", "durable_s")
        )
        + f", {med(inc_inc['stored_bytes']) / 1e6:.1f} MB written against "
        f"{med(inc_full['stored_bytes']) / 1e6:.1f} MB"
    )
    print(
        f"pinned: {ours['pinned_bytes']:,} B of {ours['staging_bytes']:,} B staging, state {size:,} B"
    )
    for name, (value, bound) in checks.items():
        ok = value <= bound
        result["checks"][name] = {"value": value, "max": bound, "pass": ok}
        verdict = ("PASS" if ok else "FAIL") if device.type == "cuda" else "DRY "
        print(f"{verdict} {name}: {value:.3f} (max {bound})")
    path = write_json(args.out, "gpu-check" if device.type == "cuda" else "gpu-check-dry", result)
    print(f"results: {path}")
    print(json.dumps({k: v["pass"] for k, v in result["checks"].items()}))


if __name__ == "__main__":
    main()
