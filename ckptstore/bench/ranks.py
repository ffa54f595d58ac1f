"""Rank scaling for ``ckptstore bench --scaling``: one sharded state saved by 1, 2, 4 processes.

Each process is a rank of a gloo group on the CPU. The model is a GPT sharded with FSDP2
(``fully_shard``) and trained one AdamW step, so each rank holds its shard of the weights
and moments; the total state is the same whatever the number of ranks. A save is timed
from a barrier before it to a barrier after every rank's save returned durable; a load
likewise, after the files were dropped from the page cache. Contenders: DCP ``save`` and
ckptstore (uncompressed and zstd). Threads per rank: the cores divided by the ranks.

Run by the suite; one rank by hand is ``python -m ckptstore.bench.ranks --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

NAMES = ("dcp_save", "ckptstore_none", "ckptstore_zstd")


def run_world(
    world: int,
    *,
    size: str,
    dtype: str,
    target: str,
    runs: int,
    load_runs: int,
    timeout_s: float = 1200.0,
) -> dict[str, Any]:
    """Start ``world`` rank processes and return rank 0's results (or the error)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // world)
    with tempfile.TemporaryDirectory(prefix="ckptstore-bench-ranks-") as tmp:
        out = os.path.join(tmp, "rank0.json")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ckptstore.bench.ranks",
                    "--rank",
                    str(rank),
                    "--world",
                    str(world),
                    "--init",
                    f"file://{tmp}/store",
                    "--size",
                    size,
                    "--dtype",
                    dtype,
                    "--target",
                    target,
                    "--runs",
                    str(runs),
                    "--load-runs",
                    str(load_runs),
                    "--threads",
                    str(threads),
                    "--out",
                    out,
                ],
                env=env,
                stdout=None if rank == 0 else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(world)
        ]
        deadline = time.monotonic() + timeout_s
        errors = []
        try:
            for rank, p in enumerate(procs):
                try:
                    _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    errors.append(f"rank {rank} timed out after {timeout_s:.0f} s")
                    break
                if p.returncode != 0:
                    tail = err.strip().splitlines()[-1:] if err else []
                    errors.append(f"rank {rank} exited {p.returncode}: {' '.join(tail)}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            shutil.rmtree(target, ignore_errors=True)
        if errors or not os.path.exists(out):
            return {"world": world, "error": "; ".join(errors) or "rank 0 wrote no results"}
        with open(out) as f:
            result: dict[str, Any] = json.load(f)
        return result


def worker(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init", required=True, help="file:// rendezvous for the gloo group")
    ap.add_argument("--size", default="256MB")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--target", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--load-runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import ckptstore
    from ckptstore.bench.common import evict, gpt_config_for, summarize
    from ckptstore.layout import checkpoint_name
    from ckptstore.train.model import GPT

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world)
    rank0 = args.rank == 0
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    mesh = init_device_mesh("cpu", (args.world,))
    cfg, _ = gpt_config_for(args.size, dtype)
    torch.manual_seed(0)
    model = GPT(cfg).to(dtype)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (2, min(cfg.block_size, 64)))
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    local_bytes = 0
    for part in (msd, *osd["state"].values()):  # type: ignore[union-attr]
        for t in part.values():
            if hasattr(t, "to_local"):  # a DTensor: this rank's shard
                local_bytes += t.to_local().numel() * t.element_size()
    totals = [0] * args.world
    dist.all_gather_object(totals, local_bytes)

    ckpts = {
        f"ckptstore_{codec}": ckptstore.Checkpointer(
            os.path.join(args.target, f"ckptstore_{codec}"), codec=codec, threads=args.threads
        )
        for codec in ("none", "zstd")
    }

    def save(name: str, r: int) -> str:
        if name == "dcp_save":
            path = os.path.join(args.target, f"dcp_save-{r}")
            dcp.save(state, storage_writer=dcp.FileSystemWriter(path, thread_count=args.threads))
            return path
        ckpts[name].save(state, r + 2)
        return os.path.join(args.target, name, checkpoint_name(r + 2))

    def load(name: str, path: str) -> None:
        if name == "dcp_save":
            dcp.load(state, storage_reader=dcp.FileSystemReader(path))
        else:
            ckptstore.load(state, path, threads=args.threads)

    def timed(fn: Any) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    saves: dict[str, list[float]] = {n: [] for n in NAMES}
    last: dict[str, str] = {}
    for r in range(-1, args.runs):
        for name in NAMES:
            if rank0 and name in last:
                shutil.rmtree(last[name], ignore_errors=True)
            dist.barrier()
            box: dict[str, str] = {}
            t = timed(lambda name=name, r=r, box=box: box.update(path=save(name, r)))
            last[name] = box["path"]
            if r >= 0:
                saves[name].append(t)
            if rank0:
                print(f"  {args.world} rank(s) run {r + 2 if r < 0 else r + 1}: {name} save {t:.3f} s",
                      flush=True)  # fmt: skip
    loads: dict[str, list[float]] = {n: [] for n in NAMES}
    for r in range(args.load_runs):
        for name in NAMES:
            if rank0:
                evict(last[name])
            t = timed(lambda name=name: load(name, last[name]))
            loads[name].append(t)
            if rank0:
                print(f"  {args.world} rank(s) load {r + 1}: {name} {t:.3f} s", flush=True)
    for ck in ckpts.values():
        ck.close()
    if rank0:
        summary = {
            n: {
                "save_s": summarize(saves[n]),
                **({"load_s": summarize(loads[n])} if loads[n] else {}),
            }
            for n in NAMES
        }
        with open(args.out, "w") as f:
            json.dump(
                {
                    "world": args.world,
                    "threads_per_rank": args.threads,
                    "state_bytes": sum(totals),
                    "raw": {"saves": saves, "loads": loads},
                    "summary": summary,
                },
                f,
            )
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    # torch 2.13 + gloo after DeviceMesh collectives sometimes aborts in interpreter
    # teardown (see tests/dist_worker.py); the results are written: leave at once.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(worker())
