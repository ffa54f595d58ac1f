"""The stall a CheckpointManager save costs a training loop, with the copy overlapped
(the default: optimizer.step() waits for it) and without (ManagerConfig(overlap_copy=
False): maybe_save copies before returning). Issue 15, "zero stall by default".

    python benchmarks/bench_overlap.py --size medium --saves 5 --out results.json

A GPT of --size with AdamW trains on random tokens and saves every 3 steps (after a
warm-up save). Per save: how long the save call blocked, how long the next
optimizer.step() waited for the copy (TrainState.copy_wait_s), their sum (the stall),
and that step's time; the two modes alternate, medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

import ckptstore
from ckptstore.train.model import GPT, MODEL_SIZES


def run(size: str, saves: int, overlap: bool, root: str) -> list[dict[str, float]]:
    torch.manual_seed(0)
    cfg = MODEL_SIZES[size]
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = ckptstore.TrainState(model=model, optimizer=opt, rng=False)
    x = torch.randint(0, cfg.vocab_size, (2, min(cfg.block_size, 128) + 1))
    config = ckptstore.ManagerConfig(
        save=None,
        keep=ckptstore.KeepLast(1),
        overlap_copy=overlap,
        checkpointer=ckptstore.CheckpointerConfig(codec="none", max_inflight=1),
    )
    rows: list[dict[str, float]] = []
    every = 3  # steps between saves: the write of one save ends before the next begins
    with ckptstore.CheckpointManager(root, config=config) as mgr:
        for i in range((saves + 1) * every):
            t0 = time.perf_counter()
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            waited_before = state.copy_wait_s
            opt.step()
            opt.zero_grad()
            if rows and i % every == 0:  # the step right after a save: its wait
                rows[-1]["step_wait_s"] = state.copy_wait_s - waited_before
                rows[-1]["stall_s"] = rows[-1]["maybe_save_s"] + rows[-1]["step_wait_s"]
                rows[-1]["step_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            if (i + 1) % every == 0:
                mgr.save(i, state)
                if i + 1 > every:  # the first save of a layout plans and allocates
                    rows.append({"maybe_save_s": time.perf_counter() - t1})
        mgr.wait()
    return [r for r in rows if "stall_s" in r]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="medium", choices=sorted(MODEL_SIZES))
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {"overlap": [], "blocking": []}
    with tempfile.TemporaryDirectory() as d:
        for rnd in range(2):  # alternate: the machine's load drifts
            for mode in ("overlap", "blocking"):
                root = os.path.join(d, f"{mode}-{rnd}")
                results[mode] += run(args.size, args.saves, mode == "overlap", root)
    summary = {
        mode: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for mode, rows in results.items()
    }
    params = MODEL_SIZES[args.size].num_params()
    report = {
        "size": args.size,
        "state_bytes_approx": params * 4 * 3,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "medians": summary,
        "runs": results,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(json.dumps({"size": args.size, "medians": summary}, indent=1))


if __name__ == "__main__":
    main()
