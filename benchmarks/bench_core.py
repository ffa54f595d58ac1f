"""Core save/load benchmark: ckptstore vs torch.save and DCP on the same state, same run.

    python benchmarks/bench_core.py [--size bench-2g] [--runs 5] [--target DIR] [--out DIR]

Workload: GPT ("bench-2g": ~181M params, ~2.2 GB with AdamW moments) after real AdamW
steps on real text. Contenders run interleaved (A B C A B C ...), each once more
beforehand as a warm-up that is not counted (first-save allocations), and report
medians with min and max:

* ``stall_s``   how long the call blocked the caller;
* ``staged_s``  when the caller may change its tensors again (= stall_s unless the
                contender stages in the background);
* ``durable_s`` when the checkpoint is on disk, fsynced;
* ``cpu_s``     process CPU time (all threads) from the call until durable;
* ``bytes``     on disk.

Loads are timed into the preallocated live state, cold (files evicted from the page
cache with posix_fadvise(DONTNEED)) and warm. Results: JSON in --out and a markdown
table on stdout, with the issue's targets checked side by side.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: I001
    du,
    evict,
    fsync_tree,
    gpt_adamw_state,
    interleaved,
    machine_info,
    measure,
    rm,
    state_bytes,
    summarize,
    write_json,
)

import ckptstore
import warnings
from ckptstore.bench.contenders import dcp_async_save, tensors

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
warnings.filterwarnings("ignore", message="torch.distributed is unavailable")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--size", default="bench-2g", help="GPT config from ckptstore.train.model.MODEL_SIZES"
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--load-runs", type=int, default=3)
    ap.add_argument(
        "--target", default="bench-results/data", help="directory to write checkpoints in"
    )
    ap.add_argument("--out", default="bench-results", help="directory for the JSON results")
    ap.add_argument("--only", default="", help="comma-separated contender names (default: all)")
    ap.add_argument(
        "--threads", type=int, default=None, help="ckptstore worker threads (default: all cores)"
    )
    ap.add_argument(
        "--loop-steps", type=int, default=3, help="training steps per in-loop run (0: skip)"
    )
    ap.add_argument("--loop-runs", type=int, default=3)
    args = ap.parse_args(argv)
    # Everything this run writes goes under one directory, removed at the end.
    target = os.path.abspath(os.path.join(args.target, time.strftime("run-%Y%m%d-%H%M%S")))
    os.makedirs(target)
    try:
        return _run(args, target)
    finally:
        rm(target)


def _run(args: argparse.Namespace, target: str) -> int:

    print(f"building GPT '{args.size}' + AdamW after 2 real steps ...", flush=True)
    state, model, opt = gpt_adamw_state(args.size)
    nbytes = state_bytes(state)
    gb = nbytes / 1e9
    print(
        f"state: {nbytes / 1e9:.2f} GB in {sum(1 for _ in tensors(state))} tensors; target {target}",
        flush=True,
    )

    contenders = make_contenders(state, target, args.threads)
    if args.only:
        keep = set(args.only.split(","))
        contenders = {k: v for k, v in contenders.items() if k in keep}
    print("warm-up (one run each, not counted)", flush=True)
    for name, fn in contenders.items():
        fn(-1)
        print(f"  {name} ok", flush=True)
    for entry in os.listdir(target):
        if entry.startswith("warm-"):
            rm(os.path.join(target, entry))
    print(f"measuring: {args.runs} interleaved runs", flush=True)
    saves = interleaved(contenders, args.runs)

    loads = measure_loads(state, target, args.load_runs, set(contenders))
    if args.loop_steps:
        loads.update(
            measure_loop(model, opt, target, args.loop_runs, args.loop_steps, args.threads)
        )
    summary = {
        name: {k: summarize([r[k] for r in runs]) for k in runs[0]}
        for name, runs in {**saves, **loads}.items()
    }
    payload = {
        "benchmark": "core",
        "machine": machine_info(target),
        "workload": {
            "model": args.size,
            "state_bytes": nbytes,
            "runs": args.runs,
            "load_runs": args.load_runs,
        },
        "ckptstore_threads": args.threads or len(os.sched_getaffinity(0)),
        "raw": {"saves": saves, "loads": loads},
        "summary": summary,
        "targets": check_targets(summary, gb),
    }
    path = write_json(args.out, "core", payload)
    print_table(summary, gb, payload["targets"])
    print(f"\nresults: {path}")
    return 0


def make_contenders(state: dict[str, Any], target: str, threads: int | None) -> dict[str, Any]:
    from torch.distributed.checkpoint._extension import ZStandard
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    prealloc = [t.clone() for t in tensors(state)]
    reused_sync = DefaultStager(StagingOptions(False, False, False, False))
    reused_async = DefaultStager(StagingOptions(False, False, True, False))
    cks = {
        "ckptstore_none": ckptstore.Checkpointer(
            os.path.join(target, "ck-none"), codec="none", threads=threads
        ),
        "ckptstore_zstd": ckptstore.Checkpointer(
            os.path.join(target, "ck-zstd"), codec="zstd", threads=threads
        ),
    }
    step = {"n": 0}

    def out(name: str, r: int) -> str:
        # The last measured run's output is kept for the load benchmark.
        return os.path.join(target, f"keep-{name}" if r >= 0 else f"warm-{name}")

    def copy_prealloc(r: int) -> dict[str, float]:
        with torch.no_grad(), measure() as m:
            for dst, src in zip(prealloc, tensors(state), strict=True):
                dst.copy_(src)
        return {
            "stall_s": m["wall_s"],
            "staged_s": m["wall_s"],
            "durable_s": float("nan"),
            "cpu_s": m["cpu_s"],
            "bytes": 0.0,
        }

    def torch_save(r: int) -> dict[str, float]:
        path = out("torch_save", r) + ".pt"
        rm(path)
        with measure() as m:
            torch.save(state, path)
            returned = time.perf_counter()
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        stall = m["wall_s"] - (time.perf_counter() - returned)
        return _res(stall, stall, m, du(path))

    def dcp_writer(name: str, **kw: Any):
        def run(r: int) -> dict[str, float]:
            path = out(name, r)
            rm(path)
            with measure() as m:
                dcp.save(state, storage_writer=dcp.FileSystemWriter(path, **kw))
            return _res(m["wall_s"], m["wall_s"], m, du(path))

        return run

    def dcp_async(name: str, stager: Any):
        def run(r: int) -> dict[str, float]:
            path = out(name, r)
            rm(path)
            gc.collect()
            with measure() as m:
                stall, staged = dcp_async_save(state, path, stager)
            return _res(stall, staged, m, du(path))

        return run

    def ckpt_run(name: str, block: bool = True):
        ck = cks[name.removesuffix("_bgstaging")]

        def run(r: int) -> dict[str, float]:
            step["n"] += 1
            with measure() as m:
                t0 = time.perf_counter()
                pending = ck.save_async(state, step["n"], block_until_staged=block)
                stall = time.perf_counter() - t0
                pending.staged.result()
                staged = time.perf_counter() - t0
                result = pending.wait()
            ckdir = os.path.join(ck.url, result.name)
            size = du(ckdir)
            keep = out(name, r)
            rm(keep)
            os.rename(ckdir, keep)  # keep the newest for loading; the root stays small
            return _res(stall, staged, m, size)

        return run

    return {
        "copy_prealloc": copy_prealloc,
        "torch_save": torch_save,
        "dcp_save": dcp_writer("dcp_save"),
        "dcp_zstd": dcp_writer("dcp_zstd", thread_count=2, _extensions=[ZStandard()]),
        "dcp_async_default": dcp_async("dcp_async_default", None),
        "dcp_async_reused": dcp_async("dcp_async_reused", reused_sync),
        "dcp_async_reused_bgstaging": dcp_async("dcp_async_reused_bgstaging", reused_async),
        "ckptstore_none": ckpt_run("ckptstore_none"),
        "ckptstore_zstd": ckpt_run("ckptstore_zstd"),
        "ckptstore_none_bgstaging": ckpt_run("ckptstore_none_bgstaging", block=False),
    }


def _res(stall: float, staged: float, m: dict[str, float], size: int) -> dict[str, float]:
    return {
        "stall_s": stall,
        "staged_s": staged,
        "durable_s": m["wall_s"],
        "cpu_s": m["cpu_s"],
        "bytes": float(size),
    }


def measure_loads(
    state: dict[str, Any], target: str, runs: int, names: set[str]
) -> dict[str, list[dict[str, float]]]:
    from torch.distributed.checkpoint import FileSystemReader

    def keep(name: str) -> str:
        return os.path.join(target, f"keep-{name}")

    loaders = {}
    if "dcp_save" in names:
        loaders["load_dcp"] = (
            keep("dcp_save"),
            lambda p: dcp.load(state, storage_reader=FileSystemReader(p)),
        )
    if "dcp_zstd" in names:
        loaders["load_dcp_zstd"] = (
            keep("dcp_zstd"),
            lambda p: dcp.load(state, storage_reader=FileSystemReader(p)),
        )
    if "torch_save" in names:
        loaders["load_torch"] = (
            keep("torch_save") + ".pt",
            lambda p: torch.load(p, mmap=False, weights_only=True),
        )
    for codec in ("none", "zstd"):
        if f"ckptstore_{codec}" in names:
            loaders[f"load_ckptstore_{codec}"] = (
                keep(f"ckptstore_{codec}"),
                lambda p: ckptstore.load(state, p),
            )
    for path, _ in loaders.values():
        if os.path.isdir(path):
            fsync_tree(path)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in loaders}
    print(f"loads: {runs} interleaved runs, cold then warm", flush=True)
    for r in range(runs):
        for name, (path, load) in loaders.items():
            evict(path)
            with measure() as cold:
                load(path)
            with measure() as warm:
                load(path)
            results[name].append(
                {"cold_s": cold["wall_s"], "warm_s": warm["wall_s"], "cold_cpu_s": cold["cpu_s"]}
            )
            print(
                f"  run {r + 1}/{runs}: {name} cold {cold['wall_s']:.3f} s, warm {warm['wall_s']:.3f} s",
                flush=True,
            )
    return results


def measure_loop(
    model: Any, opt: Any, target: str, runs: int, steps: int, threads: int | None
) -> dict[str, list[dict[str, float]]]:
    """Saves inside a real training loop: save, forward/backward, wait until staged, step.

    ``blocked_s``: time the loop waited (the call, plus waiting for ``staged`` before the
    optimizer step). ``slowdown_s``: extra wall time over ``steps`` steps compared with
    the same steps without a save (the background write shares the cores).
    """
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cfg = model.cfg
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, cfg.vocab_size, (2, min(cfg.block_size, 128)), generator=g)

    def fwd_bwd() -> None:
        _, loss = model(x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    stagers = {
        "dcp_async_reused": DefaultStager(StagingOptions(False, False, False, False)),
        "dcp_async_reused_bgstaging": DefaultStager(StagingOptions(False, False, True, False)),
    }
    ck = ckptstore.Checkpointer(os.path.join(target, "loop"), codec="none", threads=threads)
    counter = {"n": 0}

    def run(kind: str) -> dict[str, float]:
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        t0 = time.perf_counter()
        finish = None
        wait_staged = None
        if kind.startswith("ckptstore"):
            counter["n"] += 1
            pending = ck.save_async(
                state, counter["n"], block_until_staged=not kind.endswith("bgstaging")
            )
            wait_staged = pending.staged.result
            finish = pending.wait
        elif kind.startswith("dcp"):
            path = os.path.join(target, f"loop-{kind}")
            rm(path)
            resp = dcp.async_save(state, checkpoint_id=path, async_stager=stagers[kind])
            if hasattr(resp, "staging_completion"):
                wait_staged = resp.staging_completion.result
                finish = resp.upload_completion.result
            else:
                finish = resp.result
        call = time.perf_counter() - t0
        waited = 0.0
        for k in range(steps):
            fwd_bwd()
            if k == 0 and wait_staged is not None:
                w0 = time.perf_counter()
                wait_staged()
                waited = time.perf_counter() - w0
            opt.step()
        total = time.perf_counter() - t0
        if finish is not None:
            finish()
        if kind.startswith("ckptstore"):
            ck.backend.delete(ckptstore.engine.ops.checkpoint_name(counter["n"]))
        return {"blocked_s": call + waited, "total_s": total}

    kinds = [
        "no_save",
        "ckptstore_none",
        "ckptstore_none_bgstaging",
        "dcp_async_reused",
        "dcp_async_reused_bgstaging",
    ]
    for kind in kinds:  # warm-up: first-save allocations are not counted
        run(kind)
    print(f"in-loop stall: {runs} interleaved runs of {steps} training steps", flush=True)
    raw = interleaved({f"loop_{k}": (lambda r, k=k: run(k)) for k in kinds}, runs)
    base = [r["total_s"] for r in raw["loop_no_save"]]
    for rows in raw.values():
        for i, r in enumerate(rows):
            r["slowdown_s"] = r["total_s"] - base[i]
    ck.close()
    for st in stagers.values():
        st.close()
    return raw


def check_targets(s: dict[str, Any], gb: float) -> list[dict[str, Any]]:
    def med(name: str, key: str) -> float:
        return float(s[name][key]["median"]) if name in s else float("nan")

    rows = []

    def target(what: str, ours: str, ours_key: str, base: str, base_key: str, limit: float) -> None:
        a, b = med(ours, ours_key), med(base, base_key)
        if a != a or b != b:
            return
        rows.append(
            {
                "what": what,
                "ours": a,
                "baseline": b,
                "ratio": a / b,
                "limit": limit,
                "met": a / b <= limit,
            }
        )

    for ck in ("ckptstore_none", "ckptstore_zstd"):
        target(
            f"stall {ck} / one copy into preallocated memory",
            ck,
            "staged_s",
            "copy_prealloc",
            "stall_s",
            1.3,
        )
        target(
            f"stall {ck} / DCP async_save, reused DefaultStager",
            ck,
            "staged_s",
            "dcp_async_reused",
            "staged_s",
            0.8,
        )
    target(
        "in-loop stall, ckptstore (staging overlaps forward/backward) / DCP reused DefaultStager",
        "loop_ckptstore_none_bgstaging",
        "blocked_s",
        "loop_dcp_async_reused",
        "blocked_s",
        0.8,
    )
    target(
        "in-loop stall, ckptstore (staging overlaps forward/backward) / DCP reused DefaultStager, async staging",
        "loop_ckptstore_none_bgstaging",
        "blocked_s",
        "loop_dcp_async_reused_bgstaging",
        "blocked_s",
        0.8,
    )
    target(
        "durable ckptstore_zstd / DCP save",
        "ckptstore_zstd",
        "durable_s",
        "dcp_save",
        "durable_s",
        1.2,
    )
    target(
        "durable ckptstore_zstd / DCP + zstd extension",
        "ckptstore_zstd",
        "durable_s",
        "dcp_zstd",
        "durable_s",
        0.7,
    )
    target(
        "durable ckptstore_none / DCP save",
        "ckptstore_none",
        "durable_s",
        "dcp_save",
        "durable_s",
        0.75,
    )
    for codec in ("none", "zstd"):
        target(
            f"cold load ckptstore_{codec} / dcp.load uncompressed",
            f"load_ckptstore_{codec}",
            "cold_s",
            "load_dcp",
            "cold_s",
            1.0,
        )
    return rows


def print_table(s: dict[str, Any], gb: float, targets: list[dict[str, Any]]) -> None:
    def cell(name: str, key: str) -> str:
        if name not in s or key not in s[name]:
            return ""
        v = s[name][key]
        if v["median"] != v["median"]:
            return ""
        return f"{v['median']:.3f} ({v['min']:.2f}-{v['max']:.2f})"

    print("\n### Saves (seconds; median (min-max))\n")
    print("| contender | call blocks | state reusable | durable | CPU s per GB | size GB |")
    print("|---|---|---|---|---|---|")
    for name in s:
        if name.startswith(("load_", "loop_")):
            continue
        cpu = s[name]["cpu_s"]["median"] / gb
        size = s[name]["bytes"]["median"] / 1e9
        print(
            f"| {name} | {cell(name, 'stall_s')} | {cell(name, 'staged_s')} | {cell(name, 'durable_s')} | "
            f"{cpu:.2f} | {size:.2f} |"
        )
    print("\n### Loads into the preallocated state (seconds; median (min-max))\n")
    print("| load | cold cache | warm cache |")
    print("|---|---|---|")
    for name in s:
        if name.startswith("load_"):
            print(f"| {name} | {cell(name, 'cold_s')} | {cell(name, 'warm_s')} |")
    if any(n.startswith("loop_") for n in s):
        print("\n### Inside a training loop (seconds; median (min-max))\n")
        print("| contender | loop blocked | extra wall time over the steps |")
        print("|---|---|---|")
        for name in s:
            if name.startswith("loop_"):
                print(
                    f"| {name.removeprefix('loop_')} | {cell(name, 'blocked_s')} | {cell(name, 'slowdown_s')} |"
                )
    print("\n### Targets (issue 2)\n")
    print("| target | ours | baseline | ratio | limit | met |")
    print("|---|---|---|---|---|---|")
    for t in targets:
        print(
            f"| {t['what']} | {t['ours']:.3f} | {t['baseline']:.3f} | {t['ratio']:.2f} | <= {t['limit']} | {'yes' if t['met'] else 'NO'} |"
        )


if __name__ == "__main__":
    sys.exit(main())
