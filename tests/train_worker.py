"""A small training run driven by CheckpointManager, as a user would write it.

Run by the manager tests in real subprocesses (signals, fresh-process resume):

    python train_worker.py ROOT --steps N [--save-every K] [--keep K] [--resume latest]
        [--slow-from STEP] [--slow-storage] [--no-checkpoint] [--out result.json]

The model uses dropout and every step draws from Python's, NumPy's and torch's
generators, so a resume is only bit-identical if all of them are restored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import time

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ckptstore import CheckpointManager, KeepLast, ResumableDataLoader, SaveEvery, TrainState
from ckptstore.train.model import GPT, GPTConfig


def param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--keep", type=int, default=0)
    ap.add_argument("--resume", default="latest")
    ap.add_argument("--slow-from", type=int, default=None)
    ap.add_argument(
        "--slow-storage", type=float, default=0.0, help="seconds each storage write waits"
    )
    ap.add_argument("--no-checkpoint", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--raise-before-update", type=int, default=None, help="fail in this step's forward"
    )
    ap.add_argument(
        "--raise-after-update",
        type=int,
        default=None,
        help="fail after this step's optimizer.step()",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.1)
    data = torch.randint(
        0, 256, (40, cfg.block_size + 1), generator=torch.Generator().manual_seed(1)
    )
    loader = ResumableDataLoader(TensorDataset(data), batch_size=4, seed=5)  # 10 batches per epoch
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 8))
    state = TrainState(
        model=model, optimizer=opt, scheduler=sched, dataloader=loader, extras={"noise": 0.0}
    )

    root: object = args.root
    if args.slow_storage:
        from ckptstore.storage import LocalBackend
        from ckptstore.storage.testing import FaultyBackend

        root = FaultyBackend(LocalBackend(args.root), delay_s=args.slow_storage)
    mgr = CheckpointManager(
        root,
        save=SaveEvery(steps=args.save_every) if args.save_every else None,
        keep=KeepLast(args.keep) if args.keep else None,
        enabled=not args.no_checkpoint,
        chunk_bytes=64 * 1024,
    )
    start = mgr.restore(state, args.resume)
    print(f"START {start}", flush=True)
    losses: dict[int, float] = {}
    step = start
    with mgr.guard(state):
        while step < args.steps:
            epoch = loader.epoch
            for (batch,) in loader:
                if os.environ.get("TW_DEBUG"):
                    print(
                        "DBG",
                        step,
                        param_digest(model)[:8],
                        hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:8],
                        hashlib.sha256(repr(random.getstate()[1]).encode()).hexdigest()[:8],
                        int(np.random.get_state()[1][0]),
                        loader.state_dict()["batches_taken"],
                        batch[0, :3].tolist(),
                        flush=True,
                    )
                noise = torch.rand(()).item() + random.random() + float(np.random.rand())
                state.extras["noise"] += noise
                model.train()
                _, loss = model(batch[:, :-1], batch[:, 1:])
                if step == args.raise_before_update:
                    raise RuntimeError(f"injected failure in step {step}, before the update")
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step == args.raise_after_update:
                    raise RuntimeError(f"injected failure in step {step}, after the update")
                sched.step()
                losses[step] = loss.item() + noise
                print(f"STEP {step}", flush=True)
                if args.slow_from is not None and step >= args.slow_from:
                    time.sleep(0.3)
                end = loader.batches_taken == loader.batches_per_epoch()
                mgr.maybe_save(
                    step, state, epoch=epoch, end_of_epoch=end, metrics={"loss": loss.item()}
                )
                step += 1
                if step >= args.steps:
                    break
    mgr.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"start": start, "losses": losses, "params": param_digest(model)}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
