"""A nanoGPT-style training script (the shape of karpathy/nanoGPT's ``train.py``),
checkpointed by ckptstore.

    python examples/nanogpt_style.py --out-dir runs/nano --max-iters 200
    torchrun --nproc_per_node=2 examples/nanogpt_style.py --out-dir runs/nano2

What nanoGPT does, kept here on purpose because it is what makes resuming hard: batches
are drawn from torch's global generator inside the loop (``get_batch``), the next batch
is fetched before the current step's optimizer step, evaluation draws batches from the
same generator, a GradScaler exists (disabled unless fp16), every rank seeds with its own
offset, and ``iter_num`` / ``best_val_loss`` are loop variables. Against nanoGPT's own
save/load (36 lines of it), the ckptstore version is the ``TrainState`` and the manager
below: the batch already fetched goes in ``extras`` (per rank), so an interrupted run
(Ctrl+C, SIGTERM) rerun with the same command ends bit-identical to an uninterrupted one
on CPU.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ckptstore
from ckptstore.train.model import GPT, MODEL_SIZES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default="runs/nanogpt")
    ap.add_argument("--max-iters", type=int, default=200)
    ap.add_argument("--eval-interval", type=int, default=20)
    ap.add_argument("--eval-iters", type=int, default=4)
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--stop-after", type=int, default=None, help="SIGTERM self after this iter")
    ap.add_argument("--final-out", default=None, help="torch.save the final weights here")
    args = ap.parse_args()

    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    else:
        rank = 0
    torch.manual_seed(1337 + rank)  # nanoGPT: a seed offset per rank
    cfg = MODEL_SIZES["tiny"]
    block = cfg.block_size

    import pydoc_data.topics

    text = "".join(pydoc_data.topics.topics.values()).encode()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = splits[split]
        ix = torch.randint(len(d) - block - 1, (args.batch_size,))  # the global generator
        x = torch.stack([d[i : i + block] for i in ix])
        y = torch.stack([d[i + 1 : i + 1 + block] for i in ix])
        return x, y

    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # nanoGPT: enabled for fp16 only
    raw_model = model
    if ddp:
        model = DDP(model)

    def get_lr(it: int) -> float:
        warmup = 10
        if it < warmup:
            return args.lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / max(1, args.max_iters - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * ratio)))

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        out = {}
        for split in ("train", "val"):
            losses = torch.zeros(args.eval_iters)
            for k in range(args.eval_iters):
                x, y = get_batch(split)
                _, loss = model(x, y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    # --- ckptstore: what nanoGPT's checkpoint dict and its resume branch did ---------
    state = ckptstore.TrainState(model=raw_model, optimizer=optimizer, scaler=scaler)
    manager = ckptstore.CheckpointManager(
        args.out_dir, save=ckptstore.SaveEvery(steps=args.save_every), keep=ckptstore.KeepLast(3)
    )
    with manager, manager.guard(state):
        iter_num = manager.restore(state)
        best_val_loss = state.extras.get("best_val_loss", 1e9)
        if iter_num:
            X, Y = state.extras["next_batch"]  # the batch fetched before the save
        else:
            X, Y = get_batch("train")
        # -------------------------------------------------------------------------------
        while iter_num < args.max_iters:
            lr = get_lr(iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            metrics = None
            if iter_num % args.eval_interval == 0:
                losses = estimate_loss()
                best_val_loss = min(best_val_loss, losses["val"])
                metrics = {"val_loss": losses["val"]}
                if rank == 0:
                    print(f"iter {iter_num}: train {losses['train']:.4f} val {losses['val']:.4f}")
            for micro in range(args.grad_accum):
                if ddp:
                    model.require_backward_grad_sync = micro == args.grad_accum - 1
                _, loss = model(X, Y)
                loss = loss / args.grad_accum
                X, Y = get_batch("train")  # prefetch, as nanoGPT does
                scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.extras["next_batch"] = (X, Y)
            state.extras["best_val_loss"] = best_val_loss
            manager.maybe_save(iter_num, state, metrics=metrics)
            iter_num += 1
            if iter_num == args.stop_after:
                os.kill(os.getpid(), 15)  # as a scheduler's SIGTERM would
    if args.final_out and rank == 0:
        torch.save(raw_model.state_dict(), args.final_out)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
