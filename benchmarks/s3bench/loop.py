"""Part 3, ``loop``: a small GPT trained on CPU with a ``CheckpointManager`` saving every N
steps, with and without ``backup="s3://..."``: step times, loop time, and the time to
drain at the end.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any

import torch

import ckptstore
from ckptstore.bench.common import cpu_seconds, interleaved, rm, text_batch, text_tokens
from ckptstore.train.model import GPT, GPTConfig
from s3bench import MB
from s3bench.context import Ctx
from s3bench.link import system_busy_s

LOOP_CFG = GPTConfig(n_layer=4, n_head=6, n_embd=384, block_size=128)
LOOP_BATCH = 8


def run_loop(ctx: Ctx, steps: int, every: int, runs: int) -> dict[str, Any]:
    data = text_tokens()
    T = LOOP_CFG.block_size
    counter = {"n": 0}
    fs = ctx.raw_fs()

    def one(backup: bool, steps: int, every: int) -> dict[str, float]:
        counter["n"] += 1
        torch.manual_seed(0)
        model = GPT(LOOP_CFG)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
        state = ckptstore.TrainState(model=model, optimizer=opt)
        g = torch.Generator().manual_seed(0)
        local = os.path.join(ctx.work, f"loop-{counter['n']}")
        prefix = f"{ctx.bucket}/loop-{counter['n']}"
        kw: dict[str, Any] = {}
        if backup:
            kw = {"backup": f"s3://{prefix}", "backup_options": ctx.opts}
        mgr = ckptstore.CheckpointManager(local, save=ckptstore.SaveEvery(steps=every), **kw)
        try:

            def train_step() -> None:
                x, y = text_batch(data, T, LOOP_BATCH, g)
                _, loss = model(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            train_step()  # first-step allocations, not timed
            times, save_steps = [], []
            b0, c0, s0 = system_busy_s(), cpu_seconds(), ctx.server_cpu()
            t_start = time.perf_counter()
            for step in range(steps):
                t0 = time.perf_counter()
                train_step()
                pending = mgr.maybe_save(step, state)
                times.append(time.perf_counter() - t0)
                if pending is not None:
                    save_steps.append(times[-1])
            loop_s = time.perf_counter() - t_start
            t0 = time.perf_counter()
            if backup:
                left = mgr.wait_backup()
                assert not left, left
            else:
                mgr.wait()
            drain_s = time.perf_counter() - t0
            cpu_s, server_s = cpu_seconds() - c0, ctx.server_cpu() - s0
            other_s = max(0.0, system_busy_s() - b0 - cpu_s - server_s)
            status = mgr.backup_status()
        finally:
            mgr.close()
            rm(local)
            if backup:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(prefix, recursive=True)
        times_sorted = sorted(times)
        return {
            "median_step_s": statistics.median(times),
            "mean_step_s": statistics.mean(times),
            "p90_step_s": times_sorted[int(0.9 * (len(times) - 1))],
            "max_step_s": times_sorted[-1],
            "save_step_median_s": statistics.median(save_steps) if save_steps else float("nan"),
            "loop_s": loop_s,
            "drain_s": drain_s,
            "total_s": loop_s + drain_s,
            "cpu_s": cpu_s,
            "server_cpu_s": server_s,
            "other_cpu_s": other_s,
            "backups_skipped": float(len(status.skipped)) if status else 0.0,
        }

    state_mb = 12 * LOOP_CFG.num_params() / MB
    print(
        f"part 3: training loop, GPT {LOOP_CFG.n_layer}x{LOOP_CFG.n_embd} (~{state_mb:.0f} MB "
        f"state), {steps} steps, save every {every}; warm-up run not counted",
        flush=True,
    )
    one(True, max(2 * min(every, 10), 4), min(every, 10))
    raw = interleaved(
        {
            "backup_off": lambda r: one(False, steps, every),
            "backup_on": lambda r: one(True, steps, every),
        },
        runs,
    )
    return {
        "runs": raw,
        "model": {
            "n_layer": LOOP_CFG.n_layer,
            "n_embd": LOOP_CFG.n_embd,
            "n_head": LOOP_CFG.n_head,
            "block_size": LOOP_CFG.block_size,
            "batch": LOOP_BATCH,
            "state_bytes": 12 * LOOP_CFG.num_params(),
        },
        "steps": steps,
        "save_every": every,
    }
